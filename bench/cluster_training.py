"""What the time-to-quality benchmarks on the emulated cluster share (bench/cluster_convergence.py,
bench/cluster_lm.py): the methods and how a DDP model gets each one's hook, the timed training loop
whose evaluations are left out of the clock, the two sides of the compute : all-reduce ratio, the
worker that runs every method in one process group, and the launch that writes a raw JSON.

A launch is one multi-node torchrun on a new cluster (``cluster_steps.launch_on_cluster``) running
``SCRIPT --worker CFG`` on every node; the worker (:func:`run_worker`) trains every method of
``cfg["methods"]`` in turn from the same seed, then measures the ratio, and rank 0 prints one
``RESULT`` line that :func:`launch_to_raw` writes to ``raw/STEM.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn


def check_launch_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks every launch's options share: ``--warmup`` (dense steps: PowerSGD needs >= 2),
    ``--batch`` (global, split over ``--nodes``), ``--bandwidth`` (a rate: it names the launch) and
    ``--tag`` (part of a file name); each error names its option (``p.error``)."""
    if args.warmup < 2:
        p.error(f"--warmup must be >= 2 (PowerSGD's start_powerSGD_iter), got {args.warmup}")
    if args.batch % args.nodes:
        p.error(f"--batch {args.batch} must be a multiple of --nodes {args.nodes}")
    if args.bandwidth is None and not (args.report or args.worker):
        p.error("--bandwidth none: the launches are named by their rate; give one")
    if not re.fullmatch(r"[\w.-]*", args.tag):
        p.error(f"--tag must be letters, digits, '_', '.', '-', got {args.tag!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


# -- the methods ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One way to exchange DDP's gradient. ``kind``: "allreduce" (DDP's own), "powersgd" (torch's
    hook, ``rank`` its matrix_approximation_rank, one bucket: it aborts on gloo with several), or a
    DeftState sparsifier ("topk", "deft", ...) at ``density`` with ``options`` passed on to
    ``DeftState`` (e.g. ``{"plan": "ahead"}``)."""

    kind: str
    density: float | None = None
    rank: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "powersgd" and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank: PowerSGD needs a positive matrix approximation rank, got {self.rank!r}")
        if self.kind not in ("allreduce", "powersgd") and not (isinstance(self.density, float) and 0 < self.density <= 1):
            raise ValueError(f"density: sparsifier {self.kind!r} needs a float in (0, 1], got {self.density!r}")

    @property
    def sparse(self) -> bool:
        return self.kind not in ("allreduce", "powersgd")

    def describe(self) -> dict:
        return {"kind": self.kind, "density": self.density, "rank": self.rank, "options": dict(self.options)}

    def rejected(self) -> str | None:
        """None if the installed deft_kernels runs this method, else why not (one line): a DeftState
        that does not take one of ``options`` (a protocol of a newer version) says so here."""
        if not self.sparse:
            return None
        from deft_kernels import DeftState

        try:
            DeftState(sparsifier=self.kind, density=self.density, warmup_steps=1, **self.options)
        except (TypeError, ValueError) as e:
            given = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            return f"the installed DeftState rejects sparsifier={self.kind!r}{', ' + given if given else ''}: {e}"
        return None

    def attach(self, module, warmup: int, seed: int):
        """``module`` in DDP with this method's hook, dense for the first ``warmup`` steps (>= 2:
        PowerSGD's start_powerSGD_iter; DeftState's warmup_steps). Returns (ddp, hook state or None)."""
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        from deft_kernels import DeftState, deft_hook

        if self.kind == "allreduce":
            return DDP(module), None
        if self.kind == "powersgd":
            ddp = DDP(module, bucket_cap_mb=10_000)
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=self.rank,
                                                start_powerSGD_iter=warmup, random_seed=seed)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
            return ddp, state
        ddp = DDP(module)
        state = DeftState(sparsifier=self.kind, density=self.density, warmup_steps=warmup, **self.options)
        ddp.register_comm_hook(state, deft_hook)
        return ddp, state

    def exchange_bytes(self, state, numel: int, steps_done: int, warmup: int) -> float:
        """What the exchange says it handed to the collectives in its first ``steps_done`` steps:
        ``numel`` fp32 values a dense step (all-reduce's every step, the others' ``warmup``), and what
        PowerSGD (its factors and uncompressed tensors) or DeftState (``bytes_sent``) counts after."""
        dense = 4.0 * numel * (steps_done if self.kind == "allreduce" else min(steps_done, warmup))
        if self.kind == "allreduce":
            return dense
        if self.kind == "powersgd":
            return dense + 4.0 * state.total_numel_after_compression
        return dense + float(state.compression_stats()["bytes_sent"])


def split_runnable(methods: dict[str, Method], names: list[str]) -> tuple[list[str], dict[str, str]]:
    """``names`` this installation runs, and {name: why not} for the others."""
    skipped = {name: why for name in names if (why := methods[name].rejected())}
    return [name for name in names if name not in skipped], skipped


# -- in each node ---------------------------------------------------------------------------------------

def wire_tx_bytes() -> int | None:
    """The node's veth transmit counter on the emulated cluster (None elsewhere: loopback is shared)."""
    if "DEFT_CLUSTER_NODE" not in os.environ:
        return None
    from cluster_steps import _counters

    return _counters(os.environ["GLOO_SOCKET_IFNAME"])[0]


