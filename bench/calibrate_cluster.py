"""Calibrate the step model's links on the emulated cluster: time gloo's all-reduce, all-gather and
broadcast of several sizes between real processes on shaped links (deft_kernels.benchmarks.cluster,
prefix "dkp"), then fit the per-message latency alpha and the bandwidth B of each shaped rate by
least squares on the model's own cost formulas (deft_kernels.benchmarks.perf_model, gloo's algorithms).

    python bench/calibrate_cluster.py [--nodes 2 4] [--bandwidth 100mbit 1gbit 10gbit] [--reps 5]

Every launch is one torchrun per node (one process each, one thread, gloo, ``GLOO_SOCKET_IFNAME``
the node's veth); each collective is timed on every rank after a barrier, and a repetition's time is
the slowest rank's. The fit pools, per rate, every size and both node counts of the ring all-reduce
(``2(n-1) alpha + 2(n-1)/n S/B``), the ring all-gather (``(n-1) alpha + (n-1) s/B``) and gloo's
broadcast (``(n-1) (alpha + S/B)``: the root sends to each rank in turn, as measured: 3x the 2-node
time at 4 nodes): B by least squares on the times, alpha from the 4 KiB messages
(:func:`fit`). Writes
OUT/calibrate_cluster.{txt,json} (``--out``: deft-bench-results by default, bench/results for the
committed files): every repetition of every launch, the fits, and each
measurement next to the fitted model. Needs root and iproute2 (it stops with one line otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from deft_kernels.benchmarks import DEFAULT_OUT

OPS = ("all_reduce", "all_gather", "broadcast")
SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20)  # bytes per rank; 16 MiB is added from 1 Gb/s on


# ---- in each node, under torchrun -----------------------------------------------------------------


def worker(cfg: dict) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    rows = []
    for op in OPS:
        for size in cfg["sizes"]:
            x = torch.ones(size // 4)
            outs = [torch.empty_like(x) for _ in range(n)]
            times = []
            for rep in range(cfg["warmup"] + cfg["reps"]):
                dist.barrier()
                start = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(x)
                elif op == "all_gather":
                    dist.all_gather(outs, x)
                else:
                    dist.broadcast(x, src=0)
                seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank's
                if rep >= cfg["warmup"]:
                    times.append(float(seconds))
            rows.append({"op": op, "bytes": size, "seconds": times})
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()
    return 0


# ---- on the host: the launches and the fit --------------------------------------------------------


def launch(nodes: int, bandwidth: str, cfg: dict, timeout: float) -> list[dict]:
    from deft_kernels.benchmarks.cluster import Cluster

    with Cluster(nodes=nodes, bandwidth=bandwidth, prefix="dkp") as c:
        results = c.run(lambda node: c.torchrun_argv(node.index, [__file__, "--worker", json.dumps(cfg)]),
                        timeout=timeout, env={"OMP_NUM_THREADS": "1"})
    for i, r in enumerate(results):
        if r.returncode:
            raise RuntimeError(f"node {i} exited {r.returncode} (n = {nodes}, {bandwidth}): {r.stderr[-2000:]}")
    lines = [line for line in results[0].stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"node 0 printed no result (n = {nodes}, {bandwidth}): {results[0].stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def features(op: str, n: int, nbytes: float) -> tuple[float, float]:
    """(coefficient of alpha, coefficient of 1/B) of ``op`` by gloo's algorithms: ring all-reduce
    and all-gather, broadcast from the root to each other rank in turn."""
    if op == "all_reduce":
        return 2 * (n - 1), 2 * (n - 1) / n * nbytes
    if op in ("all_gather", "broadcast"):
        return n - 1, (n - 1) * nbytes
    raise ValueError(op)


SMALL = 4 << 10  # bytes: messages whose time is latency, not bandwidth


def fit(measurements: list[dict]) -> dict:
    """B (bytes/s) by least squares on the times of all three collectives (the large messages,
    which carry a step's gradients, set it); then alpha (s) as the median over the small messages
    (4 KiB) of their time left after the bandwidth term, per latency step. One joint fit would
    give alpha ~ 0: on the times of large messages a millisecond of latency does not show, while a
    4 KiB collective between processes sharing 2 cores takes 0.1-10 ms."""
    from deft_kernels.benchmarks import perf_model as pm

    feats = [features(m["op"], m["nodes"], m["bytes"]) for m in measurements]
    joint_alpha, inv_b = pm.fit_nonnegative(feats, [m["median_s"] for m in measurements])
    small = [(m["median_s"] - f[1] * inv_b) / f[0] for m, f in zip(measurements, feats) if m["bytes"] <= SMALL]
    alpha = max(0.0, statistics.median(small)) if small else joint_alpha
    return {"alpha_s": alpha, "bandwidth_Bps": 1 / inv_b if inv_b > 0 else float("inf"),
            "bandwidth_gbps": 8 / inv_b / 1e9 if inv_b > 0 else float("inf"), "points": len(measurements),
            "joint_fit_alpha_s": joint_alpha, "small_messages": len(small)}


def predict(op: str, n: int, nbytes: float, alpha: float, bandwidth: float) -> float:
    from deft_kernels.benchmarks import perf_model as pm

    net = pm.Network(pm.Link(alpha, bandwidth), library="gloo")
    return {"all_reduce": pm.all_reduce, "all_gather": pm.all_gather, "broadcast": pm.broadcast}[op](n, nbytes, net)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--bandwidth", nargs="+", default=["100mbit", "1gbit", "10gbit"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per launch before every node is killed")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder of the .txt and .json (bench/results: the committed ones)")
    p.add_argument("--refit", metavar="JSON", help="no measurement: fit again the measurements of an earlier run")
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    from deft_kernels.benchmarks.cluster import check_available, parse_rate
    from deft_kernels.benchmarks.worker_count import machine_info

    command = "python bench/calibrate_cluster.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.refit:
        earlier = json.loads(Path(args.refit).read_text())
        measurements, machine = earlier["measurements"], earlier["machine"]
        command = f"{earlier['command']}  (refitted: {command})"
        date = earlier.get("date", "")
    else:
        missing = check_available()
        if missing:
            print(f"calibrate_cluster: {missing}", file=sys.stderr)
            return 2
        machine, measurements = machine_info("cpu"), []
        date = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
        for bw in args.bandwidth:
            sizes = list(SIZES) + ([16 << 20] if parse_rate(bw) >= 1e9 else [])
            cfg = {"sizes": sizes, "reps": args.reps, "warmup": args.warmup}
            for n in args.nodes:
                start = time.time()
                for row in launch(n, bw, cfg, args.timeout):
                    measurements.append({"bandwidth": bw, "nodes": n, **row,
                                         "median_s": statistics.median(row["seconds"])})
                print(f"calibrate_cluster: {bw} n={n} in {time.time() - start:.0f} s", file=sys.stderr)
    fits = {}
    for bw in dict.fromkeys(m["bandwidth"] for m in measurements):
        fits[bw] = fit([m for m in measurements if m["bandwidth"] == bw])
        fits[bw]["set_gbps"] = parse_rate(bw) / 1e9
    lines = [command, f"{date}; gloo, one process per node, one thread; median of the slowest rank over the "
             "repetitions; fit and model: gloo's algorithms (ring all-reduce and all-gather, broadcast root to each)", "",
             f"{'rate':>8} {'set Gb/s':>9} {'fitted Gb/s':>12} {'alpha us':>9}",
             *(f"{bw:>8} {f['set_gbps']:>9.3g} {f['bandwidth_gbps']:>12.3g} {1e6 * f['alpha_s']:>9.1f}" for bw, f in fits.items()),
             "", f"{'rate':>8} {'n':>2} {'op':<11}{'bytes':>10}{'measured ms':>13}{'model ms':>10}{'model/meas':>11}"]
    for m in measurements:
        f = fits[m["bandwidth"]]
        m["model_s"] = predict(m["op"], m["nodes"], m["bytes"], f["alpha_s"], f["bandwidth_Bps"])
        lines.append(f"{m['bandwidth']:>8} {m['nodes']:>2} {m['op']:<11}{m['bytes']:>10}{1e3 * m['median_s']:>13.2f}"
                     f"{1e3 * m['model_s']:>10.2f}{m['model_s'] / m['median_s']:>11.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibrate_cluster.txt").write_text(text)
    (out / "calibrate_cluster.json").write_text(json.dumps(
        {"command": command, "date": date, "machine": machine, "fits": fits, "measurements": measurements},
        indent=1) + "\n")
    print(f"wrote {out / 'calibrate_cluster.txt'}, {out / 'calibrate_cluster.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
