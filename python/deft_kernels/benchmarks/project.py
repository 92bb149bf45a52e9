"""deft-bench project: will DEFT pay off on my cluster? The predicted training step of all-reduce,
PowerSGD and every sparsifier on ``n`` workers, up to thousands, on a network you describe.

    deft-bench project [--model resnet50] [--workers 8 16 ... 1024] [--preset eth25 ib400 ...]
                       [--bandwidth GBPS ...] [--compute-ms MS] [--out deft-bench-results]

Two stages, the model of the step in :mod:`~deft_kernels.benchmarks.perf_model`
(docs/performance_model.md):

1. **Profile** (measured on this machine, cached in ``--cache-dir``; minutes, once per model and
   density): the model's real gradients (``--distinct-gradients`` of them, from distinct batches,
   cached to a file) and the norms of their slices; forward and backward time of one batch; then
   for every sparsifier and every ``--sim-workers`` ``n``, consecutive steps of ``n`` ranks in
   lockstep with the driver's own step (:func:`deft_kernels.driver.step_program`), recording every
   collective the step asks for with the bytes :class:`deft_kernels.driver.TorchCollectives` would
   put on the wire (a recording stand-in for ``torch.distributed``), the size of the union and every
   rank's proposal count; DEFT's plan of every DDP bucket at every projected ``n``, made and timed
   here on the projected layout from the measured gradient's norms; PowerSGD's matrix shapes and the
   time its hook adds to backward (:func:`time_powersgd_hook`).
2. **Projection** (seconds): per network, worker count and method, the step and its parts from the
   profile, the selection times (the worker-count benchmark's JSON: ``--selection-json``, the
   committed one, or measured here when missing) and the laws that carry them past the measured
   ``n``; DEFT's break-even line rate per ``n``, for each of its plan protocols; a verdict in words
   per network and ``n``, the assumptions with their sources, and what the cache holds.

Writes ``project_<model>[_<layout>].{txt,json,png}`` under ``--out`` (the plot needs the
``deft_kernels[bench]`` extra; ``--no-plot`` does without). Bad options stop at once with one line
naming the option, exit status 2; so does a missing input that ``--no-measure`` forbids measuring.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from .. import driver, planning, sparsifiers
from ..driver import collectives as collectives_module
from . import DEFAULT_OUT, layouts, models
from . import perf_model as pm
from .worker_count import calibrated_threshold, machine_info, sparsifier_options

__all__ = ["main", "build_parser", "parse_args", "PRESETS", "network_of", "record_sequence",
           "size_rules", "bucket_assignment", "build_profile", "project", "format_table", "verdicts"]

#: Methods besides the sparsifiers: DDP's own all-reduce (the baseline) and torch's PowerSGD hook.
BASELINES = ("allreduce", "powersgd")
DEFAULT_WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_SIM_WORKERS = (1, 2, 4, 8, 16)
#: DEFT's plan protocols (``DEFT(plan=...)``): "ahead", every rank makes the next step's plan from
#: the norms summed in this step's value all-reduce, off the critical path, two collectives per
#: bucket; "leader", the paper's: the leader plans from its own norms and broadcasts it, four
#: collectives per bucket, host reads inside the step.
DEFT_PLANS = ("ahead", "leader")
#: DEFT's protocol when none is named (the sparsifier's own default).
DEFAULT_DEFT_PLAN = inspect.signature(sparsifiers.DEFT).parameters["plan"].default
#: Version of the profile's content (part of its cache key). 3: recorded by the driver that sends
#: int32 indices below 2^31 elements, a status slot with the plan and a status block of n slots with
#: the values, and makes the union of the proposals in the step (its time counted in ``other_ms``);
#: DEFT recorded with the paper's protocol (:func:`recorded_options`), as it ran before the plan one
#: step ahead existed.
PROFILE_SCHEMA = 3
#: Bytes per index on the wire that ``--index-bytes`` accepts (int32, int64).
INDEX_BYTES = (4, 8)
#: Line rates (Gb/s) searched for DEFT's break-even.
BREAK_EVEN_RANGE = (1e-3, 1e5)
#: DEFT against all-reduce at one n: faster below a bandwidth, or in the whole range, or nowhere;
#: on one node of a two-level network the inter-node link carries nothing.
CROSSES, ALWAYS, NEVER, ONE_NODE = "crosses", "always faster", "never faster", "one node"
#: Slices per tensor whose squared norms the profile keeps (DEFT's fragment norms at any n and on
#: any layout are read from them).
NORM_SLICES = 4096

_US = 1e-6
# Network presets (docs/performance_model.md, "Presets", gives the sources): the line rate per
# worker in Gb/s; the bus bandwidth is the line rate times --bus-efficiency (default 0.96: nccl-tests'
# bus bandwidth, 12 GB/s per 100 Gb/s NIC and 48-49 GB/s per 400 Gb/s NDR NIC); the latencies are
# NCCL's tuner's (perf_model.NCCL_VERSION), which prices RoCE and InfiniBand alike (its IB and
# socket plugins report no latency of their own). NVLink: 370 GB/s bus bandwidth (nccl-tests, H100).
LINE_RATES = {"eth10": 10, "eth25": 25, "eth100": 100, "eth400": 400, "ib100": 100, "ib200": 200, "ib400": 400}
DEFAULT_BUS_EFFICIENCY = 0.96
NVLINK = pm.Link(2 * _US, 370e9)
GPUS_PER_NODE = 8
#: The assumptions ``--without`` turns off, each with what it stands for (the sensitivity table).
ASSUMPTIONS = {
    "ring-broadcast": "NCCL broadcasts by ring only (n - 1 steps); off: the cheaper of a binomial tree and a chain",
    "pat": "NCCL's PAT all-gather with one GPU per node; off: ring only",
    "tree-derate": "the tree all-reduce's bandwidth derated as NCCL's tuner does (0.92 x a size correction); "
                   "off: the full bus bandwidth",
    "protocol-latency": "NCCL's tuner latencies per protocol (LL, LL128, Simple), the cheapest taken; off: one flat "
                        "10 us per inter-node step (2 us per NVLink step), no base latency",
    "tail": "the last bucket's exchange is never hidden; off: any of the exchange can hide behind backward",
    "hook-overlap": "each method overlaps backward as its hook runs (inline hooks: none); off: every method "
                    "overlaps fully",
}


def _network(name: str, gbps: float, latency_us: float, efficiency: pm.BusEfficiency,
             assumptions: pm.Assumptions, two_level: bool = False) -> pm.Network:
    inter = pm.Link(latency_us * _US, gbps * pm.GBIT)
    if two_level:
        return pm.Network(inter, NVLINK, GPUS_PER_NODE, name, efficiency=efficiency, assumptions=assumptions)
    return pm.Network(inter, name=name, efficiency=efficiency, assumptions=assumptions)


def presets(efficiency: pm.BusEfficiency | None = None, assumptions: pm.Assumptions | None = None) -> dict[str, pm.Network]:
    """The preset networks: flat ones of one GPU per node, and ``nvlink8+<flat>`` (8 GPUs per node on
    NVLink, each with its own link of that rate across nodes)."""
    eff = efficiency or pm.BusEfficiency.constant(DEFAULT_BUS_EFFICIENCY)
    a = assumptions or pm.Assumptions()
    out = {name: _network(name, g, 0.0, eff, a) for name, g in LINE_RATES.items()}
    out.update({f"nvlink8+{name}": _network(f"nvlink8+{name}", g, 0.0, eff, a, True) for name, g in LINE_RATES.items()})
    return out


PRESETS: dict[str, pm.Network] = presets()

#: Layouts (:mod:`~deft_kernels.benchmarks.layouts`) the projection can carry a measured model's
#: profile to: its sizes, with the measured laws taken as fractions of N (union, counts, PowerSGD's
#: factors) or scaled by N (compute, selection), and DEFT's plans made on it from the measured
#: gradient's norms (tensor by tensor, by name; a deeper transformer's layer ``i`` of ``L`` reads the
#: measured model's layer ``i * L_measured // L``).
LAYOUTS = {"gpt2_xl": layouts.gpt2_xl_layout, "resnet50_imagenet": layouts.resnet50_layout}


# --------------------------------------------------------------------------------------------------
# Command line.


def _exit_with_error(message: str) -> NoReturn:
    print(f"deft-bench project: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _number(kind: str, minimum: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a {kind} number, got {text!r}")
        return value
    return parse


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_bus_efficiency(items: list[str]) -> pm.BusEfficiency:
    """``["0.96"]`` (one value at every node count) or ``["2:0.96", "6:0.4", ...]`` (from that many
    nodes on, a step function)."""
    if len(items) == 1 and ":" not in items[0]:
        pairs = [("1", items[0])]
    else:
        pairs = [item.split(":", 1) if ":" in item else (None, item) for item in items]
    table = []
    for nodes, value in pairs:
        try:
            m, e = int(nodes), float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected EFFICIENCY or NODES:EFFICIENCY entries, got {' '.join(items)!r}") from None
        table.append((m, e))
    return pm.BusEfficiency(tuple(table))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage
        _exit_with_error(message)


def _default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deft_kernels", "project")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deft-bench project", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet50",
                   help=f"built-in model ({', '.join(models.names())}) or 'module:factory', whose gradients are measured")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default=None,
                   help="project onto this layout's sizes, carrying the model's measured laws (as fractions of N)")
    p.add_argument("--workers", type=_workers, nargs="+", default=list(DEFAULT_WORKERS), help="worker counts n")
    p.add_argument("--preset", nargs="+", default=[], help=f"networks: {', '.join(PRESETS)}")
    p.add_argument("--bandwidth", type=_number("positive", 0, True), nargs="+", default=[],
                   help="flat networks (one GPU per node) of this line rate per worker, Gb/s")
    p.add_argument("--latency", type=_number("non-negative", 0, False), default=0.0,
                   help="the network's own latency per inter-node step, microseconds, added to NCCL's tuner's "
                        "(which NCCL's IB and socket plugins leave at 0)")
    p.add_argument("--bus-efficiency", nargs="+", default=[f"{DEFAULT_BUS_EFFICIENCY:g}"],
                   help="bus bandwidth / line rate: one value, or NODES:VALUE entries (a step function of the node "
                        "count). Default: nccl-tests' 12 of 12.5 GB/s per 100 Gb/s NIC, two nodes")
    p.add_argument("--without", nargs="+", default=[], choices=sorted(ASSUMPTIONS), metavar="ASSUMPTION",
                   help=f"turn modelling assumptions off: {', '.join(ASSUMPTIONS)}")
    p.add_argument("--sparsifiers", nargs="+", default=["all"],
                   help=f"sparsifiers besides {' and '.join(BASELINES)}, or 'all'")
    p.add_argument("--deft-plan", nargs="+", choices=DEFT_PLANS, default=list(DEFT_PLANS),
                   help="DEFT's plan protocols to price (DEFT(plan=...))")
    p.add_argument("--density", type=_number("positive", 0, True), default=0.01, help="requested density d")
    p.add_argument("--compute-ms", type=_number("positive", 0, True), default=None,
                   help="forward + backward per step, ms (default: measured here, one batch of the model)")
    p.add_argument("--backward-fraction", type=_number("non-negative", 0, False), default=None,
                   help="backward's share of the compute (default: measured here)")
    p.add_argument("--overlap", type=_number("non-negative", 0, False), default=None,
                   help="fraction of the exchange (but the last bucket's) that can run during backward, for every "
                        "method (default: each hook as it runs on NCCL; bench/overlap.py measures it on gloo)")
    p.add_argument("--selection-json", default=None,
                   help="the worker-count benchmark's JSON giving selection times "
                        "(default: bench/results/worker_count_<model>_cpu.json, else measured here and cached)")
    p.add_argument("--selection-scale", type=_number("non-negative", 0, False), default=1.0,
                   help="multiply every selection and compression time (0: free, a bound for a faster device)")
    p.add_argument("--no-measure", action="store_true",
                   help="never measure a missing input here (the selection times): stop, naming the command to run")
    p.add_argument("--bucket-mb", type=_number("positive", 0, True), default=None,
                   help="DDP's bucket_cap_mb: every bucket that size (default: DDP's defaults, a first bucket of 1 MiB, "
                        "then 25 MiB)")
    p.add_argument("--buckets", type=_workers, default=None,
                   help="this many buckets of about equal size instead of DDP's assignment")
    p.add_argument("--bucket-sizes", type=_workers, nargs="+", default=None,
                   help="elements per bucket, in the order DDP makes them ready (a run's own buckets)")
    p.add_argument("--powersgd-rank", type=_workers, default=1, help="PowerSGD's matrix_approximation_rank")
    p.add_argument("--index-bytes", type=int, default=None,
                   help="bytes per index in the proposals' all-gather, 4 or 8 (default: as the driver sends them: "
                        "4 below 2^31 elements, else 8; 8 models the driver before int32 indices)")
    p.add_argument("--collective-overhead", type=_number("non-negative", 0, False), default=0.0,
                   help="fixed cost of every collective call, ms, beyond its latency terms "
                        "(bench/validate_projection.py --collective-overhead sync calibrates one)")
    p.add_argument("--sim-workers", type=_workers, nargs="+", default=list(DEFAULT_SIM_WORKERS),
                   help="worker counts simulated in lockstep to measure the union and the collectives")
    p.add_argument("--distinct-gradients", type=_workers, default=16,
                   help="real gradients from distinct batches (at least the largest --sim-workers)")
    p.add_argument("--sim-steps", type=_workers, default=3, help="measured lockstep steps per (sparsifier, n)")
    p.add_argument("--sim-warmup", type=int, default=3, help="unmeasured lockstep steps first")
    p.add_argument("--train-steps", type=int, default=2, help="SGD steps before the gradients are taken")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_workers, default=1, help="torch threads for the measurements")
    p.add_argument("--cache-dir", default=_default_cache_dir(), help="where gradients and profiles are cached")
    p.add_argument("--profile-out", default=None, help="also write the profile (the measured inputs) to this JSON")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="directory for the .txt, .json and .png (bench/results: the committed ones)")
    p.add_argument("--tag", default="", help="suffix of the output files' names (several scenarios of one model)")
    p.add_argument("--no-plot", action="store_true", help="no .png (then matplotlib is not needed)")
    return p


def network_of(name: str) -> pm.Network:
    """A preset network by name (bus efficiency 0.96, every assumption on)."""
    if name not in PRESETS:
        raise KeyError(name)
    return PRESETS[name]


def assumptions_of(without: list[str]) -> pm.Assumptions:
    """The collective model's assumptions with those named in ``without`` turned off."""
    unknown = sorted(set(without) - set(ASSUMPTIONS))
    if unknown:
        raise ValueError(f"unknown assumption {unknown[0]!r}; known: {', '.join(ASSUMPTIONS)}")
    return pm.Assumptions(ring_broadcast="ring-broadcast" not in without, pat="pat" not in without,
                          tree_derate="tree-derate" not in without, protocol_latency="protocol-latency" not in without)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = "deft-bench project " + shlex.join(argv)
    for name in args.preset:
        if name not in PRESETS:
            parser.error(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    try:
        args.efficiency = parse_bus_efficiency(args.bus_efficiency)
    except ValueError as e:
        parser.error(f"--bus-efficiency: {e}")
    args.assumptions = assumptions_of(args.without)
    nets = presets(args.efficiency, args.assumptions)
    args.networks = [nets[name] for name in args.preset] + [
        _network(f"{g:g}Gb/s" + (f",+{args.latency:g}us" if args.latency else ""), g, args.latency, args.efficiency,
                 args.assumptions) for g in args.bandwidth]
    if not args.networks:
        parser.error("give at least one network: --preset NAME or --bandwidth GBPS")
    if not args.density <= 1:
        parser.error(f"--density must lie in (0, 1], got {args.density}")
    if args.overlap is not None and not args.overlap <= 1:
        parser.error(f"--overlap must lie in [0, 1], got {args.overlap}")
    if args.backward_fraction is not None and not args.backward_fraction <= 1:
        parser.error(f"--backward-fraction must lie in [0, 1], got {args.backward_fraction}")
    if args.index_bytes is not None and args.index_bytes not in INDEX_BYTES:
        parser.error(f"--index-bytes must be 4 (int32) or 8 (int64), got {args.index_bytes}")
    if sum(x is not None for x in (args.bucket_mb, args.buckets, args.bucket_sizes)) > 1:
        parser.error("give at most one of --bucket-mb, --buckets and --bucket-sizes")
    if args.sim_warmup < 1 or args.train_steps < 0:
        parser.error("--sim-warmup must be at least 1 (the first step also agrees on the setup) and "
                     "--train-steps non-negative")
    if len(set(args.workers)) != len(args.workers):
        parser.error(f"--workers must not repeat a value, got {args.workers}")
    args.workers = sorted(args.workers)
    args.sim_workers = sorted(set(args.sim_workers))
    if args.distinct_gradients < args.sim_workers[-1]:
        parser.error(f"--distinct-gradients ({args.distinct_gradients}) must be at least the largest --sim-workers "
                     f"({args.sim_workers[-1]}): past it the union stops growing")
    known = [n for n in sparsifiers.SPARSIFIERS if n != "dense"]
    names = [s.lower() for s in args.sparsifiers]
    names = known if names == ["all"] else names
    for name in names:
        if name not in known:
            parser.error(f"--sparsifiers: unknown sparsifier {name!r}; choose from {known} or 'all'")
    args.sparsifiers = sorted(dict.fromkeys(names), key=lambda n: (n != "deft", n))
    args.deft_plan = list(dict.fromkeys(args.deft_plan))
    if args.model.lower() not in models.MODELS and ":" not in args.model:
        parser.error(f"--model must be one of {models.names()} or 'module:factory', got {args.model!r}")
    if args.selection_json is not None and not Path(args.selection_json).is_file():
        parser.error(f"--selection-json: no such file {args.selection_json!r}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("matplotlib not installed: pip install 'deft_kernels[bench]' (or run with --no-plot)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} exists and is not a directory")
    return args


# --------------------------------------------------------------------------------------------------
# What the driver sends: a recording stand-in for torch.distributed.


class _Done:
    def get_future(self) -> torch.futures.Future:
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut


class _WireRecorder:
    """Takes ``torch.distributed``'s place inside :mod:`deft_kernels.driver.collectives` and notes
    every collective :class:`~deft_kernels.driver.TorchCollectives` issues, with the dtype and
    element count of the tensor it sends; nothing is sent."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int, int]] = []

    def _note(self, op: str, tensor: torch.Tensor) -> _Done:
        self.ops.append((op, tensor.element_size(), tensor.numel()))
        return _Done()

    def all_gather(self, outs, tensor, *args, **kwargs):
        for out in outs:
            out.zero_()
        return self._note("all_gather", tensor)

    def broadcast(self, tensor, *args, **kwargs):
        return self._note("broadcast", tensor)

    def all_reduce(self, tensor, *args, **kwargs):
        return self._note("all_reduce", tensor)

    def get_global_rank(self, group, rank):
        return rank


def wire_of(request: Any, world_size: int) -> list[tuple[str, int, int]]:
    """The collectives ``TorchCollectives`` issues for ``request``: ``(op, bytes per element,
    elements)`` each (for an all-gather, one rank's padded share)."""
    comm = object.__new__(collectives_module.TorchCollectives)
    comm.group, comm.rank, comm.world_size = None, 0, world_size
    recorder = _WireRecorder()
    real = collectives_module.dist
    collectives_module.dist = recorder
    try:
        comm.start(request)
    finally:
        collectives_module.dist = real
    return recorder.ops


def _recorded(program, log: list | None, world_size: int):
    """``program``, its requests passed through; with ``log``, each appended as
    ``{"request": kind, "counts": proposal counts or None, "wire": wire_of(request)}``."""
    value = None
    while True:
        try:
            request = program.send(value)
        except StopIteration as stop:
            return stop.value
        if log is not None:
            counts = list(request.counts) if isinstance(request, driver.GatherProposals) else None
            log.append({"request": type(request).__name__, "counts": counts, "wire": wire_of(request, world_size)})
        value = yield request


def record_sequence(name: str, density: float, grads: list[torch.Tensor], sizes: list[int], n: int, *,
                    warmup: int, steps: int, options: dict | None = None) -> dict:
    """``warmup + steps`` lockstep steps of ``n`` ranks of sparsifier ``name`` on ``grads`` (rank
    ``r`` holds ``grads[r % len(grads)]``), by the driver's own step; per measured step: rank 0's
    requests and their wire (:func:`wire_of`), the union size, every rank's proposal count and the
    slowest rank's local work besides plan and select (``other_ms``: error feedback's accumulate,
    packing the values, unpacking the output, the residual update; the collectives not counted)."""
    ranks = [sparsifiers.build(name, density, **(options or {})) for _ in range(n)]
    held = [grads[r % len(grads)] for r in range(n)]
    measured = []
    for step in range(warmup + steps):
        log = [] if step >= warmup else None
        # each rank's own local work timed alone (its waits for the others are not counted)
        programs = [_recorded(driver.step_program(sp, g, sizes=sizes, rank=r, world_size=n,
                                                  laps=driver.Laps(time.perf_counter, count_waits=False)),
                              log if r == 0 else None, n)
                    for r, (sp, g) in enumerate(zip(ranks, held))]
        results = driver.run_lockstep(programs, lambda rank, res: (res.stats.sent, res.stats.selected,
                                                                   res.times["other"]))
        if log is not None:
            measured.append({"requests": log, "union": results[0][0], "counts": [r[1] for r in results],
                             "other_ms": 1e3 * max(r[2] for r in results)})
    return {"sparsifier": name, "workers": n, "numel": sum(sizes), "steps": measured}




# --------------------------------------------------------------------------------------------------
# The sizes of a step's collectives at any n.


def size_rules(name: str, density: float, sizes: list[int], n: int, union: float, max_count: float,
               plan_elements: int | None, plan: str = "leader", options: dict | None = None
               ) -> list[tuple[str, str, float]]:
    """The step's requests of sparsifier ``name`` (DEFT with its protocol ``plan``; ``options``: the
    sparsifier's other options) at ``n`` ranks as ``(request, role, elements)``, in the driver's order,
    as the driver itself describes its wire (:func:`deft_kernels.driver.wire`: its shape, the header
    where one travels, the plan's broadcast of ``plan_elements`` plus its status slot, the proposals'
    all-gather padded to ``max_count`` (none where it is 0: every rank knows the counts), the value
    all-reduce of the union and its tail, with DEFT one step ahead the fragment norms in it).
    :func:`check_rules` holds them against what the driver asked for."""
    if plan not in DEFT_PLANS:
        raise ValueError(f"plan must be one of {DEFT_PLANS}, got {plan!r}")
    shape, plan_dtype, fragments = _shape(name, density, tuple(sizes), n, plan, tuple(sorted((options or {}).items())))
    described = driver.wire(shape, world_size=n, numel=sum(sizes), tensors=len(sizes), fragments=fragments,
                            union_size=union, max_count=max_count,
                            plan=None if plan_elements is None else (plan_elements, plan_dtype))
    return [(w.request, w.role, w.elements) for w in described]


@functools.lru_cache(maxsize=65536)
def _shape(name: str, density: float, sizes: tuple[int, ...], n: int, plan: str, options: tuple):
    """The driver's shape of ``name``'s step, its plan's wire dtype and its fragment count at ``n``."""
    kwargs = dict(options)
    if name == "deft":
        kwargs["plan"] = plan
    if name == "threshold":
        kwargs.setdefault("threshold", 1.0)  # the shape does not depend on its value
    sp = sparsifiers.build(name, density, **kwargs)
    offsets = sp.fragment_offsets(list(sizes), n)
    wire = sp.plan_wire(sum(sizes), offsets, n)
    return driver.shape_of(sp), None if wire is None else wire[1], int(offsets.numel() - 1)


def index_bytes_of(numel: int, index_bytes: int | None = None) -> int:
    """Bytes per index in the proposals' all-gather: ``index_bytes`` when given (4 refused where the
    vector is too long for int32), else what the driver sends for a vector of ``numel``
    (:func:`deft_kernels.driver.index_dtype`)."""
    if index_bytes is None:
        return driver.index_dtype(numel).itemsize
    if index_bytes not in INDEX_BYTES:
        raise ValueError(f"index bytes must be 4 or 8, got {index_bytes!r}")
    if index_bytes == 4 and numel >= driver.INT32_INDEX_LIMIT:
        raise ValueError(f"int32 indices cannot address {numel:,} elements (2^31 or more)")
    return index_bytes


def plan_elements(name: str, density: float, sizes: list[int], n: int, options: dict | None = None) -> int | None:
    """Length of the plan's wire tensor at ``n`` ranks (the sparsifier's ``plan_wire``), ``None``
    without a plan."""
    return _plan_length(name, density, tuple(sizes), n, tuple(sorted((options or {}).items())))


@functools.lru_cache(maxsize=65536)
def _plan_length(name: str, density: float, sizes: tuple[int, ...], n: int, options: tuple) -> int | None:
    sp = sparsifiers.build(name, density, **dict(options))
    wire = sp.plan_wire(sum(sizes), sp.fragment_offsets(list(sizes), n), n)
    return None if wire is None else wire[0]


def recorded_options(name: str, threshold: float | None) -> dict:
    """The options a profile records ``name``'s step with: DEFT with the paper's protocol, whose
    collectives (header, plan, proposals, values) give the widths of every role that either protocol
    is priced by (the plan one step ahead sends the proposals and the values)."""
    return {**sparsifier_options(name, threshold), **({"plan": "leader"} if name == "deft" else {})}


def check_rules(record: dict, sizes: list[int], density: float, options: dict | None = None) -> list[dict]:
    """The recorded requests of every measured step against :func:`size_rules` (with the options the
    step was recorded with: DEFT's protocol among them, its default where they name none) with that
    step's own union and counts; returns the step's template ``[{request, role, op, itemsize}]``
    (widths as the driver sent them). Raises naming the step and request when they differ: the
    driver's exchange changed and the rules must follow."""
    plan = (options or {}).get("plan", DEFAULT_DEFT_PLAN)
    name, n = record["sparsifier"], record["workers"]
    plan_len = plan_elements(name, density, sizes, n, options)
    template = None
    for i, step in enumerate(record["steps"]):
        max_count = max(step["counts"])
        rules = size_rules(name, density, sizes, n, step["union"], max_count, plan_len, plan, options)
        got = [(r["request"], r["wire"]) for r in step["requests"]]
        expected = [(req, elements) for req, _, elements in rules]
        problem = None
        if [g[0] for g in got] != [e[0] for e in expected]:
            problem = f"requests {[g[0] for g in got]}, the model expects {[e[0] for e in expected]}"
        else:
            for (req, wire), (_, elements), rule in zip(got, expected, rules):
                sent = sum(count for _, _, count in wire)
                if len(wire) > 1 or (elements and sent != elements) or (not elements and wire):
                    problem = f"{req} ({rule[1]}) sent {wire}, the model expects {elements} elements"
                    break
        if problem:
            raise RuntimeError(f"{name} at n = {n}, measured step {i}: the driver's exchange differs from the "
                               f"model's size rules: {problem}")
        if template is None or len(template) < len(rules):
            template = [{"request": req, "role": role, "op": wire[0][0] if wire else None,
                         "itemsize": wire[0][1] if wire else None}
                        for (req, role, _), (_, wire) in zip(rules, got)]
    return template or []




# --------------------------------------------------------------------------------------------------
# DDP's buckets.


def bucket_assignment(sizes: list[int], bucket_mb: float | None = None, buckets: int | None = None,
                      bucket_sizes: list[int] | None = None) -> tuple[list[list[int]], str]:
    """The DDP buckets of a model with parameters of ``sizes`` elements (fp32): lists of parameter
    indices in the order the buckets become ready (the last one is the exchange's tail), and a key
    naming the rule. By default DDP's own (:func:`perf_model.ddp_bucket_assignment`: a first bucket
    of 1 MiB, then 25 MiB; ``bucket_mb``: that cap for every bucket); ``buckets``: that many of about
    equal bytes; ``bucket_sizes``: a run's own buckets, elements each in readiness order (the sum
    must be the model's; each cut falls on the parameter boundary nearest to it: DDP's rebuilt
    buckets follow the order gradients became ready, which is only close to the reverse)."""
    order = list(reversed(range(len(sizes))))
    if bucket_sizes is not None:
        if sum(bucket_sizes) != sum(sizes):
            raise ValueError(f"bucket sizes {bucket_sizes} cover {sum(bucket_sizes):,} of {sum(sizes):,} elements")
        targets = np.cumsum(bucket_sizes)[:-1]
        key = "sizes:" + hashlib.sha256(repr(bucket_sizes).encode()).hexdigest()[:8]
    else:
        if buckets is None:
            nbytes = [4 * s for s in sizes]
            if bucket_mb is None:
                return pm.ddp_bucket_assignment(nbytes), "ddp:1+25"
            return pm.ddp_bucket_assignment(nbytes, bucket_mb, None), f"ddp:{bucket_mb:g}"
        targets = sum(sizes) * np.arange(1, buckets) / buckets
        key = f"even:{buckets}"
    bounds = np.cumsum([sizes[i] for i in order])  # elements up to and including each parameter
    cuts = sorted({int(np.argmin(np.abs(bounds - t))) + 1 for t in targets} - {len(order)})
    return [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)])], key


