"""Checks deft-bench's one-process simulation of n workers against a real run of n gloo processes.

    .venv/bin/python bench/validate_simulation.py [--model resnet50] [--workers 2 4] [--threads 1]

Both sides get the same real gradients (computed once here, saved, and loaded by every rank: rank
``r`` holds gradient ``r mod P`` in both) and run the same steps (``--warmup`` + ``--repeats``) of
every sparsifier. The real side is ``Sparsifier.step`` in ``n`` processes on 127.0.0.1 (gloo), each
with ``torch.set_num_threads(--threads)``, the simulation ``deft_kernels.benchmarks.worker_count.simulate`` with the
same thread count. Per measured step it compares:

- **sent count** (the global index set): must be equal, step by step. Both sides run the same kernels
  on the same data with the same error feedback, so anything else is a bug.
- **selection time** (critical path, ``max over ranks of StepStats.t_select`` in the real run, which
  is the leader's plan plus its select, or another rank's select): the medians must agree within
  ``--time-factor`` when the ranks fit the machine (``n * threads <= cores``). When they do not, the
  real ranks share cores and are slowed by up to ``n * threads / cores``; the allowed factor is
  multiplied by that, and the report says so.

Every spawn has a hard timeout; on expiry the ranks are killed and the run fails. Writes
``OUT/validate_simulation_<model>.{txt,json}`` (``--out`` OUT: deft-bench-results/ by default,
bench/results for the committed files). Exits 1 when a sent count differs (a bug); a time outside
the factor is reported, not fatal (the timings are noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deft_kernels import driver, sparsifiers
from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.benchmarks import worker_count as bench


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world_size: int, port: int, shard_dir: str, shards: int, names: list[str],
              density: float, warmup: int, repeats: int, threads: int, threshold: float) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        saved = torch.load(Path(shard_dir) / f"grad{rank % shards}.pt")
        grad, sizes = saved["grad"], saved["sizes"]
        records = {}
        for name in names:
            sp = sparsifiers.build(name, density, **bench.sparsifier_options(name, threshold))
            steps = []
            for step in range(warmup + repeats):
                dist.barrier()  # ranks start each step together, as after a synchronous backward
                _, stats = driver.step(sp, grad, sizes=sizes)
                if step >= warmup:
                    steps.append({"t_select": stats.t_select, "sent": stats.sent, "selected": stats.selected})
            records[name] = steps
        (Path(shard_dir) / f"rank{rank}_n{world_size}.json").write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def run_real(world_size: int, shard_dir: str, shards: int, names: list[str], density: float, warmup: int,
             repeats: int, threads: int, threshold: float, timeout: float) -> list[dict]:
    """Spawns the ranks, waits at most ``timeout`` seconds, kills them past it; returns each rank's
    records."""
    ctx = mp.start_processes(rank_main, args=(world_size, free_port(), shard_dir, shards, names, density, warmup,
                                              repeats, threads, threshold), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world_size}-rank run did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((Path(shard_dir) / f"rank{r}_n{world_size}.json").read_text()) for r in range(world_size)]


def compare(name: str, n: int, sim: dict, real_ranks: list[dict], factor: float) -> dict:
    real_steps = [r[name] for r in real_ranks]
    sent_real = [step[0]["sent"] for step in zip(*real_steps)]
    agree = all(len({s["sent"] for s in step}) == 1 for step in zip(*real_steps))
    sent_sim = [s["sent"] for s in sim["steps"]]
    t_real = [max(s["t_select"] for s in step) for step in zip(*real_steps)]
    t_sim = [s["t_select"] for s in sim["steps"]]
    ratio = statistics.median(t_real) / statistics.median(t_sim)
    return {"sparsifier": name, "workers": n, "sent_real": sent_real, "sent_sim": sent_sim,
            "sent_same_on_all_ranks": agree, "density_match": agree and sent_real == sent_sim,
            "numel": sim["numel"], "t_real_ms": 1e3 * statistics.median(t_real),
            "t_sim_ms": 1e3 * statistics.median(t_sim), "time_ratio": ratio, "allowed_factor": factor,
            "time_within": 1 / factor <= ratio <= factor,
            "selected_real": [[s["selected"] for s in step] for step in zip(*real_steps)],
            "selected_sim": [s["selected"] for s in sim["steps"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sparsifiers", nargs="+", default=["all"])
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank, and of the simulated worker")
    p.add_argument("--distinct-gradients", type=int, default=4)
    p.add_argument("--time-factor", type=float, default=1.5,
                   help="allowed ratio of real to simulated median selection time when the ranks fit the cores")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a spawn is killed")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if any(n < 2 for n in args.workers):
        p.error(f"--workers must be at least 2 (one worker needs no process group), got {args.workers}")
    for name, value in (("--repeats", args.repeats), ("--threads", args.threads),
                        ("--distinct-gradients", args.distinct_gradients)):
        if value < 1:
            p.error(f"{name} must be a positive integer, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be non-negative, got {args.warmup}")
    if not 0 < args.density <= 1:
        p.error(f"--density must lie in (0, 1], got {args.density}")
    if args.time_factor < 1 or args.timeout <= 0:
        p.error("--time-factor must be >= 1 and --timeout positive")
    names = bench.benchable() if [s.lower() for s in args.sparsifiers] == ["all"] else [s.lower() for s in args.sparsifiers]
    unknown = sorted(set(names) - set(bench.benchable()))
    if unknown:
        p.error(f"--sparsifiers: unknown {unknown}; choose from {bench.benchable()}")

    torch.set_num_threads(args.threads)
    cores = len(os.sched_getaffinity(0))
    work = bench.make_workload(args.model, args.distinct_gradients, seed=0, device="cpu")
    threshold = bench.calibrated_threshold(work.grads[0], args.density)  # as deft-bench calibrates it
    rows, lines = [], []
    header = (f"model {args.model}: N = {work.numel:,}, d = {args.density:g}, {args.threads} thread(s) per rank, "
              f"{cores} cores, {args.distinct_gradients} distinct gradients, median of {args.repeats} steps "
              f"after {args.warmup} warm-up, load average {os.getloadavg()[0]:.2f}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for s, g in enumerate(work.grads):
            torch.save({"grad": g, "sizes": work.sizes}, Path(tmp) / f"grad{s}.pt")
        for n in args.workers:
            oversubscribed = max(1.0, n * args.threads / cores)
            factor = args.time_factor * oversubscribed
            start = time.perf_counter()
            real = run_real(n, tmp, len(work.grads), names, args.density, args.warmup, args.repeats, args.threads,
                            threshold, args.timeout)
            print(f"n = {n}: real run {time.perf_counter() - start:.1f} s"
                  + (f" (ranks share cores: {oversubscribed:.1f}x oversubscribed, factor {factor:.2f})"
                     if oversubscribed > 1 else ""))
            for name in names:
                sim = bench.simulate(name, args.density, work, n, warmup=args.warmup, repeats=args.repeats,
                                     options=bench.sparsifier_options(name, threshold))
                rows.append(compare(name, n, sim, real, factor))
    lines.append(header)
    lines.append(f"\n{'sparsifier':<16}{'n':>3}{'real ms':>10}{'sim ms':>10}{'real/sim':>10}{'allowed':>9}"
                 f"{'time ok':>9}{'density (sent/N)':>20}{'exact':>7}")
    for r in rows:
        lines.append(f"{r['sparsifier']:<16}{r['workers']:>3}{r['t_real_ms']:>10.2f}{r['t_sim_ms']:>10.2f}"
                     f"{r['time_ratio']:>10.2f}{r['allowed_factor']:>9.2f}{'yes' if r['time_within'] else 'NO':>9}"
                     f"{100 * statistics.median(r['sent_real']) / r['numel']:>19.4f}%"
                     f"{'yes' if r['density_match'] else 'NO':>7}")
    ok_density = all(r["density_match"] for r in rows)
    ok_time = all(r["time_within"] for r in rows)
    lines.append(f"\ndensity identical at every step: {'yes' if ok_density else 'NO'}; "
                 f"selection time within the allowed factor: {'yes' if ok_time else 'NO'}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"validate_simulation_{bench.output_stem(args.model, 'cpu').removeprefix('worker_count_').removesuffix('_cpu')}"
    Path(f"{stem}.txt").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps({
        "command": " ".join(shlex.quote(a) for a in sys.argv), "machine": bench.machine_info("cpu"),
        "config": vars(args) | {"sparsifiers": names, "numel": work.numel, "cores": cores},
        "density_identical": ok_density, "time_within": ok_time, "results": rows}, indent=1) + "\n")
    print(f"wrote {stem}.txt, {stem}.json")
    return 0 if ok_density else 1


if __name__ == "__main__":
    sys.exit(main())
