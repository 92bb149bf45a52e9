"""Which bin-packing cost model balances DEFT's bins best, judged by MEASURED bin selection times.

    .venv/bin/python bench/cost_models.py [--model resnet50] [--workers 2 4 8 16 32] [--threads 1 2]

For each n, on a real accumulated gradient of the model (fragments, local k and common part exactly
as ``deft_kernels.planning`` makes them for that n), the selectable fragments are packed into n bins
by LPT (``planning.pack_bins``) under each cost model:

- ``size_log_k``: the paper's ``size * log2(k)``;
- ``size``: the fragment size alone (the planner's default, ``planning.DEFAULT_COST_MODEL``);
- ``measured``: the kernel time of each fragment alone (``ops.segmented_topk`` over that one fragment
  with its k, median of ``--repeats``), profiled on a *different* worker's gradient with the same k,
  as a planner would use a profile from an earlier step;
- ``affine_fit``: ``a * size + b * k + c`` with the coefficients fitted (least squares) to that
  profile: per element scanned, per element selected, and a fixed cost per fragment.

Then each bin's selection (one ``segmented_topk`` call over the bin's fragments, what a DEFT worker
runs) is timed, bins interleaved round by round so machine noise spreads evenly over them, median of
``--repeats``. The default clock is the thread's CPU time with one thread (``--clock cpu``), which
leaves out the time slices other processes take on a shared machine; ``--clock wall`` measures
elapsed time (needed for more than one thread). Reported per (threads, n, model): the imbalance of the measured bin times (max / mean,
1.0 is perfect), the slowest bin (the step's critical path), and the model's own predicted imbalance.

Writes ``OUT/cost_models_<model>_cpu.{txt,json}`` (``--out`` OUT: deft-bench-results/ by default,
bench/results for the committed files).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from deft_kernels import ops, planning
from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.benchmarks import worker_count as bench


def interleaved_medians(calls: list, repeats: int, clock) -> list[float]:
    """Median seconds of each zero-argument call, timed round-robin ``repeats`` times after one warm-up
    round, so slow patches of a shared machine hit every call alike."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = clock()
            call()
            times[i].append(clock() - start)
    return [statistics.median(t) for t in times]


def topk_call(acc: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, frags: torch.Tensor):
    return lambda: ops.segmented_topk(acc, offsets, k, frags, validate=False)


