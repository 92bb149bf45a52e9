"""DEFT's DDP hook against PyTorch's PowerSGD hook and plain all-reduce (DDP without a hook), on
bench/convergence.py's digits MLP with gloo workers on the CPU.

    python bench/compare_hooks.py                           # 2 workers, 25 epochs: the run to quote
    python bench/compare_hooks.py --epochs 1 --warmup 5     # a check that it runs (seconds)

Each hook trains the same model from the same initial weights on the same data in the same order,
with the same dense warm-up (``--warmup`` steps: DEFT's ``warmup_steps``, PowerSGD's
``start_powerSGD_iter``). Reported per hook: the bytes each worker hands to the collectives per
step after the warm-up (all-reduce: every fp32 gradient value; PowerSGD: its P and Q factors plus
the tensors it leaves uncompressed, from ``PowerSGDState``'s counts; DEFT: its int64 indices and
fp32 values, ``compression_stats()['bytes_sent']``), the median wall time of a training step after
the warm-up (forward, backward with communication, optimizer), and the final training loss and
held-out accuracy. The model (50,826 parameters) fits one DDP bucket: with several buckets on gloo,
PyTorch's PowerSGD hook aborted the process at its first compressed step here (torch 2.13.0, gloo
"Received data size doesn't match expected size"; with one bucket it ran).
Results go to OUT.{json,txt}, ``--out`` OUT being deft-bench-results/compare_hooks_digits by
default and bench/results/compare_hooks_digits for the committed files.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from convergence import build_model, run_workers, write_results
from deft_kernels import DeftState, deft_hook
from deft_kernels.benchmarks import DEFAULT_OUT

HOOKS = ("allreduce", "powersgd", "deft")


def attach(name: str, ddp: DDP, args):
    """Register hook ``name`` on ``ddp``; returns a function giving the bytes this worker has handed
    to the collectives in the compressed steps so far, or None for plain all-reduce."""
    if name == "allreduce":
        return None
    if name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank,
                                            start_powerSGD_iter=args.warmup, random_seed=args.seed)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return lambda: 4 * state.total_numel_after_compression
    state = DeftState(sparsifier="deft", density=args.density, warmup_steps=args.warmup)
    ddp.register_comm_hook(state, deft_hook)
    return lambda: state.compression_stats()["bytes_sent"]


def train_one(name: str, rank: int, world_size: int, args, data) -> dict:
    x_train, y_train, x_test, y_test = data
    model = build_model(args.seed)
    ddp = DDP(model)
    numel = sum(p.numel() for p in model.parameters())
    sent = attach(name, ddp, args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    per_rank = args.batch // world_size
    order = torch.Generator().manual_seed(args.seed)
    step, times, sent_per_step = 0, [], []
    for _ in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=order)  # same on every rank, every hook
        for b in range(len(perm) // args.batch):
            idx = perm[b * args.batch + rank * per_rank: b * args.batch + (rank + 1) * per_rank]
            before = sent() if sent else 0
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(ddp(x_train[idx]), y_train[idx]).backward()
            opt.step()
            seconds = time.perf_counter() - start
            if step >= args.warmup:
                times.append(seconds)
                sent_per_step.append(sent() - before if sent else 4 * numel)
            step += 1
    with torch.no_grad():
        train_loss = F.cross_entropy(model(x_train), y_train).item()
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"hook": name, "numel": numel, "steps": step, "measured_steps": len(times),
            "bytes_per_step": statistics.mean(sent_per_step) if sent_per_step else None,
            "step_ms": 1e3 * statistics.median(times) if times else None,
            "train_loss": train_loss, "test_acc": test_acc}


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["hook"] == "allreduce"), None)
    lines = [f"{'hook':<10} {'bytes/step/worker':>18} {'vs all-reduce':>14} {'step ms':>8} {'train loss':>10} "
             f"{'test acc':>9}"]
    for r in rows:
        ratio = f"{r['bytes_per_step'] / dense['bytes_per_step']:.4f}x" if dense and r["bytes_per_step"] else "-"
        step_ms = f"{r['step_ms']:.2f}" if r["step_ms"] is not None else "-"
        sent = f"{r['bytes_per_step']:,.0f}" if r["bytes_per_step"] is not None else "-"
        lines.append(f"{r['hook']:<10} {sent:>18} {ratio:>14} {step_ms:>8} {r['train_loss']:>10.4f} "
                     f"{100 * r['test_acc']:>8.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--density", type=float, default=0.01, help="DEFT's density")
    p.add_argument("--rank", type=int, default=1, help="PowerSGD's matrix_approximation_rank")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--warmup", type=int, default=20, help="dense steps first (PowerSGD needs at least 2)")
    p.add_argument("--batch", type=int, default=64, help="global batch, split over the workers")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    p.add_argument("--timeout", type=float, default=900, help="seconds before the workers are killed")
    p.add_argument("--out", default=f"{DEFAULT_OUT}/compare_hooks_digits", help="path without extension")
    args = p.parse_args(argv)
    if args.workers < 2 or args.batch % args.workers:
        p.error("--workers must be >= 2 and divide --batch")
    if args.warmup < 2 or args.epochs < 1 or args.rank < 1 or not 0 < args.density <= 1:
        p.error("--warmup must be >= 2, --epochs and --rank >= 1, --density in (0, 1]")

    rows = run_workers(train_one, args.workers, args.timeout, args, args.hooks)
    command = "python bench/compare_hooks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# {command.strip()}\n# digits, MLP 64-256-128-10 ({rows[0]['numel']:,} params, one DDP bucket), "
              f"{args.workers} gloo workers (CPU), {args.epochs} epochs, global batch {args.batch}, warm-up "
              f"{args.warmup} dense steps, DEFT density {args.density}, PowerSGD rank {args.rank}, seed {args.seed}, "
              f"torch {torch.__version__}\n")
    write_results(header + table(rows) + "\n", command, args, rows)


if __name__ == "__main__":
    main()
