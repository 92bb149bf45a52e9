"""A short CPU demo of the ops on the ResNet-50 layout at d = 1%: times each op next to what a user
would write in plain torch, checks that both give the same result, prints a table with ratios and
writes it as JSON with the machine it ran on.

    .venv/bin/python bench/ops_demo.py [--json deft-bench-results/ops_demo_cpu.json] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common import (DENSITY, accumulate_norms_torch, indices_at_least_torch, resnet50_problem, sparse_unpack_torch,
                    topk_per_fragment, topk_whole)
import deft_kernels
from deft_kernels import _C, ops
from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.benchmarks.worker_count import cpu_model


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def same_selection(x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Same index set, or (where torch.topk broke a tie differently) the same selected magnitudes."""
    theirs = torch.sort(theirs).values
    return torch.equal(ours, theirs) or torch.equal(torch.sort(x[ours].abs()).values, torch.sort(x[theirs].abs()).values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=f"{DEFAULT_OUT}/ops_demo_cpu.json",
                        help="where to write the results (bench/results/ops_demo_cpu.json: the committed ones)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per entry (median reported)")
    args = parser.parse_args()

    p = resnet50_problem("cpu")
    x, k_list, total_k = p.residual, p.k.tolist(), int(p.k.sum())
    print(f"ResNet-50 layout: {x.numel():,} fp32 values, {len(p.sizes)} fragments, d = {DENSITY:.0%}, "
          f"k = {total_k:,} (k_f = max(1, int(d * size_f))); {_C.openmp_max_threads()} OpenMP threads")

    # Correctness against the alternatives before timing anything.
    ours = ops.segmented_topk(x, p.offsets, p.k)
    assert same_selection(x, ours, topk_per_fragment(x, p.sizes, k_list)), "segmented_topk != per-fragment torch.topk"
    r1, r2 = x.clone(), x.clone()
    torch.testing.assert_close(ops.accumulate_norms(p.grad, r1, p.offsets),
                               accumulate_norms_torch(p.grad, r2, p.sizes), rtol=1e-4, atol=0)
    assert torch.equal(r1, r2), "accumulate_norms residual != torch.add"
    assert torch.equal(ops.threshold_select(x, p.offsets, p.thresholds), indices_at_least_torch(x, p.threshold)), \
        "threshold_select != the elementwise passes + nonzero"
    assert torch.equal(ops.sparse_pack(x, ours), x.index_select(0, ours)), "sparse_pack != index_select"
    r1, r2 = x.clone(), x.clone()
    assert torch.equal(ops.sparse_unpack(r1, ours, p.packed, 0.5), sparse_unpack_torch(r2, ours, p.packed, 0.5))
    assert torch.equal(r1, r2), "sparse_unpack residual != index_fill_"

    rows = []  # (op, implementation, ms)
    n = args.repeats
    rows.append(("segmented_topk", "deft_kernels", median_ms(lambda: ops.segmented_topk(x, p.offsets, p.k), n)))
    rows.append(("segmented_topk", "torch.topk per fragment", median_ms(lambda: topk_per_fragment(x, p.sizes, k_list), n)))
    rows.append(("segmented_topk", "torch.topk whole vector", median_ms(lambda: topk_whole(x, total_k), n)))
    r = x.clone()
    rows.append(("accumulate_norms", "deft_kernels", median_ms(lambda: ops.accumulate_norms(p.grad, r, p.offsets), n)))
    rows.append(("accumulate_norms", "add_ + _foreach_norm", median_ms(lambda: accumulate_norms_torch(p.grad, r, p.sizes), n)))
    rows.append(("threshold_select", "deft_kernels",
                 median_ms(lambda: ops.threshold_select(x, p.offsets, p.thresholds), n)))
    rows.append(("threshold_select", "5 elementwise passes + nonzero",
                 median_ms(lambda: indices_at_least_torch(x, p.threshold), n)))
    rows.append(("sparse_pack", "deft_kernels", median_ms(lambda: ops.sparse_pack(x, ours), n)))
    rows.append(("sparse_pack", "index_select", median_ms(lambda: x.index_select(0, ours), n)))
    rows.append(("sparse_unpack", "deft_kernels", median_ms(lambda: ops.sparse_unpack(r, ours, p.packed, 0.5), n)))
    rows.append(("sparse_unpack", "zeros + index_put_ + index_fill_",
                 median_ms(lambda: sparse_unpack_torch(r, ours, p.packed, 0.5), n)))

    ours_ms = {op: ms for op, impl, ms in rows if impl == "deft_kernels"}
    results = []
    print(f"\n{'op':<18}{'implementation':<34}{'median ms':>10}{'x deft':>9}")
    for op, impl, ms in rows:
        ratio = ms / ours_ms[op]
        results.append({"op": op, "implementation": impl, "median_ms": ms, "ratio_to_deft": ratio})
        print(f"{op:<18}{impl:<34}{ms:>10.2f}{ratio:>9.2f}")

    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "openmp_threads": _C.openmp_max_threads(),
               "torch": torch.__version__, "deft_kernels": deft_kernels.__version__, "python": platform.python_version()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "layout": "resnet50", "numel": x.numel(), "density": DENSITY,
                               "k_total": total_k, "repeats": n, "results": results}, indent=2) + "\n")
    print(f"\nmachine: {machine}\nwrote {out}")


if __name__ == "__main__":
    main()
