"""GPU benchmark of the ops against plain torch, on a GPU machine only.

    python bench/bench_gpu.py [--json bench/results/gpu_<device>.json] [--layouts resnet50 gpt2]
                              [--densities 0.01 0.001]

For each layout (ResNet-50-like, 25.5M fp32; GPT-2-small-like, 124M fp32) and density it first
checks every implementation against deft_kernels.reference (exact indices, norms to 1e-5), then
times with ``triton.testing.do_bench`` (median, ms):

- segmented_topk: the CUDA kernel (when the extension was built with CUDA), the Triton kernel, one
  torch.topk per fragment, one torch.topk over the whole vector (k = sum of the k_f);
- accumulate_norms: the fused kernel vs ``residual.add_(grad)`` + ``torch._foreach_norm``;
- threshold_select (one threshold for every fragment, keeping about d of the normal data; offsets
  and thresholds on the CPU, the sync-free way) vs the elementwise passes + ``nonzero`` the
  sparsifiers ran before;
- sparse_pack vs ``index_select``; sparse_unpack vs ``zeros`` + ``index_put_`` + ``index_fill_``.

It measures the card's copy bandwidth (a 1 GiB device-to-device copy, read + write bytes over time)
and prints next to each entry the bandwidth it achieves on its minimal traffic, the ratios of each
deft_kernels entry to the torch alternatives, and the targets below; then writes everything as JSON
with the device name and torch/triton versions.

Targets (H100): top-k >= 5x the per-fragment torch.topk loop and >= 2x one whole-vector torch.topk,
and within 3x of one read of the input at the copy bandwidth; fused norm >= 80% of that bandwidth;
threshold select (one read of the input, one write of the indices) >= 70% of it.

STATUS: written on a machine without a GPU; the table and target logic is tested on made-up timings
(tests/test_bench_gpu.py), the script itself has not been run yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TARGETS = {
    "topk_vs_per_fragment": 5.0,   # speed-up over the per-fragment torch.topk loop
    "topk_vs_whole_vector": 2.0,   # speed-up over one torch.topk over the whole vector
    "topk_reads_of_input": 3.0,    # at most this many input reads' worth of time at copy bandwidth
    "norm_bandwidth_share": 0.8,   # fused norm's achieved bandwidth / copy bandwidth
    "threshold_bandwidth_share": 0.7,  # threshold select's achieved bandwidth / copy bandwidth
}
# The ops held to a share of the copy bandwidth, and the name of that target.
BANDWIDTH_TARGETS = {"accumulate_norms": "norm_bandwidth_share", "threshold_select": "threshold_bandwidth_share"}


def achieved_gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def summarize(rows: list[dict], copy_gbps: float) -> list[dict]:
    """Adds to each row its achieved GB/s, its share of the copy bandwidth, and for deft_kernels rows
    the speed-up over every torch row of the same (layout, density, op)."""
    out = []
    for row in rows:
        r = dict(row)
        r["gbps"] = achieved_gbps(r["bytes"], r["ms"])
        r["bw_share"] = r["gbps"] / copy_gbps
        if r["impl"].startswith("deft"):
            r["speedup"] = {o["impl"]: o["ms"] / r["ms"] for o in rows
                            if (o["layout"], o["density"], o["op"]) == (r["layout"], r["density"], r["op"])
                            and not o["impl"].startswith("deft")}
        out.append(r)
    return out


def check_targets(summary: list[dict], copy_gbps: float) -> list[dict]:
    """The targets per (layout, density): one entry per deft top-k implementation and per fused norm."""
    checks = []
    for r in summary:
        key = {"layout": r["layout"], "density": r["density"], "impl": r["impl"]}
        if r["op"] == "segmented_topk" and r["impl"].startswith("deft"):
            one_read_ms = r["input_bytes"] / (copy_gbps * 1e9) * 1e3
            for name, value in (("topk_vs_per_fragment", r["speedup"].get("torch.topk per fragment")),
                                ("topk_vs_whole_vector", r["speedup"].get("torch.topk whole vector"))):
                if value is not None:
                    checks.append({**key, "target": name, "value": value, "goal": TARGETS[name],
                                   "met": value >= TARGETS[name]})
            reads = r["ms"] / one_read_ms
            checks.append({**key, "target": "topk_reads_of_input", "value": reads,
                           "goal": TARGETS["topk_reads_of_input"], "met": reads <= TARGETS["topk_reads_of_input"]})
        share_target = BANDWIDTH_TARGETS.get(r["op"])
        if share_target and r["impl"].startswith("deft"):
            checks.append({**key, "target": share_target, "value": r["bw_share"], "goal": TARGETS[share_target],
                           "met": r["bw_share"] >= TARGETS[share_target]})
    return checks


def format_table(summary: list[dict], copy_gbps: float) -> str:
    lines = [f"copy bandwidth (device-to-device, read + write): {copy_gbps:,.0f} GB/s",
             f"{'layout':<9} {'d':>6} {'op':<17} {'implementation':<34} {'ms':>9} {'GB/s':>7} {'of copy':>7}  speed-up"]
    for r in summary:
        speedup = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.get("speedup", {}).items())
        lines.append(f"{r['layout']:<9} {r['density']:>6.2%} {r['op']:<17} {r['impl']:<34} {r['ms']:>9.3f} "
                     f"{r['gbps']:>7.0f} {r['bw_share']:>7.0%}  {speedup}")
    return "\n".join(lines)


def format_checks(checks: list[dict]) -> str:
    return "\n".join(f"{'MET ' if c['met'] else 'MISS'} {c['layout']} d={c['density']:.2%} {c['impl']}: "
                     f"{c['target']} = {c['value']:.2f} (goal {c['goal']})" for c in checks)


# ---------------------------------------------------------------------------------------------
# GPU part


def measure_copy_bandwidth(do_bench, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return achieved_gbps(2 * nbytes, ms)


def run_layout(layout_name: str, sizes: list[int], density: float, do_bench) -> list[dict]:
    from common import (accumulate_norms_torch, indices_at_least_torch, local_k, normal_threshold,
                        sparse_unpack_torch, topk_per_fragment, topk_whole)
    from deft_kernels import reference, triton_ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = sum(sizes)
    offsets = torch.tensor([0] + sizes, device="cuda").cumsum(0)
    k_list = local_k(sizes, density)
    k = torch.tensor(k_list, device="cuda")
    total_k = sum(k_list)
    x = torch.randn(n, device="cuda", generator=gen)
    grad = torch.randn(n, device="cuda", generator=gen)
    lib = torch.ops.deft_kernels

    # Correctness first: every implementation against the oracle.
    expected = reference.segmented_topk(x, offsets, k)
    topk_impls = {"deft Triton": lambda: triton_ops.segmented_topk(x, offsets, k)}
    if "segmented_topk" not in triton_ops.REGISTERED:
        topk_impls = {"deft CUDA": lambda: lib.segmented_topk(x, offsets, k, None, 0), **topk_impls}
    for name, fn in topk_impls.items():
        assert torch.equal(fn(), expected), f"{layout_name} d={density}: {name} top-k differs from the reference"
    r1, r2 = x.clone(), x.clone()
    torch.testing.assert_close(lib.accumulate_norms(grad, r1, offsets), reference.accumulate_norms(grad, r2, offsets),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(r1, r2), "accumulate_norms residual differs from the reference"
    packed = lib.sparse_pack(x, expected)
    assert torch.equal(packed, x[expected]), "sparse_pack differs from the reference"
    r1, r2 = x.clone(), x.clone()
    assert torch.equal(lib.sparse_unpack(r1, expected, packed, 0.5), reference.sparse_unpack(r2, expected, packed, 0.5))
    assert torch.equal(r1, r2), "sparse_unpack residual differs from the reference"
    threshold = normal_threshold(density)
    host_offsets, thresholds = offsets.cpu(), torch.full((len(sizes),), threshold)
    selected = lib.threshold_select(x, host_offsets, thresholds, None, 0)
    assert torch.equal(selected, reference.threshold_select(x, host_offsets, thresholds)), \
        "threshold_select differs from the reference"

    item = x.element_size()
    rows = []

    def add(op, impl, fn, nbytes):
        rows.append({"layout": layout_name, "density": density, "op": op, "impl": impl, "ms": do_bench(fn),
                     "bytes": nbytes, "input_bytes": n * item, "n": n, "k": total_k, "fragments": len(sizes)})

    for name, fn in topk_impls.items():
        add("segmented_topk", name, fn, n * item)
    add("segmented_topk", "torch.topk per fragment", lambda: topk_per_fragment(x, sizes, k_list), n * item)
    add("segmented_topk", "torch.topk whole vector", lambda: topk_whole(x, total_k), n * item)
    residual = x.clone()
    add("accumulate_norms", "deft fused", lambda: lib.accumulate_norms(grad, residual, offsets), 3 * n * item)
    add("accumulate_norms", "torch add_ + _foreach_norm", lambda: accumulate_norms_torch(grad, residual, sizes),
        3 * n * item)
    select_bytes = n * item + 8 * selected.numel()  # read the values, write the indices
    add("threshold_select", "deft threshold_select", lambda: lib.threshold_select(x, host_offsets, thresholds, None, 0),
        select_bytes)
    add("threshold_select", "torch elementwise + nonzero", lambda: indices_at_least_torch(x, threshold), select_bytes)
    pack_bytes = total_k * (8 + 2 * item)  # read index and value, write value
    add("sparse_pack", "deft sparse_pack", lambda: lib.sparse_pack(x, expected), pack_bytes)
    add("sparse_pack", "torch.index_select", lambda: torch.index_select(x, 0, expected), pack_bytes)
    unpack_bytes = n * item + total_k * (8 + 3 * item)  # zero the output; read index, value; write out, residual
    add("sparse_unpack", "deft sparse_unpack", lambda: lib.sparse_unpack(residual, expected, packed, 0.5), unpack_bytes)
    add("sparse_unpack", "torch zeros + index_put_ + index_fill_",
        lambda: sparse_unpack_torch(residual, expected, packed, 0.5), unpack_bytes)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="output path (default bench/results/gpu_<device>.json)")
    parser.add_argument("--layouts", nargs="+", default=["resnet50", "gpt2"], choices=["resnet50", "gpt2"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.001])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device and torch.cuda.is_available() is False: nothing was timed.",
              file=sys.stderr)
        return 2

    import triton
    import triton.testing

    from deft_kernels.benchmarks import layouts

    def do_bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    layout_sizes = {"resnet50": [s for _, s in layouts.resnet50_layout()],
                    "gpt2": [s for _, s in layouts.gpt2_small_layout()]}
    copy_gbps = measure_copy_bandwidth(do_bench)
    rows = []
    for name in args.layouts:
        for density in args.densities:
            rows += run_layout(name, layout_sizes[name], density, do_bench)
    summary = summarize(rows, copy_gbps)
    checks = check_targets(summary, copy_gbps)
    print(format_table(summary, copy_gbps))
    print(format_checks(checks))

    device = torch.cuda.get_device_name()
    path = Path(args.json or f"bench/results/gpu_{device.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                                "cuda": torch.version.cuda, "copy_gbps": copy_gbps, "rows": summary,
                                "targets": checks}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py
    raise SystemExit(main())
