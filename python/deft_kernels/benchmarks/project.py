"""deft-bench project: will DEFT pay off on my cluster? The predicted training step of all-reduce,
PowerSGD and every sparsifier on ``n`` workers, up to thousands, on a network you describe.

    deft-bench project [--model resnet50] [--workers 8 16 ... 1024] [--preset eth25 ib400 ...]
                       [--bandwidth GBPS ... --latency US] [--compute-ms MS] [--out deft-bench-results]

Two stages, the model of the step in :mod:`~deft_kernels.benchmarks.perf_model`
(docs/performance_model.md):

1. **Profile** (measured on this machine, cached in ``--cache-dir``; minutes, once per model and
   density): the model's real gradients (``--distinct-gradients`` of them, from distinct batches,
   cached to a file); forward and backward time of one batch; then for every sparsifier and every
   ``--sim-workers`` ``n``, consecutive steps of ``n`` ranks in lockstep with the driver's own step
   (:func:`deft_kernels.driver.step_program`), recording every collective the step asks for with the
   bytes :class:`deft_kernels.driver.TorchCollectives` would put on the wire (a recording stand-in
   for ``torch.distributed``), the size of the union and every rank's proposal count; DEFT's plan at
   every projected ``n`` (one rank's view: the plan of gradient 0, no ``n``-rank simulation);
   PowerSGD's matrix shapes and the time its hook adds to backward (:func:`time_powersgd_hook`).
2. **Projection** (seconds): per network, worker count and method, the step and its parts from the
   profile, the worker-count benchmark's selection times (``--selection-json``), and the laws that
   carry them past the measured ``n``; DEFT's break-even bandwidth per ``n``.

Writes ``project_<model>[_<layout>].{txt,json,png}`` under ``--out`` (the plot needs the
``deft_kernels[bench]`` extra; ``--no-plot`` does without). Bad options stop at once with one line
naming the option, exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
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

import torch

from .. import driver, planning, sparsifiers
from ..driver import collectives as collectives_module
from . import DEFAULT_OUT, layouts, models
from . import perf_model as pm
from .worker_count import calibrated_threshold, machine_info, sparsifier_options

__all__ = ["main", "build_parser", "parse_args", "PRESETS", "network_of", "record_sequence", "size_rules",
           "build_profile", "project", "format_table"]

#: Methods besides the sparsifiers: DDP's own all-reduce (the baseline) and torch's PowerSGD hook.
BASELINES = ("allreduce", "powersgd")
DEFAULT_WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_SIM_WORKERS = (1, 2, 4, 8, 16)
#: Version of the profile's content (part of its cache key). 3: recorded by the driver that sends
#: int32 indices below 2^31 elements, a status slot with the plan and a status block of n slots with
#: the values, and makes the union of the proposals in the step (its time counted in ``other_ms``).
PROFILE_SCHEMA = 3
#: Bytes per index on the wire that ``--index-bytes`` accepts (int32, int64).
INDEX_BYTES = (4, 8)
#: Gb/s range searched for DEFT's break-even bandwidth.
BREAK_EVEN_RANGE = (1e-3, 1e5)
#: DEFT against all-reduce at one n: faster below a bandwidth, or in the whole range, or nowhere;
#: on one node of a two-level network the inter-node link carries nothing.
CROSSES, ALWAYS, NEVER, ONE_NODE = "crosses", "always faster", "never faster", "one node"

_US = 1e-6
# Network presets (docs/performance_model.md, "Presets", gives the sources): effective bandwidth per
# worker in Gb/s (0.96 x the line rate: nccl-tests' bus bandwidth reaches 12 GB/s on 100 Gb/s and
# 46-49 GB/s on 400 Gb/s NDR NICs) and latency per message in microseconds (NCCL's tuner puts the
# per-hop network latency at 2.7-9.6 us: InfiniBand 5 us; Ethernet (RoCE) 10 us, an assumption; a
# TCP stack is slower: pass --latency). NVLink: 370 GB/s bus bandwidth (nccl-tests, H100), 2 us
# (NCCL's tuner: 0.5-3.4 us per NVLink hop).
_LINE_EFFICIENCY = 0.96
_FLAT = {"eth10": (10, 10.0), "eth25": (25, 10.0), "eth100": (100, 10.0), "eth400": (400, 10.0),
         "ib100": (100, 5.0), "ib200": (200, 5.0), "ib400": (400, 5.0)}
NVLINK = pm.Link(2 * _US, 370e9)
GPUS_PER_NODE = 8


def _flat_network(name: str, gbps: float, latency_us: float) -> pm.Network:
    return pm.Network(pm.Link(latency_us * _US, gbps * pm.GBIT), name=name)


PRESETS: dict[str, pm.Network] = {
    **{name: _flat_network(name, _LINE_EFFICIENCY * g, us) for name, (g, us) in _FLAT.items()},
    **{f"nvlink8+{name}": pm.Network(pm.Link(us * _US, _LINE_EFFICIENCY * g * pm.GBIT), NVLINK, GPUS_PER_NODE,
                                     f"nvlink8+{name}") for name, (g, us) in _FLAT.items()}}

#: Layouts (:mod:`~deft_kernels.benchmarks.layouts`) the projection can carry a measured model's
#: profile to: its sizes, with the measured laws taken as fractions of N (union, counts, PowerSGD's
#: factors) or scaled by N (compute, selection).
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage
        _exit_with_error(message)


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
                   help="flat networks of this bandwidth per worker, Gb/s (with --latency)")
    p.add_argument("--latency", type=_number("non-negative", 0, False), default=10.0,
                   help="latency per message of the --bandwidth networks, microseconds")
    p.add_argument("--sparsifiers", nargs="+", default=["all"],
                   help=f"sparsifiers besides {' and '.join(BASELINES)}, or 'all'")
    p.add_argument("--density", type=_number("positive", 0, True), default=0.01, help="requested density d")
    p.add_argument("--compute-ms", type=_number("positive", 0, True), default=None,
                   help="forward + backward per step, ms (default: measured here, one batch of the model)")
    p.add_argument("--backward-fraction", type=_number("non-negative", 0, False), default=None,
                   help="backward's share of the compute (default: measured here)")
    p.add_argument("--overlap", type=_number("non-negative", 0, False), default=1.0,
                   help="fraction of the exchange that can run during backward (bench/overlap.py's 'hidden')")
    p.add_argument("--selection-json", default=None,
                   help="the worker-count benchmark's JSON giving selection times "
                        "(default: bench/results/worker_count_<model>_cpu.json)")
    p.add_argument("--selection-scale", type=_number("non-negative", 0, False), default=1.0,
                   help="multiply every selection and compression time (0: free, a bound for a faster device)")
    p.add_argument("--bucket-mb", type=_number("positive", 0, True), default=25.0,
                   help="DDP bucket size, MiB: each bucket issues its own collectives")
    p.add_argument("--buckets", type=_workers, default=None,
                   help="number of DDP buckets (default: from --bucket-mb and the model's size)")
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
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                      "deft_kernels", "project"),
                   help="where gradients and profiles are cached")
    p.add_argument("--profile-out", default=None, help="also write the profile (the measured inputs) to this JSON")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="directory for the .txt, .json and .png (bench/results: the committed ones)")
    p.add_argument("--tag", default="", help="suffix of the output files' names (several scenarios of one model)")
    p.add_argument("--no-plot", action="store_true", help="no .png (then matplotlib is not needed)")
    return p


def network_of(name: str) -> pm.Network:
    """A preset network by name."""
    if name not in PRESETS:
        raise KeyError(name)
    return PRESETS[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = "deft-bench project " + shlex.join(argv)
    for name in args.preset:
        if name not in PRESETS:
            parser.error(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    args.networks = [PRESETS[name] for name in args.preset] + [
        _flat_network(f"{g:g}Gb/s,{args.latency:g}us", g, args.latency) for g in args.bandwidth]
    if not args.networks:
        parser.error("give at least one network: --preset NAME or --bandwidth GBPS")
    if not args.density <= 1:
        parser.error(f"--density must lie in (0, 1], got {args.density}")
    if not args.overlap <= 1:
        parser.error(f"--overlap must lie in [0, 1], got {args.overlap}")
    if args.backward_fraction is not None and not args.backward_fraction <= 1:
        parser.error(f"--backward-fraction must lie in [0, 1], got {args.backward_fraction}")
    if args.index_bytes is not None and args.index_bytes not in INDEX_BYTES:
        parser.error(f"--index-bytes must be 4 (int32) or 8 (int64), got {args.index_bytes}")
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
               plan_elements: int | None, options: dict | None = None) -> list[tuple[str, str, float]]:
    """The step's requests of sparsifier ``name`` (with ``options``) at ``n`` ranks as ``(request,
    role, elements)``, in the driver's order, as the driver itself describes its wire
    (:func:`deft_kernels.driver.wire`: its shape, the header where one travels, the plan's broadcast
    of ``plan_elements`` plus its status slot, the proposals' all-gather padded to ``max_count``, the
    value all-reduce of the union and its tail). :func:`check_rules` holds them against what the
    driver asked for."""
    sp = sparsifiers.build(name, density, **(options or {}))
    fragments = sp.fragment_offsets(list(sizes), n).numel() - 1
    plan = None if plan_elements is None else (plan_elements, sp.plan_wire(sum(sizes), sp.fragment_offsets(
        list(sizes), n), n)[1])
    described = driver.wire(driver.shape_of(sp), world_size=n, numel=sum(sizes), tensors=len(sizes),
                            fragments=fragments, union_size=union, max_count=max_count, plan=plan)
    return [(w.request, w.role, w.elements) for w in described]


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
    sp = sparsifiers.build(name, density, **(options or {}))
    wire = sp.plan_wire(sum(sizes), sp.fragment_offsets(list(sizes), n), n)
    return None if wire is None else wire[0]


def check_rules(record: dict, sizes: list[int], density: float, options: dict | None = None) -> list[dict]:
    """The recorded requests of every measured step against :func:`size_rules` with that step's
    own union and counts; returns the step's template ``[{request, role, op, itemsize}]`` (widths
    as the driver sent them). Raises naming the step and request when they differ: the driver's
    exchange changed and the rules must follow."""
    name, n = record["sparsifier"], record["workers"]
    plan_len = plan_elements(name, density, sizes, n, options)
    template = None
    for i, step in enumerate(record["steps"]):
        max_count = max(step["counts"])
        rules = size_rules(name, density, sizes, n, step["union"], max_count, plan_len, options)
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
# The profile: everything measured on this machine.


def _cache_key(args: argparse.Namespace, what: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", args.model).strip("_") or "model"
    return f"{what}_{safe}_P{args.distinct_gradients}_seed{args.seed}_train{args.train_steps}"


def _gradients(args: argparse.Namespace, log) -> tuple[list[torch.Tensor], list[tuple[str, int]], dict, list]:
    """The model's real gradients (cached), one batch's forward and backward time and the
    parameter shapes."""
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
    grads, layout = models.real_gradients(module, loss_fn, count=args.distinct_gradients, train_steps=args.train_steps)
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


def _deft_plan_stats(grad: torch.Tensor, sizes: list[int], density: float, n: int) -> dict:
    """DEFT's plan at ``n`` from gradient ``grad``'s fragment norms (the first step: no residual):
    the union it yields, each rank's proposal count, the fragments and the leader's plan time."""
    offsets = planning.fragment_offsets(sizes, n)
    norms = torch.stack([grad[lo:hi].float().norm() for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    k = planning.budget(density, grad.numel())
    times = []
    for _ in range(3):
        start = time.perf_counter()
        plan = planning.make_plan(norms, offsets.diff(), k, n)
        times.append(time.perf_counter() - start)
    counts = [int(plan.k[b].sum()) for b in plan.bins]
    return {"union": plan.sent_count, "max_count": max(counts), "mean_count": sum(counts) / n,
            "fragments": int(offsets.numel() - 1), "plan_ms": 1e3 * statistics.median(times)}


def build_profile(args: argparse.Namespace, log=print) -> dict:
    """The measured inputs (see the module docstring), from the cache when it holds them for these
    options; DEFT's plan is added for every ``--workers`` value not yet in the profile."""
    torch.set_num_threads(args.threads)
    key = hashlib.sha256(repr((PROFILE_SCHEMA, args.density, args.sim_workers, args.sim_steps, args.sim_warmup, args.sparsifiers,
                               args.powersgd_rank)).encode()).hexdigest()[:10]
    path = Path(args.cache_dir) / f"{_cache_key(args, 'profile')}_{key}.json"
    profile = json.loads(path.read_text()) if path.is_file() else None
    if profile is not None:
        try:  # a cached profile's recorded wire must still be what the size rules say (cheap)
            for name, by_n in profile["records"].items():
                options = sparsifier_options(name, profile.get("threshold"))
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
            options = sparsifier_options(name, threshold)
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
                   "compute": compute, "powersgd": psgd, "templates": templates, "records": records, "deft_plan": {},
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
        missing = [n for n in args.workers if str(n) not in profile["deft_plan"]]
        if missing:
            if grads is None:
                grads, *_ = _gradients(args, log)
            for n in missing:
                profile["deft_plan"][str(n)] = _deft_plan_stats(grads[0], profile["sizes"], args.density, n)
            log(f"DEFT plans for n = {missing}")
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
    """(union, largest proposal count, source) of ``name`` at ``n`` on a vector of ``numel``."""
    rec = profile["records"][name]
    scale = numel / profile["numel"]
    measured = sorted(int(m) for m in rec)
    if str(n) in rec:
        r = rec[str(n)]
        return r["union"] * scale, r["max_count"] * scale, "measured"
    if name == "deft":
        plan = profile["deft_plan"].get(str(n))
        if plan is not None and scale == 1:
            return plan["union"], plan["max_count"], "plan at n"
        top = rec[str(measured[-1])]
        return budget, budget / n * top["max_count"] / top["mean_count"], "k, imbalance of the largest measured n"
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
    """Per-worker selection time (ms) against n from the worker-count JSON ``doc``: measured
    values where measured; beyond, DEFT ``theta0 N/n + theta1 F(n)/n`` (its ``T(1)/n`` and a cost
    per fragment of a bin) plus the leader's plan ``p0 + p1 F(n)``, MiCRO ``theta0 N/n + theta1``,
    the others (each worker scans all N) the median over the measured n, everything scaled by the
    ratio of ``numel`` to the JSON's N."""
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
        law["plan"] = pm.fit_nonnegative([(1.0, rows[n]["fragments"]) for n in many], [rows[n]["t_plan_ms"] for n in many])
        law["plan_measured"] = {n: r["t_plan_ms"] for n, r in rows.items()}
        law["kind"] = "deft"
    elif name == "micro" and many:
        law["select"] = pm.fit_nonnegative([(n_json / n, 1.0) for n in many], [rows[n]["t_select_ms"] for n in many])
        law["kind"] = "partition"
    else:
        law["flat"] = statistics.median(measured.values())
        law["kind"] = "flat"
    return law


