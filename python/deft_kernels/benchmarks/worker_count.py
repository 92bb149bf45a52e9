"""deft-bench: per-worker gradient-selection time versus the number of workers, for DEFT and every
baseline, on this machine and a real model's gradients (the DEFT paper's headline measurement).

    deft-bench [--model resnet50] [--workers 1 2 4 8 16 32] [--sparsifiers all] [--density 0.01]
               [--repeats 3] [--device cpu] [--out deft-bench-results] [--seed 0] [--threads 1]
    python -m deft_kernels.benchmarks ...   (the same; also python -m deft_kernels.bench)

What it does:

1. Builds the model (``deft_kernels.benchmarks.models``: a built-in name or ``module:factory``), trains it a few
   SGD steps, then takes ``--distinct-gradients`` real gradients at those weights, each from its own
   batch: the data of that many workers. Simulated worker ``r`` holds gradient ``r mod P``.
2. For every ``n`` in ``--workers`` and every sparsifier, simulates ``--warmup`` + ``--repeats``
   consecutive steps of ``n`` workers on this one device with the step driver's own step
   (:func:`deft_kernels.driver.simulate_step`: the same code as a real distributed step, ranks in
   lockstep, collectives computed in the process): every rank keeps its own residual
   (``a = g + r`` with the fused op), the plan is made (by the leader, ``step mod n``, or, for DEFT
   one step ahead, by every rank alike from the norms summed in the previous step), every rank runs
   ``select`` on its own ``a``, the global index set is the union of the selections and of what the
   plan sends whole (DEFT's common part), and the residual drops it. Only ``plan`` and ``select``
   are timed, each rank's alone; they never communicate, so their cost does not depend on running
   in one process. ``deft`` is DEFT's default step (the plan one step ahead), ``deft-leader`` the
   paper's protocol (``plan="leader"``). Memory: ``n`` residuals of ``N`` elements (ResNet-50, ``n = 32``: 3.0 GB).
   Top-k, the hard threshold and SIDCo (``RANK_FREE``) select whatever a worker's rank: workers
   holding the same gradient keep the same residual and select the same indices, so only the
   ``min(n, P)`` distinct ones are simulated, once for every ``n >= P`` (the table says so): the
   default run's CPU time fell from 351 s to 119 s on the 2-core machine of BENCHMARKS.md.
3. Reports per (sparsifier, n), medians over the measured steps:

   - **selection time**: the step's critical path of local selection work, as each protocol runs
     it: ``max over ranks of (t_plan if rank is the leader) + t_select(rank)`` where a leader plans
     (``deft-leader``, CLT-k, MiCRO); ``max over ranks of t_select(rank)`` for DEFT one step ahead,
     whose plan is made off the path (from the previous step's norms, on the host while the device
     works) and is reported beside it. Each rank is timed alone
     with ``--threads`` threads (default 1: one core per worker, as in a real run of one process
     per core; ``--threads $(nproc)`` gives each simulated worker the whole machine). One thread
     also keeps the figures steady on a shared machine, where an OpenMP team loses whole time
     slices whenever another process takes one of its cores.
   - **selected per worker**: the count each rank proposed (mean and max over ranks).
   - **sent density**: size of the global index set / N (the build-up of Top-k shows here, up to
     ``P`` distinct workers' data), with DEFT's planned total (its local k summed) next to it.
   - **bin imbalance**: max / mean over ranks of the measured select time, and for DEFT of the
     bin-packing model cost as well.

Writes ``worker_count_<model>_<device>.{txt,json,png}`` under ``--out`` (default
``deft-bench-results/`` in the current directory; ``--out bench/results`` rewrites the repository's
committed files): the table, every measurement with the machine and command line, and the plot
(selection time and sent density versus n on log axes, with DEFT's ideal ``T(1)/n``).

The progress bar needs tqdm and the plot matplotlib: the ``deft_kernels[bench]`` extra. Without
them the command stops at once naming the extra (``--no-progress`` and ``--no-plot`` do without);
every option, ``--out`` included, is checked before any work; and a plot that fails after the run
is reported and skipped, the table and the JSON being written first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import __version__, driver, planning, sparsifiers
from . import DEFAULT_OUT, models
from .cli import modes_help

__all__ = ["main", "build_parser", "parse_args", "run", "Workload", "make_workload", "simulate", "simulated_ranks",
           "for_workers", "benchable", "RANK_FREE",
           "calibrated_threshold", "sparsifier_options", "summarize", "format_table", "plot", "output_stem",
           "BENCH_EXTRA"]

#: The extra that installs the optional modules below: ``pip install 'deft_kernels[bench]'``.
BENCH_EXTRA = "deft_kernels[bench]"
#: Optional modules, each with the option that does without it.
OPTIONAL_MODULES = {"tqdm": "--no-progress", "matplotlib": "--no-plot"}
DEFAULT_WORKERS = (1, 2, 4, 8, 16, 32)
#: Sparsifiers that select nothing have no selection time to measure.
NOT_BENCHED = ("dense",)
#: DEFT's scaling target (BENCHMARKS.md): T(n) within this factor of T(1)/n for n up to TARGET_MAX_N.
TARGET_FACTOR, TARGET_MAX_N = 1.25, 16
#: Sparsifiers whose worker selects from its own accumulated gradient alone, whatever its rank (no
#: plan, no partition, no leader's work). Workers ``r`` and ``r + P`` that hold the same gradient
#: (``P = --distinct-gradients``) then keep the same residual and select the same indices at every
#: step, so ``n > P`` of them are simulated as the ``P`` distinct ones (:func:`simulated_ranks`; the
#: test suite checks the sent and selected counts against all ``n`` simulated), and that one
#: simulation serves every ``n >= P`` (:func:`run`). Their selections over the whole gradient and the
#: union of ``n`` proposals made most of the default run's time.
RANK_FREE = ("topk", "threshold", "sidco")
#: Benchmark names that are a registered sparsifier with options: DEFT with the paper's protocol.
VARIANTS = {"deft-leader": ("deft", {"plan": "leader"})}


def benchable() -> list[str]:
    """Registered sparsifiers the benchmark measures and :data:`VARIANTS`, DEFT's first."""
    names = [n for n in sparsifiers.SPARSIFIERS if n not in NOT_BENCHED] + list(VARIANTS)
    return sorted(names, key=lambda n: (not n.startswith("deft"), n))


