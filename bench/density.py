"""Measured global density (the global index set's size over N) versus the requested density, for
each sparsifier and worker count, over real gloo ranks on this machine: Top-k's gradient build-up
against DEFT's exact budget.

    .venv/bin/python bench/density.py [--workers 2 4] [--density 0.01] [--steps 5] [--scale 0.02]
                                      [--correlation 0.0] [--json bench/results/density.json]

Gradients are layout-shaped: the ResNet-50 layout (``deft_kernels.benchmarks.layouts``) with every tensor
scaled to ``--scale`` of its size, each tensor with its own magnitude (``exp(N(0, 1))``, the layer
norm differences DEFT exploits); worker ``r``'s gradient at step ``t`` is
``sqrt(c) * shared_t + sqrt(1 - c) * own_{r,t}`` with ``c = --correlation`` (0: independent workers,
the worst case for build-up; real data-parallel gradients lie in between).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deft_kernels import driver
from deft_kernels.benchmarks import layouts
from deft_kernels.sparsifiers import build

TIMEOUT_S = 300


def layout_sizes(scale: float) -> list[int]:
    return [max(1, round(size * scale)) for _, size in layouts.resnet50_layout()]


def gradient(sizes: list[int], rank: int, step: int, correlation: float) -> torch.Tensor:
    """Worker ``rank``'s gradient at ``step`` (see the module docstring)."""
    magnitude = torch.exp(torch.randn(len(sizes), generator=torch.Generator().manual_seed(7)))
    scales = torch.repeat_interleave(magnitude, torch.tensor(sizes))
    shared = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(1000 + step))
    own = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(100_000 + 1000 * rank + step))
    return scales * (math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * own)


def rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        sizes = layout_sizes(args.scale)
        grads = [gradient(sizes, rank, t, args.correlation) for t in range(args.steps)]
        rows = []
        for name in args.sparsifiers:
            s = build(name, args.density)
            stats = [driver.step(s, g, sizes=sizes)[1] for g in grads]
            rows.append({"sparsifier": name, "workers": world_size, "numel": sum(sizes),
                         "requested": args.density, "densities": [st.density for st in stats],
                         "t_select_ms": 1e3 * sum(st.t_select for st in stats) / len(stats)})
        if rank == 0:
            with open(os.path.join(out_dir, f"n{world_size}.json"), "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace, out_dir: str) -> list[dict]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(rank_main, args=(world_size, port, args, out_dir), nprocs=world_size, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise SystemExit(f"{world_size} ranks did not finish in {TIMEOUT_S} s")
    with open(os.path.join(out_dir, f"n{world_size}.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.02, help="fraction of each ResNet-50 tensor's size")
    parser.add_argument("--correlation", type=float, default=0.0, help="share of the gradient common to all workers")
    parser.add_argument("--sparsifiers", nargs="+", default=["topk", "cltk", "sidco", "deft", "micro"])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not 0.0 <= args.correlation <= 1.0:
        parser.error("--correlation must lie in [0, 1]")
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for n in args.workers:
            rows += run(n, args, out_dir)
    print("command: python " + " ".join(sys.argv))
    print(f"ResNet-50 layout x {args.scale} ({rows[0]['numel']:,} values), requested density {args.density:.2%}, "
          f"correlation {args.correlation}, {args.steps} steps; measured global density per step")
    print(f"t_select ms: rank 0's mean plan + selection time per step, one thread per rank on a machine with "
          f"{os.cpu_count()} cores (more ranks than cores oversubscribe): indicative only, not a scaling measurement")
    print(f"{'sparsifier':<10} {'n':>3} {'mean':>8} {'min':>8} {'max':>8} {'last':>8} {'x requested':>12} "
          f"{'t_select ms':>12}")
    for row in rows:
        d = row["densities"]
        mean = sum(d) / len(d)
        print(f"{row['sparsifier']:<10} {row['workers']:>3} {mean:>8.3%} {min(d):>8.3%} {max(d):>8.3%} {d[-1]:>8.3%} "
              f"{mean / row['requested']:>12.2f} {row['t_select_ms']:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
