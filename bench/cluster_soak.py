"""Soak run: 4 nodes of the emulated cluster train with the DEFT hook under ``torchrun --max-restarts``
(examples/elastic_ddp.py, a checkpoint per rank every --every steps) for --steps steps, while faults
are injected at random steps: a node's training process SIGKILLed, or a node's link taken down for a
while (shorter than the process group's timeout: the step stalls and goes on; longer: every rank
raises and torchrun restarts the group). The same run without faults gives the reference.

    python bench/cluster_soak.py run --mode clean   --out bench/results/cluster_soak
    python bench/cluster_soak.py run --mode faulted --out bench/results/cluster_soak
    python bench/cluster_soak.py report --out bench/results/cluster_soak

(the committed run; without ``--out`` the files go to deft-bench-results/cluster_soak).

``run`` writes OUT/<mode>.json (faults injected, restarts, steps run and lost, the conservation
ledger, final-parameter checksum, wall time), OUT/<mode>_loss.csv (rank 0's loss per step, from the
attempt that the final trajectory kept) and OUT/<mode>_events.log (the workers' start/failure/done
lines and the injector's log: the raw output); with the faulted mode also OUT/metrics_rank0.csv
(deft_kernels.metrics, appended across restarts). ``report`` compares the two runs and plots
OUT/loss.png and OUT/metrics.png. Needs root and iproute2; prefix "dko".
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.elastic import RESTART_ENV  # torchrun's restarts reconnect only with it

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "elastic_ddp.py")


class Node:
    def __init__(self, cluster, node: int, argv: list[str]) -> None:
        self.proc = cluster.popen(node, argv, env=RESTART_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self.last_step = -1
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((time.time(), line))
            m = re.search(r"step rank=\d+ step=(\d+)", line)
            if m:
                self.last_step = int(m.group(1))


def run(args) -> None:
    from deft_kernels.benchmarks.cluster import Cluster, check_available

    missing = check_available()
    if missing:
        sys.exit(f"cluster_soak: {missing}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="deft_soak_"))
    faulted = args.mode == "faulted"
    rng = random.Random(args.seed)
    fault_steps = sorted(rng.sample(range(args.every * 2, args.steps - args.every), args.faults)) if faulted else []
    injected: list[dict] = []
    log: list[str] = []
    if faulted and (out / "metrics_rank0.csv").exists():
        (out / "metrics_rank0.csv").unlink()
    worker_args = ["--ckpt", str(work / "ckpt"), "--out", str(work / "final"), "--steps", str(args.steps),
                   "--every", str(args.every), "--timeout", str(args.timeout), "--width", str(args.width),
                   "--warmup", "10", "--density", str(args.density)]
    if faulted:
        worker_args += ["--metrics", str(work / "metrics")]
    t0 = time.time()
    try:
        with Cluster(args.nodes, bandwidth=args.bandwidth, prefix="dko") as c:
            nodes = [Node(c, i, c.torchrun_argv(i, [WORKER, *worker_args], max_restarts=args.faults + 2,
                                                port=29461, rdzv_id=f"soak-{args.mode}", monitor_interval=0.5))
                     for i in range(args.nodes)]
            stopped = False
            for step in fault_steps:
                while nodes[0].last_step < step and not stopped:
                    stopped = any(n.proc.poll() is not None for n in nodes) or time.time() - t0 > args.deadline
                    time.sleep(0.05)
                if stopped:  # a node's torchrun gave up (or the deadline passed): summarise what happened
                    log.append(f"injector stopped at step {nodes[0].last_step}: a torchrun exited or the deadline passed")
                    break
                time.sleep(rng.uniform(0, 0.05))
                victim = rng.randrange(args.nodes)
                kind = rng.choice(args.kinds)
                record = {"step": nodes[0].last_step, "node": victim, "kind": kind, "t": round(time.time() - t0, 3)}
                if kind == "kill":
                    pid = c.find_process(victim, WORKER)
                    if pid is None:  # between attempts: nothing to kill
                        record["kind"] = "kill_missed"
                    else:
                        os.kill(pid, signal.SIGKILL)
                else:
                    down = rng.uniform(1.0, args.timeout / 2) if kind == "flap_short" else args.timeout + rng.uniform(0.5, 2)
                    record["down_s"] = round(down, 2)
                    c.link_down(victim)
                    time.sleep(down)
                    c.link_up(victim)
                injected.append(record)
                log.append(f"injector {json.dumps(record)}")
                print(f"injected {record}", flush=True)
            deadline = t0 + args.deadline
            for n in nodes:
                try:
                    n.proc.wait(timeout=max(1.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    log.append("deadline passed: killed")
            codes = [n.proc.poll() for n in nodes]
        for i, n in enumerate(nodes):
            n.thread.join(5)
            (Path(tempfile.gettempdir()) / f"deft_soak_{args.mode}_node{i}.log").write_text(
                "\n".join(f"{t:.3f} {line}" for t, line in n.lines))
        wall = time.time() - t0
        summarise(args, out, nodes, codes, injected, log, wall, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarise(args, out: Path, nodes, codes, injected, log, wall, work: Path) -> None:
    import torch

    events, starts, failures, done, losses, executed = [], [], [], [], {}, 0
    stamps, step_s = {}, {}  # rank 0: each step's end time; step durations, warm-up (True) and sparse
    for i, n in enumerate(nodes):
        for t, line in n.lines:
            m = re.search(r"step rank=(\d+) step=(\d+) loss=(\S+) t=(\S+)", line)
            if m:
                executed += m.group(1) == "0"
                if m.group(1) == "0":
                    step = int(m.group(2))
                    losses[step] = float(m.group(3))  # a re-run step overwrites: the kept trajectory
                    if step - 1 in stamps and float(m.group(4)) > stamps[step - 1]:
                        step_s.setdefault(step < 10, []).append(float(m.group(4)) - stamps[step - 1])
                    stamps[step] = float(m.group(4))
                continue
            if re.search(r"\b(start|failure|done) ", line):
                events.append(f"n{i} {t:.3f} {line}")
                if "start rank=" in line:
                    starts.append(dict(kv.split("=", 1) for kv in line.split("start ", 1)[1].split()[:3]))
                elif "failure rank=" in line:
                    failures.append(line)
                elif "done {" in line:
                    done.append(json.loads(line.split("done ", 1)[1]))
    attempts = max((int(s["attempt"]) for s in starts), default=0)
    saved = work / "final" / "final_rank0.pt"
    final = torch.cat([p.flatten() for p in torch.load(saved)]) if saved.exists() else None
    result = {
        "mode": args.mode, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                      f"torch {torch.__version__}",
        "nodes": args.nodes, "bandwidth": args.bandwidth, "steps": args.steps, "every": args.every,
        "pg_timeout_s": args.timeout, "kinds": args.kinds, "density": args.density, "width": args.width, "seed": args.seed,
        "exit_codes": codes, "wall_s": round(wall, 1),
        "faults_injected": len(injected), "faults": injected,
        "failures_raised": len(failures), "restarts": attempts,
        "median_step_ms": {"dense_warmup": _median_ms(step_s.get(True)), "deft_sparse": _median_ms(step_s.get(False))},
        "steps_executed_rank0": executed, "steps_lost": executed - args.steps,
        "resumed_from": sorted({int(s["resumed"]) for s in starts if s["resumed"] != "0"}),
        "ledger": sorted(done, key=lambda d: d["rank"]),
        "final_param_sum": None if final is None else float(final.double().sum()),
        "final_param_sha": None if final is None else _sha(final),
    }
    (out / f"{args.mode}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.mode}_loss.csv").write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in sorted(losses.items())))
    (out / f"{args.mode}_events.log").write_text("\n".join(log + events) + "\n")
    metrics = work / "metrics" / "rank0.csv"
    if metrics.exists():
        shutil.copy(metrics, out / "metrics_rank0.csv")
    print(json.dumps({k: v for k, v in result.items() if k not in ("faults", "ledger")}, indent=1))


def _median_ms(values):
    return round(1e3 * sorted(values)[len(values) // 2], 1) if values else None


def _sha(t) -> str:
    import hashlib

    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def report(args) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    runs = {m: json.loads((out / f"{m}.json").read_text()) for m in ("clean", "faulted")}
    curves = {m: list(csv.DictReader(open(out / f"{m}_loss.csv"))) for m in runs}
    fig, ax = plt.subplots(figsize=(9, 4))
    for m, style in (("clean", "-"), ("faulted", "--")):
        ax.plot([int(r["step"]) for r in curves[m]], [float(r["loss"]) for r in curves[m]], style, lw=0.8,
                label=f"{m} ({runs[m]['restarts']} restarts, {runs[m]['faults_injected']} faults)")
    for f in runs["faulted"]["faults"]:
        ax.axvline(f["step"], color={"kill": "red", "flap_long": "orange"}.get(f["kind"], "grey"), lw=0.6, alpha=0.6)
    ax.set(xlabel="step", ylabel="rank 0 loss", yscale="log",
           title=f"{runs['clean']['nodes']} nodes at {runs['clean']['bandwidth']}, DEFT d={runs['clean']['density']}: "
                 "faults (red kill, orange long link cut, grey short flap)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plot_metrics(out / "metrics_rank0.csv", out / "metrics.png", faults=runs["faulted"]["faults"])
    if runs["faulted"]["final_param_sha"] is None:
        print("the faulted run did not finish: no final parameters to compare")
    else:
        same = runs["clean"]["final_param_sha"] == runs["faulted"]["final_param_sha"]
        print(f"final parameters of the faulted and the clean run {'identical' if same else 'DIFFER'}")


def plot_metrics(csv_path: Path, png: Path, faults=()) -> None:
    """The dashboard a metrics CSV (deft_kernels.metrics.CsvSink) makes: one panel per figure, the
    per-step totals (rows with bucket == "all") against the step."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(csv_path)) if r["bucket"] == "all" and r["phase"] == "sparse"]
    steps = [int(r["step"]) for r in rows]
    panels = [("bytes_sent", "bytes sent per step"), ("bytes_received", "bytes received per step"),
              ("density_sent", "density sent (asked: {})".format(rows[0]["density_asked"] if rows else "?")),
              ("residual_ratio", "residual norm / gradient norm"), ("t_select", "selection time (s)"),
              ("exposed", "exposed exchange time (s)"), ("t_comm", "waiting for collectives (s)"),
              ("bin_imbalance", "DEFT bin imbalance (max/mean)")]
    fig, axes = plt.subplots(4, 2, figsize=(11, 10), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [float(r[key]) for r in rows], ".", ms=1.5)
        for f in faults:
            ax.axvline(f["step"], color={"kill": "red", "flap_long": "orange"}.get(f["kind"], "grey"), lw=0.5, alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(f"deft_kernels.metrics, rank 0 ({csv_path.name}); vertical lines: injected faults", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mode", choices=["clean", "faulted"], required=True)
    r.add_argument("--out", default=f"{DEFAULT_OUT}/cluster_soak")
    r.add_argument("--nodes", type=int, default=4)
    r.add_argument("--bandwidth", default="100mbit")
    r.add_argument("--steps", type=int, default=2000)
    r.add_argument("--every", type=int, default=50)
    r.add_argument("--faults", type=int, default=8)
    r.add_argument("--timeout", type=float, default=10.0, help="process group timeout (s)")
    r.add_argument("--density", type=float, default=0.01)
    r.add_argument("--width", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--kinds", nargs="+", default=["kill", "flap_short", "flap_long"],
                   choices=["kill", "flap_short", "flap_long"], help="fault kinds drawn from")
    r.add_argument("--deadline", type=float, default=460.0, help="seconds before the run is abandoned")
    q = sub.add_parser("report")
    q.add_argument("--out", default=f"{DEFAULT_OUT}/cluster_soak")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