def registered(name: str) -> str:
    """The registry name behind a benchmark name (a :data:`VARIANTS` entry's sparsifier)."""
    return VARIANTS[name][0] if name in VARIANTS else name


# --------------------------------------------------------------------------------------------------
# Command line.


def _int_at_least(minimum: int, what: str):
    """argparse type: an integer >= minimum, the error naming what was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, the description's lines (the list of modes) kept."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deft-bench", usage="%(prog)s [MODE] [options]", formatter_class=_HelpFormatter,
                                description=f"{__doc__.split(chr(10) * 2)[0]}\n\n{modes_help()}\n\n"
                                            "The default mode's options:")
    p.add_argument("--model", default="resnet50",
                   help=f"built-in model ({', '.join(models.names())}) or 'module:factory' (see deft_kernels.benchmarks.models)")
    p.add_argument("--workers", type=_positive_int, nargs="+", default=list(DEFAULT_WORKERS),
                   help="worker counts n to simulate")
    p.add_argument("--sparsifiers", nargs="+", default=["all"],
                   help=f"sparsifiers to measure, or 'all' ({', '.join(benchable())})")
    p.add_argument("--density", type=_density, default=0.01, help="requested density d (k = max(1, int(d * N)))")
    p.add_argument("--repeats", type=_positive_int, default=3, help="measured steps per (sparsifier, n); medians reported")
    p.add_argument("--warmup", type=_non_negative_int, default=1, help="unmeasured steps first per (sparsifier, n)")
    p.add_argument("--device", default="cpu", help="device the selection runs on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="directory for the .txt, .json and .png results (bench/results: the committed ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and batches")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads of one simulated worker (torch.set_num_threads); 1 = a core per worker")
    p.add_argument("--distinct-gradients", type=_positive_int, default=8,
                   help="real gradients from distinct batches; worker r holds gradient r mod this "
                        "(memory: (this + n) x N floats: the gradients and one residual per simulated rank)")
    p.add_argument("--train-steps", type=_non_negative_int, default=2,
                   help="SGD steps on the model before its gradients are taken")
    p.add_argument("--threshold", type=_positive_float, default=None,
                   help="HardThreshold's lambda (default: calibrated, the k-th largest |g| of worker 0's gradient)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: the worker thread's CPU time, steadier on a shared machine "
                        "(needs --device cpu --threads 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (then tqdm is not needed)")
    p.add_argument("--no-plot", action="store_true", help="no .png plot (then matplotlib is not needed)")
    return p


def _exit_with_error(message: str) -> NoReturn:
    """One line on stderr and exit status 2, as argparse does for a bad option (without the usage,
    which would not help)."""
    print(f"deft-bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _check_optional_modules(args: argparse.Namespace) -> None:
    """Exit naming the ``[bench]`` extra when a module the options need cannot be imported (found
    at the start, not after the whole run)."""
    missing = [(module, option) for module, option in OPTIONAL_MODULES.items()
               if not getattr(args, option[2:].replace("-", "_")) and not _importable(module)]
    if missing:
        _exit_with_error(f"{' and '.join(m for m, _ in missing)} not installed: pip install '{BENCH_EXTRA}' "
                         f"(or run with {' '.join(o for _, o in missing)})")


def _check_out_directory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Create ``--out`` and write a file into it now: a directory that cannot take the results would
    otherwise be found only after the run."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        parser.error(f"--out {args.out!r} is not a writable directory ({e.strerror or e})")
    stem = out / output_stem(args.model, args.device, args.clock)
    for suffix in (".txt", ".json", ".png"):
        if Path(f"{stem}{suffix}").is_dir():
            parser.error(f"--out: {stem}{suffix} is a directory; the results are written to a file of that name")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; a bad value exits with status 2 and a message naming
    the option."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = "deft-bench " + shlex.join(argv)  # what reproduces this run
    if len(set(args.workers)) != len(args.workers):
        parser.error(f"--workers must not repeat a value, got {args.workers}")
    args.workers = sorted(args.workers)
    known = benchable()
    names = [s.lower() for s in args.sparsifiers]
    if names == ["all"]:
        names = known
    for name in names:
        if name in NOT_BENCHED:
            parser.error(f"--sparsifiers: {name!r} selects nothing, so it has no selection time to measure")
        if name not in known:
            parser.error(f"--sparsifiers: unknown sparsifier {name!r}; choose from {known} or 'all'")
    if len(set(names)) != len(names):
        parser.error(f"--sparsifiers must not repeat a name, got {args.sparsifiers}")
    args.sparsifiers = names
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device name (cpu, cuda, cuda:0, ...)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    args.device = str(device)
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        parser.error("--clock cpu times the calling thread: it needs --device cpu and --threads 1")
    if not isinstance(args.model, str) or not args.model:
        parser.error("--model must be a model name or 'module:factory'")
    if args.model.lower() not in models.MODELS and ":" not in args.model:
        parser.error(f"--model must be one of {models.names()} or 'module:factory', got {args.model!r}")
    _check_optional_modules(args)
    _check_out_directory(parser, args)  # last: it creates the directory, which a bad option should not
    return args


# --------------------------------------------------------------------------------------------------
# The simulation.


@dataclass
class Workload:
    """The gradients the simulated workers hold: ``grads[s]`` is data shard ``s``'s flat gradient."""

    model: str
    grads: list[torch.Tensor]
    layout: list[tuple[str, int]]
    seconds: float  # to build the model and compute the gradients

    @property
    def sizes(self) -> list[int]:
        return [s for _, s in self.layout]

    @property
    def numel(self) -> int:
        return self.grads[0].numel()


