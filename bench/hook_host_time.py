"""Per-iteration host time of the DDP hook, the bytes it puts on the wire, its collectives and its
host reads, on the tensor layouts of ResNet-50 (161 tensors) and GPT-2 XL (580 tensors), sizes
scaled down so that the kernels' work is small and what remains is the hook's own per-step work
(issues 18 and 22), for each of DEFT's plan protocols:

    python bench/hook_host_time.py                          # this tree, plan="ahead" and "leader"
    PYTHONPATH=/tmp/hook-before/python python bench/hook_host_time.py --plans default --label before
                                                            # the same script on another checkout

One process, a gloo group of one (every collective is issued and completes at once). The layout's
tensors are grouped into buckets the way DDP does (reverse order, 25 MB caps, on the real sizes),
then every size is divided by ``--scale`` (at least 1 element). Each iteration runs a trivial
backward through every parameter (so per-parameter tensor hooks, if any, fire) and then calls
``deft_hook`` on each bucket, as DDP would, with a fresh gradient in the bucket; it is timed from the
backward to the end of the last bucket's hook call (which waits for every step). A stand-in bucket
type takes the place of ``torch.distributed.GradBucket``, which Python cannot construct.

Wire bytes: what this rank hands to the collectives per iteration (input tensors; the index
all-gather at its padded length), counted by wrapping ``TorchCollectives.start``, which also counts
the collectives. Host reads: ``deft_kernels.transfer.HOST_READS`` (a read that waits for the device
on a GPU) and ``LATER_READS`` (a read, one step later, of a copy long done) over the iteration.
``--plans default`` passes no ``plan=`` (a checkout from before the option).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import deft_kernels
from deft_kernels import DeftState, deft_hook, transfer
from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.benchmarks.layouts import gpt2_xl_layout, resnet50_layout
from deft_kernels.driver import collectives

LAYOUTS = {"resnet50": (resnet50_layout, 100), "gpt2-xl": (gpt2_xl_layout, 1000)}
BUCKET_CAP = 25 * 2**20  # DDP's default bucket_cap_mb, in bytes of fp32


class Bucket:
    """What ``deft_hook`` asks of a ``GradBucket``."""

    def __init__(self, index: int, params: list[torch.Tensor], last: bool) -> None:
        self._index, self._params, self._last = index, params, last
        self._buffer = torch.zeros(sum(p.numel() for p in params))
        self._grads = [v.view_as(p) for v, p in zip(self._buffer.split([p.numel() for p in params]), params)]

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._grads

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return self._last


def buckets_of(sizes: list[int], scale: int) -> list[list[int]]:
    """Tensor ids per bucket: reverse order, a new bucket when the next tensor would pass the cap."""
    out, current, filled = [], [], 0
    for i in reversed(range(len(sizes))):
        if current and filled + 4 * sizes[i] > BUCKET_CAP:
            out.append(current)
            current, filled = [], 0
        current.append(i)
        filled += 4 * sizes[i]
    return out + [current]


def measure(name: str, iters: int, density: float, plan: str) -> dict:
    make, scale = LAYOUTS[name]
    real = [numel for _, numel in make()]
    params = [torch.zeros(max(1, n // scale), requires_grad=True) for n in real]
    groups = buckets_of(real, scale)
    buckets = [Bucket(b, [params[i] for i in ids], b == len(groups) - 1) for b, ids in enumerate(groups)]
    # DDP's defaults (every parameter used): the stand-in buckets belong to no DDP model to read them from
    state = DeftState(sparsifier="deft", density=density, warmup_steps=1, find_unused_parameters=False,
                      **({} if plan == "default" else {"plan": plan}))
    wire, issued = [0], [0]
    start = collectives.TorchCollectives.start

    def counting(self, request):
        issued[0] += 1
        if hasattr(request, "counts"):  # the index all-gather, padded to the longest proposal
            wire[0] += max(request.counts) * request.mine.element_size()
        else:
            wire[0] += request.tensor.numel() * request.tensor.element_size()
        return start(self, request)

    collectives.TorchCollectives.start = counting
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(b.buffer().numel(), generator=gen) for b in buckets]
    later = getattr(transfer, "LATER_READS", None)  # absent before the plan one step ahead
    times, bytes_per_iter, counts = [], [], []
    try:
        for t in range(iters + 3):  # the warm-up iteration and two sparse ones untimed
            for b, g in zip(buckets, grads):
                b.buffer().copy_(g)
            wire[0] = issued[0] = 0
            reads, late = transfer.HOST_READS.count, later.count if later is not None else 0
            begin = time.perf_counter()
            sum(p.sum() for p in params).backward()
            for b in buckets:
                deft_hook(state, b)
            seconds = time.perf_counter() - begin
            if t >= 3:
                times.append(seconds)
                bytes_per_iter.append(wire[0])
                counts.append((issued[0], transfer.HOST_READS.count - reads,
                               (later.count - late) if later is not None else 0))
    finally:
        collectives.TorchCollectives.start = start
    collectives_per_iter, reads_per_iter, later_per_iter = (statistics.median(c[i] for c in counts) for i in range(3))
    return {"layout": name, "plan": plan, "tensors": len(real), "buckets": len(buckets), "scale": scale,
            "numel": sum(p.numel() for p in params), "density": density, "iters": iters,
            "host_ms_median": 1e3 * statistics.median(times), "host_ms_min": 1e3 * min(times),
            "wire_bytes_per_iter": statistics.median(bytes_per_iter),
            "collectives_per_iter": collectives_per_iter, "host_reads_per_iter": reads_per_iter,
            "later_reads_per_iter": later_per_iter}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--plans", nargs="+", default=["ahead", "leader"], choices=["ahead", "leader", "default"],
                   help="DEFT's plan protocols to measure (default: both); 'default' passes no plan=")
    p.add_argument("--label", default="after", help="names the output file: hook_host_time_<label>")
    p.add_argument("--out-dir", default=DEFAULT_OUT,
                   help="folder of the .txt and .json (bench/results: the committed ones)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.GradBucket = Bucket  # deft_hook checks isinstance(bucket, dist.GradBucket)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))
        try:
            rows = [measure(name, args.iters, args.density, plan) for name in LAYOUTS for plan in args.plans]
        finally:
            dist.destroy_process_group()
    command = "python bench/hook_host_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# {command.strip()}", f"# deft_kernels from {Path(deft_kernels.__file__).parent}, torch "
             f"{torch.__version__}, 1 thread, gloo world of 1, DEFT d={args.density}, {args.iters} iterations",
             f"{'layout':<9} {'plan':<8} {'tensors':>7} {'buckets':>7} {'elements':>9} {'host ms (median)':>17} "
             f"{'host ms (min)':>14} {'wire bytes/iter':>16} {'collectives/bucket':>19} "
             f"{'host reads/bucket':>18} {'host reads/iter':>16} {'later reads/iter':>17}"]
    for r in rows:
        nb = r["buckets"]
        lines.append(f"{r['layout']:<9} {r['plan']:<8} {r['tensors']:>7} {nb:>7} {r['numel']:>9} "
                     f"{r['host_ms_median']:>17.2f} {r['host_ms_min']:>14.2f} {r['wire_bytes_per_iter']:>16,.0f} "
                     f"{r['collectives_per_iter'] / nb:>19.2f} {r['host_reads_per_iter'] / nb:>18.2f} "
                     f"{r['host_reads_per_iter']:>16.0f} {r['later_reads_per_iter']:>17.0f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = Path(args.out_dir) / f"hook_host_time_{args.label}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "config": vars(args),
                                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