def selection_ms(law: dict, n: int, numel: int, fragments: int | None,
                 plan_ms: float | None = None) -> tuple[float, float] | None:
    """``(device, host)`` milliseconds of per-worker selection at ``n`` by ``law``
    (:func:`selection_law`): DEFT's plan is host work (C++ on the leader's CPU, on a GPU run too), the
    rest runs where the gradients are. Past the measured ``n``, DEFT's plan is ``plan_ms`` (timed
    here at ``n``) when given, else the fitted plan law."""
    if law["kind"] == "none":
        return None
    if law["kind"] == "deft":
        s, f = law["select"]
        p0, p1 = law["plan"]
        if n in law["plan_measured"] and law["scale"] == 1:
            plan = law["plan_measured"][n]
            return law["measured"][n] - plan, plan
        plan = plan_ms if plan_ms is not None else p0 + p1 * fragments
        return s * numel / n + f * fragments / n, plan
    if n in law["measured"] and law["scale"] == 1:
        return law["measured"][n], 0.0
    if law["kind"] == "partition":
        s, c = law["select"]
        return s * numel / n + c * law["scale"], 0.0
    return law["flat"], 0.0


# --------------------------------------------------------------------------------------------------
# The projection.


def _sequence(name: str, n: int, profile: dict, sizes: list[int], density: float, threshold: float | None,
              index_bytes: int | None = None) -> tuple[list[pm.Collective], str]:
    """The collectives of one step of ``name`` at ``n``, bytes summed over the step: each request's
    op and width as the driver sent it in the profile's simulation, except the indices', whose width
    is :func:`index_bytes_of` the projected vector."""
    numel = sum(sizes)
    k = planning.budget(density, numel)
    if name == "allreduce":
        return [pm.Collective("all_reduce", 4 * numel, "gradients")], "DDP: fp32 gradients"
    if name == "powersgd":
        ps = profile["powersgd"]
        scale = numel / profile["numel"]
        return [pm.Collective("all_reduce", 4 * ps["plain_elements"] * scale, "uncompressed"),
                pm.Collective("all_reduce", 4 * ps["p_elements"] * scale, "P"),
                pm.Collective("all_reduce", 4 * ps["q_elements"] * scale, "Q")], "torch's PowerSGD hook"
    union, max_count, source = _sent_at(profile, name, n, numel, k)
    options = sparsifier_options(name, threshold)
    plan_len = plan_elements(name, density, sizes, n, options)
    rules = size_rules(name, density, sizes, n, union, max_count, plan_len, options)
    widths = {t["role"]: t for t in profile["templates"].get(name, [])}
    seq = []
    for request, role, elements in rules:
        width = widths.get(role)
        if width is None:
            raise RuntimeError(f"{name}: no recorded collective for {role}; rebuild the profile")
        itemsize = index_bytes_of(numel, index_bytes) if role == "indices" else width["itemsize"]
        seq.append(pm.Collective(width["op"], itemsize * elements, role))
    return seq, source


