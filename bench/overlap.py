"""How much of backward the DDP hook's exchange hides: gloo ranks on CPU, a model with several DDP
buckets, the wall time of ``loss.backward()`` (which ends when DDP has every bucket's result) per
iteration with

- ``alone``: a hook that returns each bucket as it is, no communication: backward by itself;
- ``ddp``: no hook, DDP's own all-reduce (overlapped by DDP);
- ``blocking``: the DEFT hook, waiting in the hook for each bucket's exchange before backward goes on
  (what the hook did before its steps were chained on futures): nothing overlaps;
- ``async``: the DEFT hook as it is: each bucket's step chained on its collectives' futures, the next
  bucket's backward running meanwhile.

``hidden = (blocking - async) / (blocking - alone)``: the fraction of the exchange's own time that
ran during backward. An exchange on CPU is mostly CPU work (accumulate, selection, gloo's copies), so
it can only hide behind backward where each rank has a spare core: run with ``ranks x (threads + 1)``
cores free (the table prints the machine's cores and load).

    .venv/bin/python bench/overlap.py [--ranks 2] [--width 1024] [--layers 8] [--batch 64] [--bucket-mb 4]
                                      [--iters 20] [--sparsifier deft] [--density 0.01] [--threads 1]

Writes ``OUT/overlap_<sparsifier>_cpu.{txt,json}`` (``--out`` OUT: deft-bench-results/ by default,
bench/results for the committed files; the table; every iteration's times,
the command, the machine). Every spawn has a hard timeout.
"""

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook
from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.benchmarks.worker_count import machine_info
from deft_kernels.sparsifiers import SPARSIFIERS

MODES = ("alone", "ddp", "blocking", "async")


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])


# No `from __future__ import annotations` here: DDP checks the hooks' annotations as objects.


def _alone_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _blocking_hook(state: DeftState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = deft_hook(state, bucket)
    fut.wait()  # in the hook, never in a callback: backward waits for this bucket's exchange
    return fut


def _backward_times(mode: str, args: argparse.Namespace, rank: int) -> tuple[list[float], int]:
    """Seconds of each measured backward and the number of DDP buckets."""
    model = _model(args.width, args.layers)
    ddp = DDP(model, bucket_cap_mb=args.bucket_mb)
    state = DeftState(sparsifier=args.sparsifier, density=args.density, warmup_steps=args.warmup)
    if mode != "ddp":
        ddp.register_comm_hook(state, {"alone": _alone_hook, "blocking": _blocking_hook, "async": deft_hook}[mode])
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    times = []
    for it in range(args.warmup + 1 + args.iters):  # DEFT's warm-up, DDP's bucket rebuild, then measured
        loss = ddp(x).square().mean()
        dist.barrier()  # the ranks start backward together
        start = time.perf_counter()
        loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad()
        if it > args.warmup:
            times.append(seconds)
    buckets = len(state.state_dict()["buckets"]) if mode in ("blocking", "async") else 0
    return times, buckets


def rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        record = {mode: _backward_times(mode, args, rank) for mode in MODES}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: argparse.Namespace, out_dir: str) -> list[dict]:
    ctx = mp.start_processes(rank_main, args=(args.ranks, _free_port(), args, out_dir), nprocs=args.ranks,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + args.timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {args.ranks} ranks did not finish in {args.timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(args.ranks)]


def summarize(ranks: list[dict]) -> dict:
    """Per mode, the median over iterations of the slowest rank's backward; the hidden fraction."""
    per_mode = {}
    for mode in MODES:
        iterations = zip(*(r[mode][0] for r in ranks))
        per_mode[mode] = statistics.median(max(its) for its in iterations)
    exchange = per_mode["blocking"] - per_mode["alone"]
    hidden = (per_mode["blocking"] - per_mode["async"]) / exchange if exchange > 0 else None
    return {"backward_s": per_mode, "exchange_s": exchange, "hidden": hidden, "buckets": ranks[0]["async"][1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--width", type=int, default=1024, help="features of each Linear layer")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bucket-mb", type=float, default=4.0, help="DDP bucket_cap_mb (4 MB: one bucket per 1024x1024 layer)")
    p.add_argument("--iters", type=int, default=20, help="measured iterations per mode")
    p.add_argument("--warmup", type=int, default=2, help="the hook's dense warm-up iterations")
    p.add_argument("--sparsifier", default="deft", choices=sorted(set(SPARSIFIERS) - {"threshold"}))
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for name in ("ranks", "width", "layers", "batch", "iters", "warmup", "threads"):
        if getattr(args, name) < (2 if name == "ranks" else 1):
            p.error(f"--{name} must be at least {2 if name == 'ranks' else 1}, got {getattr(args, name)}")
    if not 0 < args.density <= 1 or args.bucket_mb <= 0 or args.timeout <= 0:
        p.error("--density must lie in (0, 1]; --bucket-mb and --timeout must be positive")

    machine = machine_info("cpu")
    cores, load_start = machine["cpus_usable"], machine["load_average_start"][0]
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_ranks(args, tmp)
    summary = summarize(ranks)
    load_end = os.getloadavg()[0]
    command = "python bench/overlap.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    params = sum(q.numel() for q in _model(args.width, args.layers).parameters())
    lines = [f"{command}",
             f"{args.ranks} gloo ranks x {args.threads} thread(s), {cores} cores, load average {load_start:.2f} -> "
             f"{load_end:.2f}; MLP {args.layers} x {args.width}^2 ({params:,} parameters, "
             f"{summary['buckets']} DDP buckets), batch {args.batch}, {args.sparsifier} at d = {args.density:g}; "
             f"median over {args.iters} iterations of the slowest rank",
             "",
             f"{'backward with':<34}{'ms':>9}"]
    labels = {"alone": "no communication (backward alone)", "ddp": "DDP's own all-reduce",
              "blocking": f"{args.sparsifier} hook, blocking", "async": f"{args.sparsifier} hook, async (chained)"}
    for mode in MODES:
        lines.append(f"{labels[mode]:<34}{1e3 * summary['backward_s'][mode]:>9.2f}")
    hidden = summary["hidden"]
    lines.append(f"\nexchange alone (blocking - backward alone): {1e3 * summary['exchange_s']:.2f} ms; hidden by the "
                 f"async hook: {'n/a' if hidden is None else f'{100 * hidden:.0f}%'}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"overlap_{args.sparsifier}_cpu"
    Path(f"{stem}.txt").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps({
        "command": command, "config": vars(args), "parameters": params,
        "machine": machine | {"load_average_end": load_end}, "summary": summary, "ranks": ranks},
        indent=1) + "\n")
    print(f"wrote {stem}.txt, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
