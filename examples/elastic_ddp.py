"""Training that survives a lost node: the DEFT hook under ``torchrun --max-restarts``, a checkpoint
per rank every few steps (model, optimizer and that rank's DeftState), resumption from the newest
checkpoint all ranks completed. docs/operations.md gives the recipe; tests/test_cluster_faults.py and
bench/cluster_soak.py run this script on the emulated cluster and inject faults.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
    torchrun --nnodes 2 --nproc-per-node 1 --max-restarts 3 --rdzv-backend c10d \\
        --rdzv-endpoint NODE0:29400 --rdzv-id job1 examples/elastic_ddp.py --ckpt ckpt --steps 200
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 2 --max-restarts 3 \\
        examples/elastic_ddp.py --ckpt ckpt --run-id job2

The checkpoints of a run live under ``CKPT/<run id>`` (``--run-id``, by default torchrun's
``--rdzv-id``: the same across the restarts of one torchrun, which is what ``--max-restarts`` needs;
``--standalone`` draws a new one per launch, so pass ``--run-id`` to resume a run in a new launch).

(Without ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, torchrun keeps one store across restarts and a
restarted group can read the previous round's addresses: deft_kernels.elastic.check_restart_store.)

Batches are a function of (seed, rank, step), so a resumed run sees the batches an uninterrupted one
would. Each rank prints ``start``, one ``step`` line per iteration and, when a peer is lost, a
``failure`` line naming it (then exits non-zero, and torchrun restarts the group). With ``--out``,
every rank also keeps a ledger of error feedback's conservation over the sparse steps, saved in
the checkpoints: sum over ranks of the local gradients = n x sum of the applied updates + sum over
ranks of the residuals, which a lost residual would break; the end checks it and writes the final
parameters to ``OUT/final_rank<r>.pt``.
"""

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook
from deft_kernels.elastic import PeerFailure, load_checkpoint, naming_failures, rank_addresses, save_checkpoint
from deft_kernels.metrics import CsvSink, Metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder, shared by the nodes or each node's own")
    p.add_argument("--run-id", default=os.environ.get("TORCHELASTIC_RUN_ID"),
                   help="the run's identity in --ckpt (default: torchrun's --rdzv-id)")
    p.add_argument("--steps", type=int, default=200, help="iterations in all")
    p.add_argument("--every", type=int, default=10, help="checkpoint every this many iterations")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest)")
    p.add_argument("--timeout", type=float, default=15.0, help="training group's timeout, seconds")
    p.add_argument("--join-timeout", type=float, default=120.0, help="default group's timeout (joining), seconds")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=5, help="dense warm-up iterations")
    p.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the final parameters and the conservation check")
    p.add_argument("--metrics", help="folder for each rank's metrics CSV (appended across restarts)")
    args = p.parse_args(argv)
    if args.run_id is None:
        p.error("--run-id is required outside torchrun")
    return args


def batch(seed: int, rank: int, step: int, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: a function of (seed, rank, step) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 100_003 + step)
    x = torch.randn(64, teacher.shape[0], generator=g)
    return x, (x @ teacher).argmax(dim=1)


class Ledger:
    """Per parameter, over the sparse iterations: this rank's local gradients (read in the hook,
    before the exchange) and the updates applied (``p.grad`` after backward)."""

    def __init__(self, model: nn.Module, state: DeftState, hook) -> None:
        self.params = list(model.parameters())
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.applied = [torch.zeros_like(p) for p in self.params]
        self.first_order: list[int] = []  # parameter indices in the DDP model's first iteration (DeftState's positions)
        self.first_done = False
        self.state, self.inner = state, hook

    def hook(self, state, bucket):
        if not self.first_done:
            self.first_order += [self.index[id(p)] for p in bucket.parameters()]
            self.first_done = bucket.is_last()
        if state.iter >= state.warmup_steps:
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                self.grads[self.index[id(p)]] += g
        return self.inner(state, bucket)

    def after_backward(self, step: int) -> None:
        if step >= self.state.warmup_steps:
            for total, p in zip(self.applied, self.params):
                total += p.grad

    def residuals(self) -> list[torch.Tensor]:
        """This rank's residual, per parameter (zero for a parameter no bucket holds yet)."""
        out = [torch.zeros_like(p) for p in self.params]
        for b in self.state.state_dict()["buckets"].values():
            for pos, part in zip(b["positions"], b["sparsifier"]["residual"].split(b["sizes"])):
                out[self.first_order[pos]].copy_(part.view_as(out[self.first_order[pos]]))
        return out

    def state_dict(self) -> dict:
        return {"grads": self.grads, "applied": self.applied}

    def load_state_dict(self, saved: dict) -> None:
        for mine, theirs in zip(self.grads + self.applied, saved["grads"] + saved["applied"]):
            mine.copy_(theirs)

    def check(self, world_size: int) -> dict:
        """All-reduce the ledger and compare: sum_r grads = n * applied + sum_r residuals."""
        flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
        grads, residuals, applied = flat(self.grads), flat(self.residuals()), flat(self.applied)
        dist.all_reduce(grads, group=self.state.process_group)
        dist.all_reduce(residuals, group=self.state.process_group)
        error = grads - (world_size * applied + residuals)
        return {"mass": float(grads.norm()), "residual": float(residuals.norm()), "error": float(error.abs().max())}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    # Two timeouts: joining waits for the slowest node to start (a restarted node imports torch
    # again), training must notice a silent peer soon: the training group's timeout bounds that.
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.join_timeout))
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.timeout))
    rank, n = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    addresses = rank_addresses(group)

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
                          nn.Linear(args.width, 10))
    teacher = torch.randn(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = DeftState(group, sparsifier="deft", density=args.density, warmup_steps=args.warmup)
    start, extra = load_checkpoint(args.ckpt, run_id=args.run_id, model=model, optimizer=optimizer, state=state,
                                   group=group)
    print(f"start rank={rank} attempt={attempt} resumed={start} addresses={','.join(addresses)}", flush=True)

    ddp = DDP(model, bucket_cap_mb=0.5, process_group=group)
    hook = deft_hook
    metrics = None
    if args.metrics:
        Path(args.metrics).mkdir(parents=True, exist_ok=True)
        metrics = Metrics(state, sinks=[CsvSink(Path(args.metrics) / f"rank{rank}.csv")])
        hook = metrics.hook
    ledger = Ledger(model, state, hook) if args.out else None
    if ledger is not None and extra is not None:
        ledger.load_state_dict(extra)
    ddp.register_comm_hook(state, ledger.hook if ledger else hook)

    for step in range(start, args.steps):
        x, y = batch(args.seed, rank, step, teacher)
        try:
            with naming_failures(step, addresses):
                optimizer.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
        except PeerFailure as e:
            print(f"failure rank={rank} t={time.time():.3f} step={step} cause={e.cause} peer={e.peer} | {e}",
                  file=sys.stderr, flush=True)
            raise
        if ledger is not None:
            ledger.after_backward(step)
        optimizer.step()
        print(f"step rank={rank} step={step} loss={loss.item():.5f} t={time.time():.3f}", flush=True)
        if (step + 1) % args.every == 0:
            save_checkpoint(args.ckpt, step + 1, run_id=args.run_id, model=model, optimizer=optimizer, state=state,
                            extra=ledger.state_dict() if ledger else None, keep=args.keep, group=group)

    if args.out:
        report = ledger.check(n)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save([p.detach().clone() for p in model.parameters()], out / f"final_rank{rank}.pt")
        print("done " + json.dumps(dict(report, rank=rank, attempt=attempt, resumed=start)), flush=True)
    if metrics is not None:
        metrics.close()
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