def project(args: argparse.Namespace, profile: dict, selection_doc: dict | None) -> dict:
    """Every (network, n, method) point and DEFT's break-even bandwidth per (network, n)."""
    if args.layout:
        sizes = [s for _, s in LAYOUTS[args.layout]()]
    else:
        sizes = profile["sizes"]
    numel = sum(sizes)
    compute_ms = args.compute_ms if args.compute_ms is not None else \
        (profile["compute"]["forward_ms"] + profile["compute"]["backward_ms"]) * numel / profile["numel"]
    if args.backward_fraction is not None:
        backward_fraction = args.backward_fraction
    else:
        c = profile["compute"]
        backward_fraction = c["backward_ms"] / (c["forward_ms"] + c["backward_ms"])
    methods = list(BASELINES) + args.sparsifiers
    try:
        index_bytes = index_bytes_of(numel, args.index_bytes)
    except ValueError as e:
        _exit_with_error(f"--index-bytes: {e}")
    overhead = args.collective_overhead / 1e3
    networks = [net.with_overhead(overhead) for net in args.networks]
    frag_cache: dict[int, int] = {}

    def fragments(n: int) -> int:
        if n not in frag_cache:
            frag_cache[n] = len(planning.fragment_sizes(sizes, n))
        return frag_cache[n]

    laws = {name: selection_law(selection_doc, name, numel) for name in args.sparsifiers}
    psgd_ms = max(profile["powersgd"]["hook_ms"] or 0.0, profile["powersgd"]["products_ms"]) * numel / profile["numel"]
    buckets = args.buckets or pm.ddp_buckets(4 * numel, args.bucket_mb)
    points, sources = [], {}
    sequences = {}
    for n in args.workers:
        for name in methods:
            seq, source = _sequence(name, n, profile, sizes, args.density, profile.get("threshold"), index_bytes)
            sequences[(name, n)] = seq
            sources.setdefault(name, set()).add(source)
    select, feedback = {}, {}
    for n in args.workers:
        for name in methods:
            if name == "allreduce":
                ms = 0.0
            elif name == "powersgd":
                ms = psgd_ms
            else:
                plan = profile["deft_plan"].get(str(n)) if name == "deft" and not args.layout else None
                parts_ms = selection_ms(laws[name], n, numel, fragments(n), plan and plan["plan_ms"])
                ef = error_feedback_ms(profile, name, n) * numel / profile["numel"]
                feedback[(name, n)] = ef * args.selection_scale
                ms = None if parts_ms is None else (parts_ms[0] + ef) * args.selection_scale + parts_ms[1]
                select[(name, n)] = ms
                continue
            select[(name, n)] = ms * args.selection_scale
    compute = compute_ms / 1e3
    backward = backward_fraction * compute

    def parts(name: str, n: int, net: pm.Network) -> pm.StepParts | None:
        ms = select[(name, n)]
        if ms is None:
            return None
        ex = pm.exchange_time(sequences[(name, n)], n, net, buckets)
        return pm.step_parts(compute, backward, ms / 1e3, ex, args.overlap)

    for net in networks:
        for n in args.workers:
            base = parts("allreduce", n, net)
            for name in methods:
                p = parts(name, n, net)
                if p is None:
                    continue
                points.append({"network": net.name, "workers": n, "method": name,
                               "step_ms": 1e3 * p.step, "compute_ms": 1e3 * p.compute,
                               "selection_ms": 1e3 * p.selection, "error_feedback_ms": feedback.get((name, n), 0.0),
                               "exchange_ms": 1e3 * p.exchange,
                               "exposed_ms": 1e3 * p.exposed, "speedup": base.step / p.step,
                               "bytes": {c.role: c.nbytes for c in sequences[(name, n)]}})
    breakeven = []
    if "deft" in methods and all(select[("deft", n)] is not None for n in args.workers):
        for net in networks:
            for n in args.workers:
                def advantage(bw: float, n=n, net=net) -> float:
                    other = net.with_bandwidth(bw)
                    return parts("allreduce", n, other).step - parts("deft", n, other).step

                if net.intra is not None and n <= net.per_node:
                    verdict, b = ONE_NODE, None
                else:
                    b = pm.break_even(advantage, BREAK_EVEN_RANGE[0] * pm.GBIT, BREAK_EVEN_RANGE[1] * pm.GBIT)
                    verdict = ALWAYS if b is None else NEVER if b <= BREAK_EVEN_RANGE[0] * pm.GBIT else CROSSES
                breakeven.append({"network": net.name, "workers": n, "verdict": verdict,
                                  "break_even_gbps": b / pm.GBIT if verdict == CROSSES else None})
    config = {"model": args.model, "layout": args.layout, "numel": numel, "tensors": len(sizes), "density": args.density,
              "budget": planning.budget(args.density, numel), "compute_ms": compute_ms,
              "compute_source": "--compute-ms" if args.compute_ms is not None else "measured here (one batch, CPU)",
              "backward_fraction": backward_fraction, "overlap": args.overlap, "buckets": buckets,
              "bucket_mb": args.bucket_mb, "selection_scale": args.selection_scale,
              "selection_json": getattr(args, "selection_json_used", None), "powersgd_rank": args.powersgd_rank,
              "index_bytes": index_bytes, "index_bytes_source": "--index-bytes" if args.index_bytes else "as the driver sends",
              "collective_overhead_ms": args.collective_overhead,
              "networks": [{"name": net.name, "alpha_us": net.inter.alpha / _US, "gbps": net.inter.bandwidth / pm.GBIT,
                            "per_node": net.per_node,
                            "intra": None if net.intra is None else {"alpha_us": net.intra.alpha / _US,
                                                                     "gbps": net.intra.bandwidth / pm.GBIT}}
                           for net in networks],
              "workers": args.workers, "methods": methods,
              "size_sources": {k: sorted(v) for k, v in sources.items()},
              "union_laws": {name: union_law(profile, name) for name in args.sparsifiers
                             if name not in ("deft", "cltk")},
              "selection_laws": {name: {k: v for k, v in law.items() if k != "measured"} | {
                  "measured": {str(n): v for n, v in law.get("measured", {}).items()}} for name, law in laws.items()}}
    return {"config": config, "points": points, "break_even": breakeven}