# --------------------------------------------------------------------------------------------------
# The profile: everything measured on this machine.


def _cache_key(args: argparse.Namespace, what: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", args.model).strip("_") or "model"
    return f"{what}_{safe}_P{args.distinct_gradients}_seed{args.seed}_train{args.train_steps}"


def _gradients(args: argparse.Namespace, log, first_only: bool = False
               ) -> tuple[list[torch.Tensor], list[tuple[str, int]], dict, list]:
    """The model's real gradients (cached), one batch's forward and backward time and the
    parameter shapes; with ``first_only`` and nothing cached, only the first gradient (the same
    one: the batches are drawn in order) and nothing written."""
    path = Path(args.cache_dir) / f"{_cache_key(args, 'gradients')}.pt"
    torch.manual_seed(args.seed)
    module, loss_fn = models.build(args.model)
    shapes = [list(p.shape) for p in module.parameters() if p.requires_grad]
    if path.is_file():
        cached = torch.load(path)
        grads, layout, compute = cached["grads"], cached["layout"], cached["compute"]
        log(f"gradients: {path} (cached)")
        return grads, layout, compute, shapes
    start = time.perf_counter()
    count = 1 if first_only else args.distinct_gradients
    grads, layout = models.real_gradients(module, loss_fn, count=count, train_steps=args.train_steps)
    if first_only:
        log(f"gradient 0: {time.perf_counter() - start:.0f} s")
        return grads, layout, {}, shapes
    forward, backward = [], []
    for _ in range(4):  # one warm-up, three timed
        t0 = time.perf_counter()
        loss = loss_fn(module)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        module.zero_grad(set_to_none=True)
        forward.append(t1 - t0)
        backward.append(t2 - t1)
    compute = {"forward_ms": 1e3 * statistics.median(forward[1:]), "backward_ms": 1e3 * statistics.median(backward[1:]),
               "threads": torch.get_num_threads(), "device": "cpu"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"grads": grads, "layout": layout, "compute": compute}, path)
    log(f"gradients: {len(grads)} in {time.perf_counter() - start:.0f} s, cached to {path}")
    return grads, layout, compute, shapes