def evaluate(acc: torch.Tensor, profile_acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, n: int,
             density: float, repeats: int, clock) -> list[dict]:
    sizes = offsets[1:] - offsets[:-1]
    k = planning.local_k(norms, sizes, int(density * acc.numel()))
    selectable = torch.nonzero((k > 0) & (k < sizes)).flatten()
    fragment_seconds = torch.zeros(sizes.numel(), dtype=torch.float64)
    measured = interleaved_medians([topk_call(profile_acc, offsets, k, selectable[i:i + 1])
                                    for i in range(selectable.numel())], repeats, clock)
    fragment_seconds[selectable] = torch.tensor(measured, dtype=torch.float64)
    costs = {name: model(sizes, k).double() for name, model in planning.COST_MODELS.items()}
    costs["measured"] = fragment_seconds
    # Least squares t = a * size + b * k + c over the same profile: per element, per selected element
    # and per fragment (call and scheduling overhead).
    features = torch.stack([sizes.double(), k.double(), torch.ones(sizes.numel(), dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(features[selectable], fragment_seconds[selectable].unsqueeze(1)).solution.flatten()
    costs["affine_fit"] = features @ coef
    fit = {"ns_per_element": 1e9 * float(coef[0]), "ns_per_k": 1e9 * float(coef[1]),
           "us_per_fragment": 1e6 * float(coef[2])}
    rows = []
    for name, cost in costs.items():
        bins = planning.pack_bins(cost, n, selectable)
        seconds = interleaved_medians([topk_call(acc, offsets, k, b) for b in bins], repeats, clock)
        rows.append({"workers": n, "cost_model": name, "fragments": int(sizes.numel()),
                     "selectable": int(selectable.numel()), "bin_ms": [1e3 * s for s in seconds],
                     "max_bin_ms": 1e3 * max(seconds), "mean_bin_ms": 1e3 * statistics.mean(seconds),
                     "imbalance_measured": planning.imbalance(seconds),
                     "imbalance_model": planning.imbalance([float(cost[b].sum()) for b in bins]),
                     "sum_fragment_ms": 1e3 * float(fragment_seconds.sum())})
    rows[-1]["fit"] = fit
    # The profile itself, for fitting other cost models offline.
    rows[-2]["profile"] = {"fragment": selectable.tolist(), "size": sizes[selectable].tolist(),
                           "k": k[selectable].tolist(), "ms": [1e3 * t for t in measured]}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to measure with")
    p.add_argument("--clock", choices=sorted(bench.CLOCKS), default="cpu",
                   help="cpu: the thread's CPU time (one thread only; steady on a shared machine); wall: elapsed")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if any(n < 2 for n in args.workers):
        p.error(f"--workers must be at least 2 (one bin needs no packing), got {args.workers}")
    if any(t < 1 for t in args.threads) or args.repeats < 1:
        p.error("--threads and --repeats must be positive integers")
    if not 0 < args.density <= 1:
        p.error(f"--density must lie in (0, 1], got {args.density}")
    if args.clock == "cpu" and args.threads != [1]:
        p.error("--clock cpu times the calling thread: it needs --threads 1 (or pass --clock wall)")
    clock = bench.CLOCKS[args.clock]

    work = bench.make_workload(args.model, 2, args.seed, "cpu")
    machine = bench.machine_info("cpu")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.workers:
            offsets = planning.fragment_offsets(work.sizes, n)
            acc, profile_acc = (torch.zeros_like(g) for g in work.grads)
            norms = ops.accumulate_norms(work.grads[0], acc, offsets)  # a = g at the first step
            ops.accumulate_norms(work.grads[1], profile_acc, offsets)
            for row in evaluate(acc, profile_acc, norms, offsets, n, args.density, args.repeats, clock):
                rows.append({"threads": threads, **row})
                print(f"threads {threads} n {n:>2} {row['cost_model']:<11} measured imbalance "
                      f"{row['imbalance_measured']:.3f} slowest bin {row['max_bin_ms']:.3f} ms", flush=True)

    lines = [f"model {args.model}: N = {work.numel:,}, d = {args.density:g}, median of {args.repeats} interleaved runs "
             f"({'thread CPU time' if args.clock == 'cpu' else 'wall-clock time'}), "
             f"{machine['cpu_model']} ({machine['cpu_count']} cores, shared: load average at start "
             f"{machine['load_average_start'][0]:.2f})",
             "", f"{'threads':>7}{'n':>4}{'cost model':>12}{'measured max/mean':>19}{'slowest bin ms':>16}"
                 f"{'mean bin ms':>13}{'model max/mean':>16}"]
    for r in rows:
        lines.append(f"{r['threads']:>7}{r['workers']:>4}{r['cost_model']:>12}{r['imbalance_measured']:>19.3f}"
                     f"{r['max_bin_ms']:>16.3f}{r['mean_bin_ms']:>13.3f}{r['imbalance_model']:>16.3f}")
    lines.append("")
    models = list(dict.fromkeys(r["cost_model"] for r in rows))
    for threads in args.threads:
        mine = [r for r in rows if r["threads"] == threads]
        summary = ", ".join(
            f"{m} {statistics.geometric_mean([r['imbalance_measured'] for r in mine if r['cost_model'] == m]):.3f}"
            for m in models)
        lines.append(f"threads {threads}: geometric mean over n of the measured imbalance: {summary}")
        for r in mine:
            if "fit" in r:
                f = r["fit"]
                lines.append(f"  n = {r['workers']:>2}: fitted fragment time {f['ns_per_element']:.3f} ns x size + "
                             f"{f['ns_per_k']:.2f} ns x k + {f['us_per_fragment']:.1f} us")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cost_models_{bench.output_stem(args.model, 'cpu').removeprefix('worker_count_')}"
    Path(f"{stem}.txt").write_text(text)
    machine["load_average_end"] = os.getloadavg()
    Path(f"{stem}.json").write_text(json.dumps({"command": " ".join(shlex.quote(a) for a in sys.argv),
                                                "machine": machine, "config": vars(args), "results": rows},
                                               indent=1) + "\n")
    print(f"wrote {stem}.txt, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