def timed_training(step: Callable[[int], float], evaluate: Callable[[int], dict], steps: int, eval_every: int,
                   warmup: int, exchanged: Callable[[int], float] = lambda done: 0.0) -> dict:
    """Run ``step(i)`` (one training step, returns its loss) for ``steps`` steps on every rank; every
    ``eval_every`` steps and at the end the ranks meet and ``evaluate(step)`` runs (on every rank; it
    may use collectives), and that pause is left out of the clock. Returns the curve (one point per
    evaluation, step 0 first: ``time_s``, the mean training loss since the previous point, the node's
    transmitted bytes and ``exchanged(step)`` so far, and what ``evaluate`` returned), the training time,
    and the step times and per-step bytes sent after the ``warmup`` dense steps."""
    import torch.distributed as dist

    curve, step_times, tx_steps, losses, paused = [], [], [], [], 0.0
    dist.barrier()
    tx0 = wire_tx_bytes()
    start = time.perf_counter()

    def point(done: int, elapsed: float) -> None:
        tx = wire_tx_bytes()
        curve.append({"step": done, "time_s": elapsed, "train_loss": statistics.mean(losses) if losses else None,
                      "wire_tx_bytes": None if tx is None else tx - tx0, "exchange_bytes": exchanged(done),
                      **evaluate(done)})
        losses.clear()

    point(0, 0.0)
    for i in range(steps):
        tx = wire_tx_bytes()
        t = time.perf_counter()
        losses.append(step(i))
        step_times.append(time.perf_counter() - t)
        if tx is not None:
            tx_steps.append(wire_tx_bytes() - tx)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            dist.barrier()
            pause = time.perf_counter()
            point(i + 1, pause - start - paused)
            dist.barrier()
            paused += time.perf_counter() - pause
    return {"curve": curve, "train_time_s": time.perf_counter() - start - paused, "steps": steps,
            "median_step_ms": 1e3 * statistics.median(step_times[warmup:] or step_times),
            "step_ms": [1e3 * t for t in step_times],
            "median_tx_bytes_per_step": statistics.median(tx_steps[warmup:]) if tx_steps[warmup:] else None}


def compute_and_allreduce(step: Callable[[int], Any], numel: int, repeats: int = 20) -> dict:
    """The two sides of the ratio that says whether all-reduce is communication-bound: ``step(i)``, a
    training step of this rank's batch with no communication, and the all-reduce of ``numel`` fp32
    values (the model's gradient) alone; medians, the first of each left out."""
    import torch
    import torch.distributed as dist

    compute, reduce = [], []
    for i in range(repeats + 1):
        t = time.perf_counter()
        step(i)
        compute.append(time.perf_counter() - t)
    grad = torch.zeros(numel)
    for _ in range(repeats // 4 + 1):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(grad)
        reduce.append(time.perf_counter() - t)
    return {"compute_ms": 1e3 * statistics.median(compute[1:]), "allreduce_alone_ms": 1e3 * statistics.median(reduce[1:])}


def run_worker(cfg: dict, train: Callable[[str, int, int], dict], ratio: Callable[[int, int], dict]) -> NoReturn:
    """A rank's whole launch: a gloo group (timeout ``cfg["pg_timeout"]`` s, default 120), ``train(method,
    rank, world)`` for every method of ``cfg["methods"]`` in turn, then ``ratio(rank, world)``; rank 0
    prints ``RESULT {"runs": [...], **ratio}``. DDP models are dropped and collected after each method
    and the ranks meet before the group is destroyed (docs/operations.md, step 6); then the process
    leaves with ``os._exit(0)``, skipping the interpreter's teardown: there, now and then, a rank
    aborted ("terminate called without an active exception", exit -6) after its work was done, even
    one that had run no DDP (2 of 8 dry runs of bench/cluster_lm.py with every method, 1 of 6 of its
    calibrations here), and the other nodes' torchrun agents then waited 300 s in their exit barrier."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.get("pg_timeout", 120)))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for method in cfg["methods"]:
        rows.append(train(method, rank, world))
        gc.collect()
        print(f"rank {rank}: {method} {rows[-1]['train_time_s']:.1f} s", file=sys.stderr, flush=True)
    measured = ratio(rank, world)
    if rank == 0:
        print("RESULT " + json.dumps({"runs": rows, **measured}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- the launcher -----------------------------------------------------------------------------------------

def launch_to_raw(script: str, cfg: dict, args: argparse.Namespace, raw: Path, stem: str) -> dict | None:
    """One launch of ``script`` on a new cluster (``args.nodes``, ``args.bandwidth``, ``args.prefix``,
    ``args.timeout``); rank 0's result with the launch's facts under "config" (the machine's load
    averages at start and end among them: others' work shows there), written to ``raw/stem.json``
    and returned; None when it did not come back (the launcher said why)."""
    from cluster_steps import launch_on_cluster

    load = os.getloadavg()
    run = launch_on_cluster(script, cfg, args, raw, stem, expect=1)  # rank 0 reports
    if run is None:
        return None
    out = {"config": {**run["config"], "load_average_start": load, "load_average_end": os.getloadavg()},
           **run["results"][0]}
    (raw / f"{stem}.json").write_text(json.dumps(out, indent=1))
    print(f"{stem}: {out['config']['wall_s']:.0f} s; {raw / stem}.json")
    return out


def time_to(curve: list[dict], key: str, reached: Callable[[float], bool]) -> float | None:
    """The training time of the first point of ``curve`` whose ``key`` is ``reached``, else None."""
    return next((p["time_s"] for p in curve if p[key] is not None and reached(p[key])), None)