def powersgd_shapes(shapes: list[list[int]], rank: int) -> dict:
    """What torch's PowerSGD hook sends per step for parameters of these shapes: a tensor of more
    than one dimension is a matrix ``shape[0] x rest``, compressed when
    ``rows * cols > 2 * (rows + cols) * rank`` (its ``min_compression_rate`` 2) into ``P``
    (``rows x rank``) and ``Q`` (``cols x rank``); the rest is all-reduced as it is."""
    p = q = plain = 0
    matrices = []
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) > 1:
            rows, cols = shape[0], numel // shape[0]
            if rows * cols > 2 * (rows + cols) * rank:
                p += rows * rank
                q += cols * rank
                matrices.append((rows, cols))
                continue
        plain += numel
    return {"p_elements": p, "q_elements": q, "plain_elements": plain, "matrices": matrices}


def _noop_hook(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def time_powersgd_hook(module: torch.nn.Module, loss_fn, rank: int, bucket_mb: float, iters: int = 5) -> dict:
    """Milliseconds torch's PowerSGD hook adds to a step on this device: the median backward of DDP
    with the hook (``matrix_approximation_rank`` ``rank``, compressing from the second step) minus
    that with a hook that returns each bucket as it is (bench/overlap.py's method), in a gloo group
    of one process: every local part of the hook runs (flattening, error feedback, the products,
    orthogonalisation, copying back), its all-reduces cost nothing."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():  # inside someone's distributed job: the products' time stands alone
        return {"hook_ms": None, "skipped": "torch.distributed was already initialised"}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        times = {}
        for mode in ("none", "powersgd"):
            ddp = DDP(module, bucket_cap_mb=bucket_mb)
            if mode == "none":
                ddp.register_comm_hook(None, _noop_hook)
            else:
                ddp.register_comm_hook(psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                                          start_powerSGD_iter=2), psgd.powerSGD_hook)
            seconds = []
            for it in range(4 + iters):  # DDP's bucket rebuild and PowerSGD's first steps are not timed
                loss = loss_fn(ddp)
                start = time.perf_counter()
                loss.backward()
                seconds.append(time.perf_counter() - start)
                module.zero_grad(set_to_none=True)
            times[mode] = 1e3 * statistics.median(seconds[4:])
            del ddp
    finally:
        dist.destroy_process_group()
    return {"hook_ms": max(0.0, times["powersgd"] - times["none"]), "backward_plain_ms": times["none"],
            "backward_hook_ms": times["powersgd"], "bucket_mb": bucket_mb}


def _time_products(grad: torch.Tensor, shapes: list[list[int]], rank: int) -> float:
    """Milliseconds of PowerSGD's arithmetic per step on this device for the matrices it compresses
    among ``shapes`` (error feedback add, ``P = M Q``, orthogonalise ``P``, ``Q = M^T P``, the new
    error ``M - P Q^T``) on gradient ``grad``, median of three after one warm-up: a floor under
    the hook's measured time."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize

    ms, offset = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        rows, cols = shape[0], numel // max(shape[0], 1)
        if len(shape) > 1 and rows * cols > 2 * (rows + cols) * rank:
            ms.append(grad[offset:offset + numel].view(rows, cols))
        offset += numel
    qs = [torch.randn(m.shape[1], rank) for m in ms]
    errors = [torch.zeros_like(m) for m in ms]
    times = []
    for _ in range(4):
        start = time.perf_counter()
        for m, q, e in zip(ms, qs, errors):
            a = m + e
            p = a @ q
            _orthogonalize(p.unsqueeze(0))
            q = a.t() @ p
            torch.sub(a, p @ q.t(), out=e)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def _norm_slices(args: argparse.Namespace, log) -> dict:
    """The squared norms of gradient 0, tensor by tensor, cumulated over up to :data:`NORM_SLICES`
    equal slices of each (cached): ``{"layout": [(name, numel)], "cum": {name: [0, s_1, s_1 + s_2,
    ...]}}``. DEFT's fragment norms on any layout and at any ``n`` are read from them
    (:func:`fragment_norms`); a norm inside a slice is spread evenly over it."""
    path = Path(args.cache_dir) / f"{_cache_key(args, 'norms')}.pt"
    if path.is_file():
        return torch.load(path)
    grads, layout, _, _ = _gradients(args, log, first_only=True)
    cum, offset = {}, 0
    for name, size in layout:
        squares = grads[0][offset:offset + size].double().square()
        slices = min(size, NORM_SLICES)
        bounds = torch.arange(slices + 1, dtype=torch.int64) * size // slices
        running = torch.cat([squares.new_zeros(1), squares.cumsum(0)])
        cum[name] = running[bounds]
        offset += size
    out = {"layout": [(name, size) for name, size in layout], "cum": cum}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    log(f"gradient norms: {len(layout)} tensors in up to {NORM_SLICES} slices each, cached to {path}")
    return out


def _layer_counts(names: list[str]) -> dict[str, int]:
    """Per prefix of a numbered block (``h.`` in ``h.11.mlp.c_fc.weight``): how many blocks."""
    counts: dict[str, int] = {}
    for name in names:
        m = re.match(r"(.*?\.)?(\d+)\.", name)
        if m:
            prefix = m.group(1) or ""
            counts[prefix] = max(counts.get(prefix, 0), int(m.group(2)) + 1)
    return counts


def source_names(names: list[str], measured: list[str]) -> list[str]:
    """The measured tensor whose gradient norms stand for each tensor of a layout: the same name,
    or in a deeper (shallower) stack of numbered blocks, block ``i`` of ``L`` reads the measured
    block ``i * L_measured // L`` (GPT-2 XL's 48 layers from GPT-2 small's 12)."""
    have = set(measured)
    ours, theirs = _layer_counts(names), _layer_counts(measured)
    out = []
    for name in names:
        source = name
        m = re.match(r"(.*?\.)?(\d+)\.(.*)", name)
        if name not in have and m and (m.group(1) or "") in theirs:
            prefix = m.group(1) or ""
            source = f"{prefix}{int(m.group(2)) * theirs[prefix] // ours[prefix]}.{m.group(3)}"
        if source not in have:
            raise ValueError(f"no measured tensor stands for {name!r} (tried {source!r})")
        out.append(source)
    return out


def fragment_norms(norms: dict, sources: list[str], sizes: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DEFT's fragments of a bucket holding tensors of ``sizes`` (each standing in for the measured
    tensor of the same position in ``sources``) at ``n`` ranks: their sizes (int64, the planner's
    own rule, :func:`deft_kernels.planning.fragment_sizes`) and their norms (fp32), read from the
    measured slices (:func:`_norm_slices`), a tensor of another size scaled to the same norm per
    element."""
    measured = dict(norms["layout"])
    frag = planning.fragment_sizes(sizes, n)
    out, f = [], 0
    for source, size in zip(sources, sizes):
        pieces, covered = [], 0
        while covered < size:
            pieces.append(frag[f])
            covered += frag[f]
            f += 1
        cum = norms["cum"][source].numpy()
        src = measured[source]
        at = np.arange(len(cum), dtype=np.float64) * src // (len(cum) - 1)  # each slice bound, in elements
        where = np.concatenate([[0], np.cumsum(pieces)]) / size * src
        squares = np.diff(np.interp(where, at, cum)) * (size / src)
        out.append(np.sqrt(np.maximum(squares, 0.0)))
    return torch.tensor(frag, dtype=torch.int64), torch.from_numpy(np.concatenate(out)).float()


def deft_bucket_plans(norms: dict, sources: list[str], sizes: list[int], buckets: list[list[int]], density: float,
                      n: int, repeats: int = 5) -> list[dict]:
    """DEFT's plan of every bucket at ``n`` (the hook plans each bucket on its own: fragments cut
    from the bucket's parameter sizes, its own budget ``int(d N_b)``), from the measured gradient's
    norms (the first step: no residual), each timed here (the C++ planner; the least of ``repeats``
    runs: on a shared machine other work only adds to a run):
    per bucket its elements, tensors, fragments, the union the plan yields, the largest and the mean
    proposal count of a rank, and the plan's milliseconds."""
    out = []
    for bucket in buckets:
        bsizes = [sizes[i] for i in bucket]
        frag, fnorms = fragment_norms(norms, [sources[i] for i in bucket], bsizes, n)
        k = planning.budget(density, sum(bsizes))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            plan = planning.make_plan(fnorms, frag, k, n)
            times.append(time.perf_counter() - start)
        counts = [int(plan.k[b].sum()) for b in plan.bins]
        out.append({"elements": sum(bsizes), "tensors": len(bucket), "fragments": int(frag.numel()),
                    "union": plan.sent_count, "max_count": max(counts), "mean_count": sum(counts) / n,
                    "plan_ms": 1e3 * min(times)})
    return out


def projected_layout(args: argparse.Namespace, norms: dict | None, profile: dict) -> tuple[list[str] | None, list[int]]:
    """Names (``None`` where unknown) and sizes of the projected layout: ``--layout``'s or the model's."""
    if args.layout:
        layout = LAYOUTS[args.layout]()
        return [name for name, _ in layout], [size for _, size in layout]
    if norms is not None:
        return [name for name, _ in norms["layout"]], [size for _, size in norms["layout"]]
    return None, profile["sizes"]


def _deft_key(args: argparse.Namespace, bucket_key: str) -> str:
    return f"{args.layout or 'model'}|{bucket_key}|d={args.density:g}"


def build_profile(args: argparse.Namespace, log=print) -> dict:
    """The measured inputs (see the module docstring), from the cache when it holds them for these
    options; DEFT's bucket plans are added for every ``--workers`` value, layout and bucket rule not
    yet in the profile."""
    torch.set_num_threads(args.threads)
    key = hashlib.sha256(repr((PROFILE_SCHEMA, args.density, args.sim_workers, args.sim_steps, args.sim_warmup, args.sparsifiers,
                               args.powersgd_rank)).encode()).hexdigest()[:10]
    path = Path(args.cache_dir) / f"{_cache_key(args, 'profile')}_{key}.json"
    args.profile_path = str(path)
    profile = json.loads(path.read_text()) if path.is_file() else None
    if profile is not None:
        try:  # a cached profile's recorded wire must still be what the size rules say (cheap)
            for name, by_n in profile["records"].items():
                options = recorded_options(name, profile.get("threshold"))
                for n, rec in by_n.items():
                    check_rules({"sparsifier": name, "workers": int(n), "steps": rec["steps"]}, profile["sizes"],
                                profile["density"], options)
        except RuntimeError as e:
            raise RuntimeError(f"the cached profile {path} no longer matches the driver ({e}); move it away to "
                               "measure it again") from None
    grads = None
    if profile is None:
        grads, layout, compute, shapes = _gradients(args, log)
        sizes = [s for _, s in layout]
        threshold = calibrated_threshold(grads[0], args.density) if "threshold" in args.sparsifiers else None
        records, templates = {}, {}
        for name in args.sparsifiers:
            options = recorded_options(name, threshold)
            records[name] = {}
            for n in args.sim_workers:
                start = time.perf_counter()
                rec = record_sequence(name, args.density, grads, sizes, n, warmup=args.sim_warmup, steps=args.sim_steps,
                                      options=options)
                template = check_rules(rec, sizes, args.density, options)
                if template:
                    templates[name] = template  # the largest n's (every n's is checked above)
                records[name][str(n)] = {
                    "union": statistics.median(s["union"] for s in rec["steps"]),
                    "max_count": statistics.median(max(s["counts"]) for s in rec["steps"]),
                    "mean_count": statistics.median(sum(s["counts"]) / n for s in rec["steps"]),
                    "other_ms": statistics.median(s["other_ms"] for s in rec["steps"]),
                    "steps": [{"union": s["union"], "counts": s["counts"],
                               "requests": [{"request": r["request"], "wire": r["wire"]} for r in s["requests"]]}
                              for s in rec["steps"]]}
                log(f"simulated {name} n={n}: union {records[name][str(n)]['union']:,.0f} "
                    f"({time.perf_counter() - start:.1f} s)")
        psgd = powersgd_shapes(shapes, args.powersgd_rank)
        del psgd["matrices"]
        profile = {"schema": PROFILE_SCHEMA, "model": args.model, "numel": sum(sizes), "sizes": sizes, "density": args.density,
                   "distinct_gradients": args.distinct_gradients, "sim_workers": args.sim_workers,
                   "sim_steps": args.sim_steps, "sim_warmup": args.sim_warmup, "threshold": threshold,
                   "compute": compute, "powersgd": psgd, "templates": templates, "records": records,
                   "machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    psgd = profile["powersgd"]
    if "hook_ms" not in psgd or "products_ms" not in psgd:
        torch.manual_seed(args.seed)
        module, loss_fn = models.build(args.model)
        if "products_ms" not in psgd:
            if grads is None:
                grads, *_ = _gradients(args, log)
            psgd["products_ms"] = _time_products(grads[0], [list(p.shape) for p in module.parameters()
                                                            if p.requires_grad], args.powersgd_rank)
        if "hook_ms" not in psgd:
            psgd.update(time_powersgd_hook(module, loss_fn, args.powersgd_rank, args.bucket_mb))
        log(f"PowerSGD: its hook adds {psgd['hook_ms'] or 0:.1f} ms to backward ({psgd.get('skipped', 'timed')}), "
            f"its products take {psgd['products_ms']:.1f} ms")
    if "deft" in args.sparsifiers:
        norms = _norm_slices(args, log)
        names, sizes = projected_layout(args, norms, profile)
        try:
            sources = source_names(names, [name for name, _ in norms["layout"]])
            buckets, bucket_key = bucket_assignment(sizes, args.bucket_mb, args.buckets, args.bucket_sizes)
        except ValueError as e:
            _exit_with_error(f"{'--layout ' + args.layout if args.layout else '--bucket-sizes'}: {e}")
        plans = profile.setdefault("deft_buckets", {}).setdefault(_deft_key(args, bucket_key), {})
        missing = [n for n in args.workers if str(n) not in plans]
        if missing:
            start = time.perf_counter()
            for n in missing:
                plans[str(n)] = deft_bucket_plans(norms, sources, sizes, buckets, args.density, n)
            log(f"DEFT plans of {len(buckets)} buckets for n = {missing} ({time.perf_counter() - start:.1f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return profile


# --------------------------------------------------------------------------------------------------
# Laws that carry the measurements past the measured n.


def union_law(profile: dict, name: str) -> dict:
    """The union (as a fraction of N) against n: a power law ``u(n) = a n^b`` fitted to the three
    largest measured n >= 2 (``b`` = 0 when it does not grow), capped at 1 and at ``n`` times the
    one-worker union."""
    rec = profile["records"][name]
    ns = sorted(int(n) for n in rec)
    numel = profile["numel"]
    points = [(n, rec[str(n)]["union"] / numel) for n in ns if n >= 2][-3:]
    if len(points) < 2:
        n0, u0 = (ns[-1], rec[str(ns[-1])]["union"] / numel)
        return {"a": u0, "b": 0.0, "fitted_on": [n0], "u1": u0}
    a, b = pm.fit_power_law([n for n, _ in points], [u for _, u in points])
    return {"a": a, "b": max(0.0, b), "fitted_on": [n for n, _ in points], "u1": rec[str(ns[0])]["union"] / numel}


def _sent_at(profile: dict, name: str, n: int, numel: int, budget: int) -> tuple[float, float, str]:
    """(union, largest proposal count, source) of ``name`` (not DEFT: its plans give both) at ``n``
    on a vector of ``numel``."""
    rec = profile["records"][name]
    scale = numel / profile["numel"]
    measured = sorted(int(m) for m in rec)
    if str(n) in rec:
        r = rec[str(n)]
        return r["union"] * scale, r["max_count"] * scale, "measured"
    if name == "cltk":
        return budget, 0, "k"
    law = union_law(profile, name)
    u = min(1.0, law["a"] * n ** law["b"], n * law["u1"])
    top = rec[str(measured[-1])]
    if sparsifiers.SPARSIFIERS[name].disjoint_proposals:  # MiCRO: the union split among the ranks
        return u * numel, u * numel / n * top["max_count"] / max(top["mean_count"], 1), "law"
    return u * numel, top["max_count"] * scale, "law; count of the largest measured n"


def error_feedback_ms(profile: dict, name: str, n: int) -> float:
    """The slowest rank's local work besides plan and select at ``n`` (error feedback, packing,
    unpacking), timed in the profile's simulation: measured where simulated, else the median over
    the simulated ``n >= 2`` (passes over ``N`` elements: it does not depend on ``n``)."""
    rec = profile["records"][name]
    if str(n) in rec:
        return rec[str(n)]["other_ms"]
    many = [r["other_ms"] for m, r in rec.items() if int(m) >= 2] or [r["other_ms"] for r in rec.values()]
    return statistics.median(many)


def selection_law(doc: dict | None, name: str, numel: int) -> dict:
    """Per-worker selection time (ms) against n from the worker-count JSON ``doc``, the plan not
    included (DEFT's is timed here on every bucket: :func:`deft_bucket_plans`): measured values
    where measured; beyond, DEFT ``theta0 N/n + theta1 F(n)/n`` (its ``T(1)/n`` and a cost per
    fragment of a bin), MiCRO ``theta0 N/n + theta1``, the others (each worker scans all N) the
    median over the measured n, everything scaled by the ratio of ``numel`` to the JSON's N."""
    if doc is None:
        return {"measured": {}, "kind": "none"}
    rows = {r["workers"]: r for r in doc["results"] if r["sparsifier"] == name}
    if not rows:
        return {"measured": {}, "kind": "none"}
    n_json = doc["config"]["numel"]
    scale = numel / n_json
    measured = {n: r["t_select_ms"] * scale for n, r in rows.items()}
    law: dict[str, Any] = {"measured": measured, "scale": scale}
    many = sorted(n for n in rows if n >= 2)
    if name == "deft" and many:
        feats = [(n_json / n, rows[n]["fragments"] / n) for n in many]
        law["select"] = pm.fit_nonnegative(feats, [rows[n]["t_slowest_rank_ms"] for n in many])
        law["plan_measured"] = {n: r["t_plan_ms"] for n, r in rows.items()}
        law["kind"] = "deft"
    elif name == "micro" and many:
        law["select"] = pm.fit_nonnegative([(n_json / n, 1.0) for n in many], [rows[n]["t_select_ms"] for n in many])
        law["kind"] = "partition"
    else:
        law["flat"] = statistics.median(measured.values())
        law["kind"] = "flat"
    return law


def selection_ms(law: dict, n: int, numel: int, fragments: int | None) -> float | None:
    """Milliseconds of per-worker selection at ``n`` by ``law`` (:func:`selection_law`), where the
    gradients are (DEFT: the slowest bin's select; its host plan is priced apart); ``None`` where
    the law has no data."""
    if law["kind"] == "none":
        return None
    if law["kind"] == "free":
        return 0.0
    if law["kind"] == "deft":
        if n in law["measured"] and law["scale"] == 1:
            return law["measured"][n] - law["plan_measured"][n]
        s, f = law["select"]
        return s * numel / n + f * fragments / n
    if n in law["measured"] and law["scale"] == 1:
        return law["measured"][n]
    if law["kind"] == "partition":
        s, c = law["select"]
        return s * numel / n + c * law["scale"]
    return law["flat"]


# --------------------------------------------------------------------------------------------------
# The projection.


def methods_of(sparsifier_names: list[str], deft_plans: list[str]) -> list[str]:
    """The methods priced: the baselines, DEFT once per plan protocol (``deft-ahead``,
    ``deft-leader``), then the other sparsifiers."""
    out = list(BASELINES)
    for name in sparsifier_names:
        out += [f"deft-{p}" for p in deft_plans] if name == "deft" else [name]
    return out


def _sparsifier_of(method: str) -> tuple[str, str]:
    """(sparsifier, plan protocol) of a method name."""
    return ("deft", method.split("-", 1)[1]) if method.startswith("deft-") else (method, "leader")


def hook_overlap(method: str) -> tuple[float, str]:
    """How much of the exchange (all but the last bucket's) a method's hook lets run during backward
    on NCCL, as the code runs it, and why."""
    if method == "allreduce":
        return 1.0, "DDP issues each bucket's all-reduce on NCCL's stream when the bucket is ready"
    if method == "powersgd":
        return 1.0, "torch's hook chains its all-reduces by futures and reads nothing on the host"
    if method == "deft-ahead":
        return 1.0, "the plan is made ahead: no host read inside a bucket's step"
    return 0.0, "inline: the step reads device data on the host in every bucket, which blocks the hook until " \
                "its collectives are done (NCCL)"


def _bucket_sequences(method: str, n: int, profile: dict, sizes: list[int], buckets: list[list[int]],
                      deft_plans: dict | None, density: float, threshold: float | None,
                      index_bytes: int) -> tuple[list[list[pm.Collective]], str]:
    """The collectives of one step of ``method`` at ``n``, one list per bucket: each request's op and
    width as the driver sent it in the profile's simulation (the indices' width: ``index_bytes``),
    the sizes by :func:`size_rules`: DEFT's from its plan of each bucket at ``n``, the others' from
    the model's union and counts, carried to each bucket as its fraction of N."""
    numel = sum(sizes)
    bucket_sizes = [[sizes[i] for i in b] for b in buckets]
    fractions = [sum(b) / numel for b in bucket_sizes]
    if method == "allreduce":
        return [[pm.Collective("all_reduce", 4 * numel * f, "gradients")] for f in fractions], "DDP: fp32 gradients"
    if method == "powersgd":
        ps = profile["powersgd"]
        scale = numel / profile["numel"]
        return [[pm.Collective("all_reduce", 4 * ps[f"{part}_elements"] * scale * f, role)
                 for part, role in (("plain", "uncompressed"), ("p", "P"), ("q", "Q"))] for f in fractions], \
            "torch's PowerSGD hook"
    name, plan = _sparsifier_of(method)
    options = sparsifier_options(name, threshold)
    widths = {t["role"]: t for t in profile["templates"].get(name, [])}
    if name == "deft":
        stats = deft_plans[str(n)]
        sent = [(s["union"], s["max_count"]) for s in stats]
        source = "DEFT's plan of each bucket at n"
    else:
        union, max_count, source = _sent_at(profile, name, n, numel, planning.budget(density, numel))
        sent = [(union * f, max_count * f) for f in fractions]
    out = []
    for bsizes, (union, max_count) in zip(bucket_sizes, sent):
        plan_len = _plan_length(name, density, tuple(bsizes), n, tuple(sorted(options.items())))
        seq = []
        for request, role, elements in size_rules(name, density, bsizes, n, union, max_count, plan_len, plan, options):
            width = widths.get(role)
            if width is None:
                raise RuntimeError(f"{name}: no recorded collective for {role}; rebuild the profile")
            itemsize = index_bytes if role == "indices" else width["itemsize"]
            seq.append(pm.Collective(width["op"], itemsize * elements, role))
        out.append(seq)
    return out, source


def project(args: argparse.Namespace, profile: dict, selection_doc: dict | None) -> dict:
    """Every (network, n, method) point, DEFT's break-even line rate per (network, n, plan protocol)
    and a verdict for each (:func:`verdicts`)."""
    _, sizes = projected_layout(args, None, profile)
    numel = sum(sizes)
    try:
        buckets, bucket_key = bucket_assignment(sizes, args.bucket_mb, args.buckets, args.bucket_sizes)
    except ValueError as e:
        _exit_with_error(f"--bucket-sizes: {e}")
    compute_given = args.compute_ms is not None
    compute_ms = args.compute_ms if compute_given else \
        (profile["compute"]["forward_ms"] + profile["compute"]["backward_ms"]) * numel / profile["numel"]
    if args.backward_fraction is not None:
        backward_fraction = args.backward_fraction
    else:
        c = profile["compute"]
        backward_fraction = c["backward_ms"] / (c["forward_ms"] + c["backward_ms"])
    methods = methods_of(args.sparsifiers, args.deft_plan)
    try:
        index_bytes = index_bytes_of(numel, args.index_bytes)
    except ValueError as e:
        _exit_with_error(f"--index-bytes: {e}")
    overhead = args.collective_overhead / 1e3
    networks = [net.with_overhead(overhead) for net in args.networks]
    without = set(getattr(args, "without", []))
    free = args.selection_scale == 0
    laws = {name: {"kind": "free"} if free else selection_law(selection_doc, name, numel) for name in args.sparsifiers}
    deft_plans = profile.get("deft_buckets", {}).get(_deft_key(args, bucket_key)) if "deft" in args.sparsifiers else None
    psgd_ms = max(profile["powersgd"]["hook_ms"] or 0.0, profile["powersgd"]["products_ms"]) * numel / profile["numel"]
    wires, sources, last, role_bytes = {}, {}, {}, {}
    local, plan_ms, feedback = {}, {}, {}
    for n in args.workers:
        for method in methods:
            seq, source = _bucket_sequences(method, n, profile, sizes, buckets, deft_plans, args.density,
                                            profile.get("threshold"), index_bytes)
            wires[(method, n)] = pm.Exchange(seq)
            last[(method, n)] = seq[-1]
            role_bytes[(method, n)] = {}
            for c in (c for bucket in seq for c in bucket):
                role_bytes[(method, n)][c.role] = role_bytes[(method, n)].get(c.role, 0.0) + c.nbytes
            sources.setdefault(method, set()).add(source)
            name, plan = _sparsifier_of(method)
            if method == "allreduce":
                local[(method, n)] = 0.0
            elif method == "powersgd":
                local[(method, n)] = psgd_ms * args.selection_scale
            else:
                fragments = sum(s["fragments"] for s in deft_plans[str(n)]) if name == "deft" else None
                device = selection_ms(laws[name], n, numel, fragments)
                ef = error_feedback_ms(profile, name, n) * numel / profile["numel"]
                feedback[(method, n)] = ef * args.selection_scale
                local[(method, n)] = None if device is None else (device + ef) * args.selection_scale
                if name == "deft":
                    plan_ms[(method, n)] = sum(s["plan_ms"] for s in deft_plans[str(n)])
    compute = compute_ms / 1e3
    backward = backward_fraction * compute

    def overlap_of(method: str) -> float:
        if args.overlap is not None:
            return args.overlap
        return 1.0 if "hook-overlap" in without else hook_overlap(method)[0]

    def parts(method: str, n: int, net: pm.Network) -> tuple[pm.StepParts, float] | None:
        """The step's parts and, for DEFT, its plan's milliseconds left on the critical path."""
        ms = local[(method, n)]
        if ms is None:
            return None
        exchange, tail = wires[(method, n)].time(n, net)
        plan_exposed = 0.0
        if (method, n) in plan_ms:
            if method == "deft-leader":  # the leader plans each bucket inside the step, everyone waits
                plan_exposed = plan_ms[(method, n)]
            else:  # made on the host during the previous step: on the path only where it outlasts that step
                plan_exposed = max(0.0, plan_ms[(method, n)] - (compute_ms + ms))
        p = pm.step_parts(compute, backward, (ms + plan_exposed) / 1e3, exchange, overlap_of(method),
                          0.0 if "tail" in without else tail)
        return p, plan_exposed

    points = []
    for net in networks:
        for n in args.workers:
            base = parts("allreduce", n, net)[0]
            for method in methods:
                got = parts(method, n, net)
                if got is None:
                    continue
                p, plan_exposed = got
                points.append({"network": net.name, "workers": n, "method": method,
                               "step_ms": 1e3 * p.step, "compute_ms": 1e3 * p.compute,
                               "selection_ms": 1e3 * p.selection, "plan_ms": plan_exposed,
                               "error_feedback_ms": feedback.get((method, n), 0.0),
                               "exchange_ms": 1e3 * p.exchange, "tail_ms": 1e3 * p.tail,
                               "exposed_ms": 1e3 * p.exposed, "speedup": base.step / p.step,
                               "bytes": role_bytes[(method, n)],
                               "last_bucket": {c.role: _algorithm(c, n, net) for c in last[(method, n)]}})
    breakeven = []
    for method in [m for m in methods if m.startswith("deft-")]:
        if any(local[(method, n)] is None for n in args.workers):
            continue
        for net in networks:
            for n in args.workers:
                def advantage(bw: float, n=n, net=net, method=method) -> float:
                    other = net.with_bandwidth(bw)
                    return parts("allreduce", n, other)[0].step - parts(method, n, other)[0].step

                if net.intra is not None and n <= net.per_node:
                    verdict, b = ONE_NODE, None
                else:
                    b = pm.break_even(advantage, BREAK_EVEN_RANGE[0] * pm.GBIT, BREAK_EVEN_RANGE[1] * pm.GBIT)
                    verdict = ALWAYS if b is None else NEVER if b <= BREAK_EVEN_RANGE[0] * pm.GBIT else CROSSES
                breakeven.append({"network": net.name, "workers": n, "method": method, "verdict": verdict,
                                  "break_even_gbps": b / pm.GBIT if verdict == CROSSES else None})
    selection_source = ("free (--selection-scale 0): the device's selection and error feedback cost nothing; "
                        "DEFT's host plan is still timed" if free else
                        f"{getattr(args, 'selection_source', 'the worker-count JSON')}"
                        + (f", x {args.selection_scale:g}" if args.selection_scale != 1 else ""))
    config = {"model": args.model, "layout": args.layout, "numel": numel, "tensors": len(sizes), "density": args.density,
              "budget": planning.budget(args.density, numel), "compute_ms": compute_ms,
              "compute_source": "--compute-ms" if compute_given else "measured here (one batch, CPU)",
              "backward_fraction": backward_fraction,
              "backward_source": "--backward-fraction" if args.backward_fraction is not None else "measured here",
              "overlap": {m: overlap_of(m) for m in methods},
              "overlap_source": "--overlap" if args.overlap is not None else
              ("every method fully (--without hook-overlap)" if "hook-overlap" in without else
               {m: hook_overlap(m)[1] for m in methods}),
              "buckets": len(buckets), "bucket_rule": bucket_key,
              "bucket_elements": [sum(sizes[i] for i in b) for b in buckets],
              "selection_scale": args.selection_scale, "selection_source": selection_source,
              "selection_json": getattr(args, "selection_json_used", None), "powersgd_rank": args.powersgd_rank,
              "index_bytes": index_bytes, "index_bytes_source": "--index-bytes" if args.index_bytes else "as the driver sends",
              "collective_overhead_ms": args.collective_overhead, "nccl_version": pm.NCCL_VERSION,
              "bus_efficiency": args.efficiency.describe() if hasattr(args, "efficiency") else None,
              "without": sorted(without),
              "networks": [_network_doc(net) for net in networks],
              "workers": args.workers, "methods": methods,
              "size_sources": {k: sorted(v) for k, v in sources.items()},
              "union_laws": {name: union_law(profile, name) for name in args.sparsifiers
                             if name not in ("deft", "cltk")},
              "selection_laws": {name: {k: v for k, v in law.items() if k != "measured"} | {
                  "measured": {str(n): v for n, v in law.get("measured", {}).items()}} for name, law in laws.items()},
              "deft_plan_ms": {str(n): v for (m, n), v in plan_ms.items()}}
    doc = {"config": config, "points": points, "break_even": breakeven}
    doc["verdicts"] = verdicts(doc)
    return doc


def _algorithm(c: pm.Collective, n: int, net: pm.Network) -> str:
    choice = pm.choose(c.op, n, c.nbytes, net)
    return f"{choice.algorithm}/{choice.protocol}"


def _network_doc(net: pm.Network) -> dict:
    return {"name": net.name, "line_gbps": net.inter.bandwidth / pm.GBIT, "extra_latency_us": net.inter.alpha / _US,
            "library": net.library, "bus_efficiency": net.efficiency.describe(), "per_node": net.per_node,
            "intra": None if net.intra is None else {"gbps": net.intra.bandwidth / pm.GBIT}}


# --------------------------------------------------------------------------------------------------
# What it says, in words.


def _method_words(method: str) -> str:
    return {"deft-ahead": 'DEFT (plan="ahead")', "deft-leader": 'DEFT (plan="leader")'}.get(method, method)


def verdicts(doc: dict) -> list[dict]:
    """One sentence per network, ``n`` and DEFT protocol: how DEFT's step compares with all-reduce's
    and the line rate below which it pays."""
    by = {(p["network"], p["workers"], p["method"]): p for p in doc["points"]}
    out = []
    for b in doc["break_even"]:
        net, n, method = b["network"], b["workers"], b["method"]
        deft, base = by.get((net, n, method)), by.get((net, n, "allreduce"))
        if deft is None or base is None:
            continue
        ratio = deft["step_ms"] / base["step_ms"]
        if abs(ratio - 1) < 0.005:
            compare = "as fast as all-reduce"
        else:
            compare = f"{100 * abs(ratio - 1):.0f}% {'slower' if ratio > 1 else 'faster'} than all-reduce"
        compare += f" ({deft['step_ms']:.1f} ms per step against {base['step_ms']:.1f} ms)"
        if b["verdict"] == ONE_NODE:
            pays = "the workers share one node: nothing crosses the network"
        elif b["verdict"] == CROSSES:
            pays = f"it pays below {b['break_even_gbps']:.3g} Gb/s per worker (line rate)"
        elif b["verdict"] == ALWAYS:
            pays = f"it pays at every line rate up to {BREAK_EVEN_RANGE[1]:,.0f} Gb/s"
        else:
            pays = f"it does not pay at any line rate down to {BREAK_EVEN_RANGE[0]:g} Gb/s"
        out.append({"network": net, "workers": n, "method": method,
                    "text": f"on {net} at {n} workers {_method_words(method)} is {compare}; {pays}"})
    return out


def assumption_lines(doc: dict) -> list[str]:
    """The assumptions a projection used, each with where it came from."""
    cfg = doc["config"]
    lines = [f"compute: {cfg['compute_ms']:.1f} ms per step, "
             + ("given (--compute-ms)" if cfg["compute_source"] == "--compute-ms" else
                "measured here on this CPU, one batch (pass --compute-ms with your GPU's step)")
             + f"; backward {100 * cfg['backward_fraction']:.0f}% of it ({cfg['backward_source']})",
             f"selection: {cfg['selection_source']}",
             f"bandwidth: line rate x bus efficiency {cfg['bus_efficiency']} (default 0.96: nccl-tests' bus bandwidth of "
             "12 GB/s per 100 Gb/s NIC and 48-49 GB/s per 400 Gb/s NIC, two nodes; --bus-efficiency); "
             + "; ".join(f"{net['name']}: {net['line_gbps']:g} Gb/s line" for net in cfg["networks"]),
             f"collectives: NCCL {cfg['nccl_version']}'s tuner (src/graph/tuning.cc): per-protocol latencies, the cheapest "
             "of LL/LL128/Simple; all-reduce by ring or tree (tree derated), all-gather by ring or PAT (one GPU per "
             "node), broadcast by ring"
             + (f"; turned off: {', '.join(cfg['without'])}" if cfg["without"] else ""),
             "overlap with backward: " + ("; ".join(f"{m} {v:g}" for m, v in cfg["overlap"].items())
                                          + (f" ({cfg['overlap_source']})" if isinstance(cfg["overlap_source"], str)
                                             else " (each hook as it runs on NCCL)"))
             + ("; the last bucket's exchange is never hidden" if "tail" not in cfg["without"] else ""),
             f"buckets: {cfg['buckets']} ({cfg['bucket_rule']}), {cfg['index_bytes']}-byte indices "
             f"({cfg['index_bytes_source']})",
             "sizes: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in cfg["size_sources"].items()
                                   if m not in BASELINES)]
    if cfg["collective_overhead_ms"]:
        lines.append(f"collective overhead: {cfg['collective_overhead_ms']:g} ms per call")
    return lines


def format_table(doc: dict) -> str:
    cfg = doc["config"]
    lines = [f"{cfg['model']}{' on the ' + cfg['layout'] + ' layout' if cfg['layout'] else ''}: N = {cfg['numel']:,} "
             f"in {cfg['tensors']} tensors, d = {cfg['density']:g}, compute {cfg['compute_ms']:.1f} ms per step "
             f"({cfg['compute_source']}), backward {100 * cfg['backward_fraction']:.0f}% of it, "
             f"{cfg['buckets']} DDP buckets, selection x {cfg['selection_scale']:g}, {cfg['index_bytes']}-byte indices"
             + (f", {cfg['collective_overhead_ms']:g} ms per collective call" if cfg["collective_overhead_ms"] else "")]
    methods, ns = cfg["methods"], cfg["workers"]
    by = {(p["network"], p["workers"], p["method"]): p for p in doc["points"]}
    be = {(b["network"], b["workers"], b["method"]): b for b in doc["break_even"]}
    says = {}
    for v in doc["verdicts"]:
        says.setdefault(v["network"], []).append(v["text"])
    width = 10
    for net in cfg["networks"]:
        name = net["name"]
        lines.append(f"\n{name}: {net['line_gbps']:g} Gb/s line rate per worker, bus efficiency {net['bus_efficiency']}"
                     + (f", +{net['extra_latency_us']:g} us per inter-node step" if net["extra_latency_us"] else "")
                     + (f"; {net['per_node']} per node on NVLink ({net['intra']['gbps']:g} Gb/s)" if net["intra"] else ""))
        for title, key, fmt in (("predicted step, ms", "step_ms", "{:.1f}"), ("speedup over all-reduce", "speedup", "{:.3f}"),
                                ("local work, ms", "selection_ms", "{:.2f}"), ("exposed exchange, ms", "exposed_ms", "{:.1f}")):
            lines.append(f"  {title:<24}" + "".join(f"{'n=' + str(n):>{width}}" for n in ns))
            for m in methods:
                cells = [by.get((name, n, m)) for n in ns]
                if all(c is None for c in cells):
                    continue
                lines.append(f"  {m:<24}" + "".join(f"{fmt.format(c[key]) if c else '-':>{width}}" for c in cells))
        for m in methods:
            if (name, ns[0], m) not in be:
                continue

            def cell(b: dict) -> str:
                if b["break_even_gbps"] is not None:
                    return f"{b['break_even_gbps']:.3g}"
                return {ONE_NODE: "1 node", ALWAYS: f">{BREAK_EVEN_RANGE[1]:g}", NEVER: "never"}[b["verdict"]]
            lines.append(f"  {m + ' pays below, Gb/s':<24}" + "".join(f"{cell(be[(name, n, m)]):>{width}}" for n in ns))
        lines += [f"  {text}" for text in says.get(name, [])]
    lines.append("\nassumptions (docs/performance_model.md):")
    lines += [f"  {line}" for line in assumption_lines(doc)]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    nets = cfg["networks"]
    cols = min(3, len(nets) + 1)
    rows = math.ceil((len(nets) + 1) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(nets) + 1:]:
        ax.axis("off")
    low = min([p["speedup"] for p in doc["points"]] + [0.9])
    high = max([p["speedup"] for p in doc["points"]] + [1.1])
    for ax, net in zip(axes, nets):
        for m in cfg["methods"]:
            pts = sorted((p for p in doc["points"] if p["network"] == net["name"] and p["method"] == m),
                         key=lambda p: p["workers"])
            if pts:
                ax.plot([p["workers"] for p in pts], [p["speedup"] for p in pts], marker="o", ms=3, label=m,
                        lw=2.5 if m.startswith("deft") else 1.2, ls="--" if m == "deft-leader" else "-")
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(low / 1.1, high * 1.1)
        ax.set_title(f"{net['name']}: {net['line_gbps']:.3g} Gb/s line rate", fontsize=9)
        ax.set_xlabel("workers n")
        ax.set_ylabel("speedup over all-reduce")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[len(nets)]
    for net in nets:
        for m in [m for m in cfg["methods"] if m.startswith("deft-")]:
            pts = [b for b in doc["break_even"] if b["network"] == net["name"] and b["method"] == m
                   and b["break_even_gbps"] is not None]
            if pts:
                ax.plot([b["workers"] for b in pts], [b["break_even_gbps"] for b in pts], marker="o", ms=3,
                        ls="--" if m == "deft-leader" else "-", label=f"{net['name']}, {m}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers n")
    ax.set_ylabel("DEFT break-even line rate, Gb/s")
    ax.set_title("DEFT faster than all-reduce below the line", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle(f"{cfg['model']}{' -> ' + cfg['layout'] if cfg['layout'] else ''}, N = {cfg['numel']:,}, "
                 f"d = {cfg['density']:g}, compute {cfg['compute_ms']:.0f} ms ({cfg['compute_source']}), "
                 f"NCCL {cfg['nccl_version']}'s tuner", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_stem(model: str, layout: str | None, tag: str = "") -> str:
    """``project_<model>[_<layout>][_<tag>]``."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_") or "model"
    tag = re.sub(r"[^A-Za-z0-9_-]+", "_", tag).strip("_")
    return f"project_{safe}" + (f"_{layout}" if layout else "") + (f"_{tag}" if tag else "")


# --------------------------------------------------------------------------------------------------
# The command.


def _measure_command(args: argparse.Namespace, out: str) -> list[str]:
    """The worker-count benchmark's arguments that give this projection its selection times."""
    return ["--model", args.model, "--workers", *map(str, args.sim_workers), "--sparsifiers", *args.sparsifiers,
            "--density", f"{args.density:g}", "--distinct-gradients", str(args.distinct_gradients),
            "--seed", str(args.seed), "--threads", str(args.threads), "--out", out, "--no-plot", "--no-progress"]


def selection_times(args: argparse.Namespace, log) -> tuple[dict | None, str | None, str]:
    """The worker-count JSON this projection takes its selection times from, its path and where it
    came from: none needed where selection is free (``--selection-scale 0``); ``--selection-json``;
    the committed ``bench/results/worker_count_<model>_cpu.json`` (run from the repository); one
    measured here before and cached; else measured here now (``deft-bench`` on the profile's worker
    counts, cached under ``--cache-dir``), or with ``--no-measure`` a stop (exit status 2) naming
    the command to run."""
    from . import worker_count

    if args.selection_scale == 0:
        return None, None, "free"
    stem = worker_count.output_stem(args.model, "cpu")
    if args.selection_json:
        path = Path(args.selection_json)
    else:
        path = Path("bench/results") / f"{stem}.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        return doc, str(path), f"the worker-count JSON {path} (measured on {doc['machine'].get('cpu_model')})"
    cached = Path(args.cache_dir) / "selection" / f"{stem}.json"
    if cached.is_file():
        doc = json.loads(cached.read_text())
        got = {r["sparsifier"] for r in doc["results"]}
        if doc["config"]["density"] == args.density and set(args.sparsifiers) <= got:
            return doc, str(cached), f"measured here before ({cached}, this CPU)"
    command = "deft-bench " + shlex.join(_measure_command(args, "DIR"))
    if args.no_measure:
        _exit_with_error(f"no selection times for {args.model} at d = {args.density:g} (no {path}): run "
                         f"`{command}` and pass --selection-json DIR/{stem}.json, or --selection-scale 0 for free "
                         "selection (or drop --no-measure to measure them here)")
    log(f"no selection times for {args.model}: measuring them here ({command.replace('DIR', str(cached.parent))}); "
        "minutes for a large model")
    cached.parent.mkdir(parents=True, exist_ok=True)
    worker_count.main(_measure_command(args, str(cached.parent)))
    return json.loads(cached.read_text()), str(cached), f"measured here now ({cached}, this CPU)"


def cache_report(cache_dir: str) -> list[str]:
    """What ``cache_dir`` holds, file by file, its total and how to clear it."""
    root = Path(cache_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if not files:
        return [f"cache: nothing under {root}"]
    kinds = (("gradients_", "the model's real gradients"), ("norms_", "their norms by slice"),
             ("profile_", "the profile (simulated steps, DEFT's plans, PowerSGD)"),
             ("worker_count_", "selection times measured here"))
    lines = []
    for p in files:
        what = next((w for prefix, w in kinds if p.name.startswith(prefix)), "")
        lines.append(f"  {_size(p.stat().st_size):>9}  {p}" + (f"  ({what})" if what else ""))
    total = sum(p.stat().st_size for p in files)
    return [f"cache: {_size(total)} in {len(files)} files under {root} (clear it with: rm -r {shlex.quote(str(root))})",
            *lines]


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    log = lambda msg: print(f"deft-bench project: {msg}", file=sys.stderr)  # noqa: E731
    selection_doc, path, source = selection_times(args, log)
    args.selection_json_used, args.selection_source = path, source
    profile = build_profile(args, log)
    if args.profile_out:
        Path(args.profile_out).write_text(json.dumps(profile, indent=1) + "\n")
    doc = project(args, profile, selection_doc)
    doc = {"schema": 2, "command": args.command, "machine": machine_info("cpu"),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "profile": {k: profile[k] for k in ("model", "numel", "density", "distinct_gradients", "sim_workers",
                                                "sim_steps", "sim_warmup", "compute", "powersgd", "date")},
           **doc}
    table = format_table(doc)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / output_stem(args.model, args.layout, args.tag)
    written = [f"{stem}.txt", f"{stem}.json"]
    Path(written[0]).write_text(f"{args.command}\n{table}")
    doc["seconds"] = time.perf_counter() - start
    Path(written[1]).write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_plot:
        try:
            plot(doc, Path(f"{stem}.png"))
            written.append(f"{stem}.png")
        except Exception as e:  # noqa: BLE001 (the table and JSON are written; a picture is not worth losing them)
            log(f"plot skipped ({type(e).__name__}: {e})")
    print("\n".join(cache_report(args.cache_dir)))
    log(f"wrote {', '.join(written)} in {doc['seconds']:.1f} s")
    return doc


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