def format_table(doc: dict) -> str:
    cfg = doc["config"]
    lines = [f"{cfg['model']}{' on the ' + cfg['layout'] + ' layout' if cfg['layout'] else ''}: N = {cfg['numel']:,} "
             f"in {cfg['tensors']} tensors, d = {cfg['density']:g}, compute {cfg['compute_ms']:.1f} ms per step "
             f"({cfg['compute_source']}), backward {100 * cfg['backward_fraction']:.0f}% of it, overlap "
             f"{cfg['overlap']:g}, {cfg['buckets']} DDP buckets of {cfg['bucket_mb']:g} MiB, selection x "
             f"{cfg['selection_scale']:g}, {cfg['index_bytes']}-byte indices ({cfg['index_bytes_source']})"
             + (f", {cfg['collective_overhead_ms']:g} ms per collective call" if cfg["collective_overhead_ms"] else "")]
    methods, ns = cfg["methods"], cfg["workers"]
    by = {(p["network"], p["workers"], p["method"]): p for p in doc["points"]}
    be = {(b["network"], b["workers"]): b for b in doc["break_even"]}
    width = 10
    for net in cfg["networks"]:
        name = net["name"]
        lines.append(f"\n{name}: {net['gbps']:g} Gb/s per worker, {net['alpha_us']:g} us per message"
                     + (f"; {net['per_node']} per node on {net['intra']['gbps']:g} Gb/s, {net['intra']['alpha_us']:g} us"
                        if net["intra"] else ""))
        for title, key, fmt in (("predicted step, ms", "step_ms", "{:.1f}"), ("speedup over all-reduce", "speedup", "{:.2f}"),
                                ("local work, ms", "selection_ms", "{:.2f}"), ("exposed exchange, ms", "exposed_ms", "{:.1f}")):
            lines.append(f"  {title:<24}" + "".join(f"{'n=' + str(n):>{width}}" for n in ns))
            for m in methods:
                cells = [by.get((name, n, m)) for n in ns]
                if all(c is None for c in cells):
                    continue
                lines.append(f"  {m:<24}" + "".join(f"{fmt.format(c[key]) if c else '-':>{width}}" for c in cells))
        if be:
            def cell(b: dict) -> str:
                if b["break_even_gbps"] is not None:
                    return f"{b['break_even_gbps']:.3g}"
                return {ONE_NODE: "1 node", ALWAYS: f">{BREAK_EVEN_RANGE[1]:g}", NEVER: "never"}[b["verdict"]]
            lines.append(f"  {'DEFT break-even, Gb/s':<24}" + "".join(f"{cell(be[(name, n)]):>{width}}" for n in ns))
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
    axes = [list(grid.flat)]
    for ax in axes[0][len(nets) + 1:]:
        ax.axis("off")
    low = min([p["speedup"] for p in doc["points"]] + [0.9])
    high = max([p["speedup"] for p in doc["points"]] + [1.1])
    for ax, net in zip(axes[0], nets):
        for m in cfg["methods"]:
            pts = sorted((p for p in doc["points"] if p["network"] == net["name"] and p["method"] == m),
                         key=lambda p: p["workers"])
            if pts:
                ax.plot([p["workers"] for p in pts], [p["speedup"] for p in pts], marker="o", ms=3, label=m,
                        lw=2.5 if m == "deft" else 1.2)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(low / 1.1, high * 1.1)
        ax.set_title(f"{net['name']}: {net['gbps']:.3g} Gb/s, {net['alpha_us']:g} us per message", fontsize=9)
        ax.set_xlabel("workers n")
        ax.set_ylabel("speedup over all-reduce")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][len(nets)]
    for net in nets:
        pts = [b for b in doc["break_even"] if b["network"] == net["name"] and b["break_even_gbps"] is not None]
        ax.plot([b["workers"] for b in pts], [b["break_even_gbps"] for b in pts], marker="o", ms=3, label=net["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers n")
    ax.set_ylabel("DEFT break-even bandwidth, Gb/s")
    ax.set_title("DEFT faster than all-reduce below the line", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{cfg['model']}{' -> ' + cfg['layout'] if cfg['layout'] else ''}, N = {cfg['numel']:,}, "
                 f"d = {cfg['density']:g}, compute {cfg['compute_ms']:.0f} ms ({cfg['compute_source']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_stem(model: str, layout: str | None, tag: str = "") -> str:
    """``project_<model>[_<layout>][_<tag>]``."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_") or "model"
    tag = re.sub(r"[^A-Za-z0-9_-]+", "_", tag).strip("_")
    return f"project_{safe}" + (f"_{layout}" if layout else "") + (f"_{tag}" if tag else "")


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    log = lambda msg: print(f"deft-bench project: {msg}", file=sys.stderr)  # noqa: E731
    profile = build_profile(args, log)
    if args.profile_out:
        Path(args.profile_out).write_text(json.dumps(profile, indent=1) + "\n")
    path = args.selection_json
    if path is None:
        default = Path("bench/results") / f"worker_count_{re.sub(r'[^A-Za-z0-9_-]+', '_', args.model)}_cpu.json"
        path = str(default) if default.is_file() else None
    selection_doc = json.loads(Path(path).read_text()) if path else None
    if selection_doc is None:
        log("no worker-count JSON for this model: the sparsifiers' selection times are unknown and they are left "
            "out (run deft-bench --model ... first, or pass --selection-json)")
    args.selection_json_used = path
    doc = project(args, profile, selection_doc)
    doc = {"schema": 1, "command": args.command, "machine": machine_info("cpu"),
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
    log(f"wrote {', '.join(written)} in {doc['seconds']:.1f} s")
    return doc


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