def make_workload(model: str, distinct: int, seed: int, device: str, train_steps: int = 2) -> Workload:
    """Build ``model`` (on CPU), train it ``train_steps`` steps and take ``distinct`` real gradients;
    they are moved to ``device``."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    module, loss_fn = models.build(model)
    grads, layout = models.real_gradients(module, loss_fn, count=distinct, train_steps=train_steps)
    grads = [g.to(device) for g in grads]
    return Workload(model, grads, layout, time.perf_counter() - start)


#: Clocks a simulated worker can be timed with: elapsed time, or the CPU time of the calling thread
#: (one-thread CPU runs only, where the kernels run in that thread; it leaves out the time slices
#: other processes of a shared machine take).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def planned_total(plan: Any) -> int | None:
    """The number of elements a plan commits the step to send (DEFT: its local k summed over all
    fragments, common part included); ``None`` for plans that do not fix it."""
    return plan.sent_count if isinstance(plan, planning.DeftPlan) else None


def model_imbalance(plan: Any) -> float | None:
    """Max / mean bin cost of a DEFT plan under its packing cost model; ``None`` for other plans."""
    return planning.imbalance(plan.bin_costs()) if isinstance(plan, planning.DeftPlan) else None


def calibrated_threshold(grad: torch.Tensor, density: float) -> float:
    """A HardThreshold lambda for which one worker's first step would send the budget
    ``k = planning.budget(d, N)`` elements: the k-th largest ``|g|``. Fixed afterwards, as the
    algorithm prescribes, so the density it reaches drifts with the residual and with ``n``."""
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point() or grad.numel() == 0:
        raise ValueError("grad must be a non-empty float tensor")
    k = planning.budget(density, grad.numel())
    return float(torch.topk(grad.abs().float().flatten(), k, sorted=False).values.min())


def sparsifier_options(name: str, threshold: float | None) -> dict:
    """Constructor keywords beyond the density: HardThreshold's lambda, a :data:`VARIANTS` entry's."""
    if name in VARIANTS:
        return dict(VARIANTS[name][1])
    if name != "threshold":
        return {}
    if threshold is None:
        raise ValueError("the threshold sparsifier needs a threshold (lambda)")
    return {"threshold": threshold}


def simulated_ranks(name: str, n: int, distinct: int) -> int:
    """How many ranks simulate ``n`` workers of sparsifier ``name`` that hold ``distinct`` different
    gradients: all ``n``, or for a :data:`RANK_FREE` sparsifier the ``min(n, distinct)`` whose
    gradients differ (worker ``r`` is then simulated rank ``r mod`` that many)."""
    return min(n, distinct) if name in RANK_FREE else n


def simulate(name: str, density: float, work: Workload, n: int, *, warmup: int, repeats: int,
             options: dict | None = None, clock: str = "wall", progress=None) -> dict:
    """``warmup + repeats`` steps of ``n`` simulated workers of sparsifier ``name`` (built with
    ``options`` as extra keywords); the measured steps' figures (see the module docstring), one list
    entry per measured step, for the :func:`simulated_ranks` ranks that stand for the ``n`` workers
    (their times and counts; :func:`for_workers` states them for ``n``)."""
    if not isinstance(work, Workload):
        raise TypeError(f"work must be a Workload (make_workload), got {type(work).__name__}")
    for arg, value, least in (("n", n, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{arg} must be an int >= {least}, got {value!r}")
    device = work.grads[0].device
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("clock 'cpu' (the calling thread's CPU time) needs a CPU device and one thread")
    sync = device if device.type == "cuda" else None

    def laps(rank: int) -> driver.Laps:  # each rank's own work alone; its waits for the others are not timed
        return driver.Laps(CLOCKS[clock], sync_device=sync, count_waits=False)

    simulated = simulated_ranks(name, n, len(work.grads))
    shards = min(n, len(work.grads))
    ranks = [sparsifiers.build(registered(name), density, **(options or {})) for _ in range(simulated)]
    ahead = ranks[0].plans_ahead  # every rank plans, off the critical path
    grads = [work.grads[rank % shards] for rank in range(simulated)]
    steps: list[dict] = []
    for step in range(warmup + repeats):
        leader = 0 if ahead else step % simulated  # whose plan (and plan time) is reported

        def keep(rank: int, result: driver.StepResult) -> tuple:  # drops the output: n of them would not fit
            return result.times, result.stats.selected, result.stats.sent, result.plan if rank == leader else None

        results = driver.simulate_step(ranks, grads, sizes=work.sizes, laps=laps, finish=keep)
        t_plan, plan = results[leader][0]["plan"], results[leader][3]
        t_ranks = [times["select"] for times, *_ in results]
        if step >= warmup:
            critical = [t + (t_plan if rank == leader and not ahead else 0.0) for rank, t in enumerate(t_ranks)]
            steps.append({
                "step": step, "leader": None if ahead else leader, "t_plan": t_plan, "t_ranks": t_ranks,
                "t_select": max(critical), "plan_on_path": not ahead,
                "selected": [r[1] for r in results], "sent": results[0][2], "planned": planned_total(plan),
                "imbalance_model": model_imbalance(plan)})
        if progress is not None:
            progress.update(1)
    sp = ranks[0]
    return for_workers({
        "sparsifier": name, "numel": work.numel, "fragments": int(sp.offsets.numel() - 1),
        "requested_density": density, "budget": sp.budget(work.numel), "distinct_gradients": len(work.grads),
        "simulated_ranks": simulated, "steps": steps}, n)


def for_workers(simulation: dict, n: int) -> dict:
    """The figures of ``n`` workers from ``simulation`` (a :func:`simulate` result) whose simulated
    ranks stand for them: worker ``r`` is simulated rank ``r mod simulated_ranks`` (every rank its
    own worker, unless the sparsifier is :data:`RANK_FREE`). Medians over the measured steps."""
    ranks = simulation["simulated_ranks"]
    if simulated_ranks(simulation["sparsifier"], n, simulation["distinct_gradients"]) != ranks:
        raise ValueError(f"a simulation of {ranks} ranks of {simulation['sparsifier']!r} does not stand for {n} workers")
    of_worker = [rank % ranks for rank in range(n)]
    steps, numel = simulation["steps"], simulation["numel"]

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    sent = med(s["sent"] for s in steps)
    return {
        **{key: simulation[key] for key in ("sparsifier", "numel", "fragments", "requested_density", "budget",
                                            "distinct_gradients", "simulated_ranks")},
        "workers": n, "shards": min(n, simulation["distinct_gradients"]),
        "t_select_ms": 1e3 * med(s["t_select"] for s in steps), "t_plan_ms": 1e3 * med(s["t_plan"] for s in steps),
        "t_slowest_rank_ms": 1e3 * med(max(s["t_ranks"]) for s in steps),
        "selected_per_worker_mean": med(sum(s["selected"][r] for r in of_worker) / n for s in steps),
        "selected_per_worker_max": med(max(s["selected"]) for s in steps),
        "sent": sent, "density": sent / numel, "planned": med(s["planned"] for s in steps),
        "imbalance_measured": med(planning.imbalance([s["t_ranks"][r] for r in of_worker]) for s in steps),
        "imbalance_model": med(s["imbalance_model"] for s in steps), "steps": steps}


# --------------------------------------------------------------------------------------------------
# Machine, summary, outputs.


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    from .. import _C

    info = {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "openmp_threads": _C.openmp_max_threads(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None,
        "gpus_visible": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "deft_kernels": __version__, "triton": None, "numpy": None,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for mod in ("triton", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def summarize(results: list[dict]) -> dict:
    """DEFT against its targets: the ratio of T(n) to the ideal T(1)/n, and whether its sent density
    equals both its planned total and the requested density at every n."""
    deft = {r["workers"]: r for r in results if r["sparsifier"] == "deft"}
    if 1 not in deft:
        return {}
    t1 = deft[1]["t_select_ms"]
    rows = {}
    for n, r in sorted(deft.items()):
        ideal = t1 / n
        rows[str(n)] = {"t_select_ms": r["t_select_ms"], "ideal_ms": ideal, "ratio_to_ideal": r["t_select_ms"] / ideal,
                        "sent_equals_planned": all(s["sent"] == s["planned"] for s in r["steps"]),
                        "planned_equals_requested": all(s["planned"] == r["budget"] for s in r["steps"]),
                        "density": r["density"]}
    within = [v["ratio_to_ideal"] <= TARGET_FACTOR for n, v in rows.items() if int(n) <= TARGET_MAX_N]
    return {"deft_t1_ms": t1, "by_workers": rows, "target_factor": TARGET_FACTOR, "target_max_n": TARGET_MAX_N,
            "scaling_target_met": all(within),
            "density_exact": all(v["sent_equals_planned"] for v in rows.values()),
            "density_is_requested": all(v["planned_equals_requested"] for v in rows.values())}


def format_table(results: list[dict], config: dict) -> str:
    ns = sorted({r["workers"] for r in results})
    names = list(dict.fromkeys(r["sparsifier"] for r in results))
    by = {(r["sparsifier"], r["workers"]): r for r in results}
    width = 11
    head = f"{'':<22}" + "".join(f"{'n=' + str(n):>{width}}" for n in ns)

    def block(title, fmt, key, extra=()):
        lines = [title, head]
        for name in (nm for nm in names if any(by.get((nm, n), {}).get(key) is not None for n in ns)):
            cells = [by.get((name, n)) for n in ns]
            lines.append(f"{name:<22}" + "".join(f"{fmt(c[key]) if c and c[key] is not None else '-':>{width}}"
                                                 for c in cells))
        lines.extend(extra)
        return "\n".join(lines)

    out = [f"model {config['model']}: N = {config['numel']:,} in {config['tensors']} tensors, d = {config['density']:g} "
           f"(k = {config['budget']:,}), device {config['device']}, {config['threads']} thread(s) per worker, "
           f"{'thread CPU time' if config['clock'] == 'cpu' else 'wall-clock time'}, "
           f"{config['distinct_gradients']} distinct gradients, median of {config['repeats']} steps after "
           f"{config['warmup']} warm-up"]
    extra = []
    for deft in ("deft", "deft-leader"):
        if (deft, 1) not in by:
            continue
        t1 = by[(deft, 1)]["t_select_ms"]
        extra.append(f"{deft + ' ideal T(1)/n':<22}" + "".join(f"{t1 / n:>{width}.2f}" for n in ns))
        extra.append(f"{deft + ' / ideal':<22}" + "".join(
            f"{by[(deft, n)]['t_select_ms'] / (t1 / n) if (deft, n) in by else float('nan'):>{width}.2f}" for n in ns))
        if deft == "deft-leader":
            extra.append(f"{'  without the plan':<22}" + "".join(
                f"{by[(deft, n)]['t_slowest_rank_ms'] / (t1 / n) if (deft, n) in by else float('nan'):>{width}.2f}"
                for n in ns))
    reused = [r for r in results if "simulation_of_workers" in r]
    if reused:
        ranks = reused[0]["simulated_ranks"]
        extra.append(textwrap.fill(
            f"({', '.join(dict.fromkeys(r['sparsifier'] for r in reused))} at n = "
            f"{', '.join(map(str, sorted({r['workers'] for r in reused})))}: the figures of n = {ranks}, not "
            f"simulated again: worker r holds the gradient of worker r mod {ranks} and, as these sparsifiers "
            "select whatever a worker's rank, keeps that worker's residual and selects its indices)", width=100))
    out.append(block("\nselection time per worker, ms (critical path: the slowest rank's select, plus the leader's "
                     "plan where a leader plans: deft-leader, cltk, micro; deft plans one step ahead, off the path)",
                     lambda v: f"{v:.2f}", "t_select_ms", extra))
    out.append(block("\nplan time, ms (the leader's, on the critical path above; deft's, every rank's, off it)",
                     lambda v: f"{v:.2f}", "t_plan_ms"))
    note = []
    if max(ns) > config["distinct_gradients"]:
        note.append(f"(worker r holds gradient r mod {config['distinct_gradients']}: past n = "
                    f"{config['distinct_gradients']} the union of per-worker selections cannot grow further)")
    out.append(block("\nsent density, % of N (union of all workers' selections)", lambda v: f"{100 * v:.4f}", "density",
                     note))
    out.append(block("\nselected per worker (mean over ranks)", lambda v: f"{v:,.0f}", "selected_per_worker_mean"))
    out.append(block("\nbin imbalance, measured select time max/mean over ranks", lambda v: f"{v:.2f}",
                     "imbalance_measured"))
    if any(r["imbalance_model"] is not None for r in results):
        out.append(block("\nbin imbalance, packing cost model max/mean", lambda v: f"{v:.2f}", "imbalance_model"))
    return "\n".join(out) + "\n"


def plot(results: list[dict], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ax_t, ax_d) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["sparsifier"] for r in results))
    for name in names:
        rows = sorted((r for r in results if r["sparsifier"] == name), key=lambda r: r["workers"])
        ns = [r["workers"] for r in rows]
        ax_t.plot(ns, [r["t_select_ms"] for r in rows], marker="o", label=name, lw=2.5 if name == "deft" else 1.5)
        ax_d.plot(ns, [100 * r["density"] for r in rows], marker="o", label=name)
    deft = sorted((r for r in results if r["sparsifier"] == "deft"), key=lambda r: r["workers"])
    if deft and deft[0]["workers"] == 1:
        ns = [r["workers"] for r in deft]
        ax_t.plot(ns, [deft[0]["t_select_ms"] / n for n in ns], "k--", label="deft ideal T(1)/n")
    ax_d.axhline(100 * config["density"], color="k", ls=":", label="requested")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_t, ax_d):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["workers"] for r in results}))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())  # no crowding past a decade
        ax.set_xlabel("workers n")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("selection time per worker per step (ms)")
    ax_d.set_ylabel("sent density (% of N)")
    fig.suptitle(f"{config['model']} (N = {config['numel']:,}, d = {config['density']:g}) on {config['device_name']}, "
                 f"{config['threads']} thread(s) per worker, "
                 f"{'thread CPU time' if config['clock'] == 'cpu' else 'wall-clock time'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def output_stem(model: str, device: str, clock: str = "wall") -> str:
    """``worker_count_<model>_<device type>``, with ``_cputime`` for a ``--clock cpu`` run."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_") or "model"
    return f"worker_count_{safe}_{torch.device(device).type}" + ("_cputime" if clock == "cpu" else "")


