"""bench/bench_gpu.py's logic on made-up timings (the script itself needs a GPU): ratios, achieved
bandwidth, target checks, the table, and its refusal without CUDA."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_gpu  # noqa: E402

N = 25_000_000
COPY_GBPS = 2000.0  # read + write bytes per second of a device copy, in GB/s


def row(op, impl, ms, nbytes):
    return {"layout": "resnet50", "density": 0.01, "op": op, "impl": impl, "ms": ms, "bytes": nbytes,
            "input_bytes": 4 * N}


ROWS = [
    row("segmented_topk", "deft CUDA", 0.1, 4 * N),
    row("segmented_topk", "deft Triton", 0.4, 4 * N),
    row("segmented_topk", "torch.topk per fragment", 2.0, 4 * N),
    row("segmented_topk", "torch.topk whole vector", 0.3, 4 * N),
    row("accumulate_norms", "deft fused", 0.2, 12 * N),
    row("accumulate_norms", "torch add_ + _foreach_norm", 0.5, 12 * N),
    row("threshold_select", "deft threshold_select", 0.06, 4 * N + 8 * N // 100),
    row("threshold_select", "torch elementwise + nonzero", 0.6, 4 * N + 8 * N // 100),
]


def test_summary_ratios_and_bandwidth():
    s = bench_gpu.summarize(ROWS, COPY_GBPS)
    cuda = s[0]
    assert cuda["gbps"] == pytest.approx(1000.0)  # 100 MB in 0.1 ms
    assert cuda["bw_share"] == pytest.approx(0.5)
    assert cuda["speedup"] == pytest.approx({"torch.topk per fragment": 20.0, "torch.topk whole vector": 3.0})
    assert s[1]["speedup"]["torch.topk whole vector"] == pytest.approx(0.75)
    assert "speedup" not in s[2]
    assert s[4]["speedup"] == pytest.approx({"torch add_ + _foreach_norm": 2.5})
    assert s[4]["gbps"] == pytest.approx(1500.0)


def test_targets():
    s = bench_gpu.summarize(ROWS, COPY_GBPS)
    checks = {(c["impl"], c["target"]): c for c in bench_gpu.check_targets(s, COPY_GBPS)}
    # One read of 100 MB at 2000 GB/s is 0.05 ms: CUDA's 0.1 ms is 2 reads, Triton's 0.4 ms is 8.
    assert checks[("deft CUDA", "topk_reads_of_input")]["value"] == pytest.approx(2.0)
    assert checks[("deft CUDA", "topk_reads_of_input")]["met"]
    assert not checks[("deft Triton", "topk_reads_of_input")]["met"]
    assert checks[("deft CUDA", "topk_vs_per_fragment")]["met"]  # 20x >= 5x
    assert not checks[("deft Triton", "topk_vs_whole_vector")]["met"]  # 0.75x < 2x
    assert not checks[("deft fused", "norm_bandwidth_share")]["met"]  # 75% < 80%
    # 102 MB in 0.06 ms is 1700 GB/s, 85% of the copy bandwidth.
    assert checks[("deft threshold_select", "threshold_bandwidth_share")]["value"] == pytest.approx(0.85)
    assert checks[("deft threshold_select", "threshold_bandwidth_share")]["met"]
    assert len(checks) == 8


def test_table_lists_every_row_with_its_ratio():
    s = bench_gpu.summarize(ROWS, COPY_GBPS)
    table = bench_gpu.format_table(s, COPY_GBPS)
    assert "2,000 GB/s" in table
    assert len(table.splitlines()) == 2 + len(ROWS)
    assert "20.00x vs torch.topk per fragment" in table
    assert "MISS" in bench_gpu.format_checks(bench_gpu.check_targets(s, COPY_GBPS))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(capsys):
    assert bench_gpu.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