def run(args: argparse.Namespace) -> dict:
    """The benchmark for parsed arguments; writes the three files and returns the JSON document."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    try:
        work = make_workload(args.model, args.distinct_gradients, args.seed, args.device, args.train_steps)
    except ValueError as e:  # a user factory that breaks its contract, found only when it runs
        _exit_with_error(f"--model {args.model}: {e}")
    threshold = args.threshold
    if threshold is None and "threshold" in args.sparsifiers:
        threshold = calibrated_threshold(work.grads[0], args.density)
    config = {
        "model": args.model, "numel": work.numel, "tensors": len(work.layout), "density": args.density,
        "budget": planning.budget(args.density, work.numel), "workers": args.workers, "sparsifiers": args.sparsifiers,
        "repeats": args.repeats, "warmup": args.warmup, "device": args.device,
        "device_name": machine["gpu"] or machine["cpu_model"], "seed": args.seed, "threads": args.threads,
        "distinct_gradients": args.distinct_gradients, "train_steps": args.train_steps,
        "threshold": threshold, "threshold_calibrated": args.threshold is None and threshold is not None,
        "clock": args.clock,
        "gradient_seconds": work.seconds}
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(args.workers) * len(args.sparsifiers) * (args.warmup + args.repeats),
                   desc="deft-bench", unit="step", file=sys.stderr)
    results: list[dict] = []
    try:
        for n in args.workers:
            for name in args.sparsifiers:
                if bar is not None:
                    bar.set_postfix_str(f"{name} n={n}")
                ranks = simulated_ranks(name, n, args.distinct_gradients)
                same = next((r for r in results if (r["sparsifier"], r["simulated_ranks"]) == (name, ranks)), None)
                if same is None:
                    results.append(simulate(name, args.density, work, n, warmup=args.warmup, repeats=args.repeats,
                                            options=sparsifier_options(name, threshold), clock=args.clock,
                                            progress=bar))
                    continue
                results.append({**for_workers(same, n), "simulation_of_workers": same["workers"]})
                if bar is not None:
                    bar.update(args.warmup + args.repeats)
    finally:
        if bar is not None:
            bar.close()
    machine["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc = {"schema": 1, "command": args.command, "machine": machine, "config": config,
           "summary": summarize(results), "results": results, "seconds": time.perf_counter() - start}
    table = format_table(results, config)
    print(table)
    stem = Path(args.out) / output_stem(args.model, args.device, args.clock)
    written = [f"{stem}.txt", f"{stem}.json"]
    Path(written[0]).write_text(table)
    Path(written[1]).write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_plot:
        try:
            plot(results, config, Path(f"{stem}.png"))
            written.append(f"{stem}.png")
        except Exception as e:  # noqa: BLE001  (the measurements are written; a picture is not worth losing them)
            print(f"deft-bench: plot skipped ({type(e).__name__}: {e}); the table and the JSON are written",
                  file=sys.stderr)
    print(f"wrote {', '.join(written)} ({time.perf_counter() - start:.0f} s in all, the model and its gradients "
          f"{work.seconds:.0f} s)")
    return doc


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
