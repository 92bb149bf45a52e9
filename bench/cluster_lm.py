"""Time to the same validation loss for a byte-level GPT over the emulated cluster: DDP's all-reduce,
torch's PowerSGD hook at ranks 1, 4 and 16, Top-k and DEFT at d = 1% and 0.1% (DEFT with either plan
protocol: ``deft-ahead``, the plan one step ahead, and ``deft-leader``, the paper's) train the same
model from the same seed on the same batches, one process per node.

    python bench/cluster_lm.py --nodes 2 --bandwidth 200mbit --seed 0   # one launch (needs root)
    python bench/cluster_lm.py --report                                 # table, JSON and plot of all launches
    python bench/cluster_lm.py --calibrate --nodes 2 --bandwidth 200mbit # compute and all-reduce alone only
    python bench/cluster_lm.py --dry-run --nodes 2                      # tiny model, loopback, no root

Corpus and model: bench/lm.py (the running Python's standard library sources read as bytes, split
by file by a fixed hash rule; a GPT over bytes, 4 pre-norm blocks of width 256, context 128, tied
embeddings: 3,257,856 parameters). Global batch ``--batch`` windows (16) split over the nodes, drawn
from one generator seeded with ``--seed``, so every method and every ``n`` sees the same batches.
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), learning rate ``--lr`` with ``--lr-warmup``
linear steps then cosine to a tenth at ``--steps``: identical for every method. Every method is
dense for its first ``--warmup`` steps (PowerSGD's start_powerSGD_iter, DeftState's warmup_steps).
PowerSGD gets one bucket (its hook aborts on gloo with several); the others DDP's default buckets.

The clock is rank 0's training time: every ``--eval-every`` steps the ranks stop, measure the mean
next-byte loss on ``--val-windows`` windows spread evenly over the held-out files (split between
the ranks, summed with one all-reduce) and go on; that pause is left out of the clock. Bytes sent:
rank 0's node's veth transmit counter (the kernel's count, eval traffic included: a few bytes), and
what the exchange says it handed to the collectives. After the methods, the launch measures a step
with no communication and the all-reduce of the gradient alone: their ratio is what carries over to a
GPU cluster.

Raw results: OUT/cluster_lm/raw/ (one JSON and one log per launch; ``--out`` defaults to
./deft-bench-results, ``--out bench/results`` for the committed ones); ``--report`` writes
OUT/cluster_lm.{txt,json,png}. A method whose DeftState options the installed deft_kernels
rejects is skipped with the reason (in the output and the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster_steps import raw_dir
from cluster_training import Method

from deft_kernels.benchmarks import DEFAULT_OUT
from deft_kernels.benchmarks.cluster import parse_rate

DENSITIES = {"1%": 0.01, "0.1%": 0.001}
# DeftState variants: name -> the options they pass. Both plan protocols (docs/algorithm.md, "The plan
# one step ahead"): every worker plans the next step from the norms summed in this one (the default),
# or the leader plans from its own and broadcasts (the paper's).
DEFT_VARIANTS: dict[str, dict] = {"deft-ahead": {"plan": "ahead"}, "deft-leader": {"plan": "leader"}}


def method_table(deft_variants: dict[str, dict]) -> dict[str, Method]:
    """Every method by name: all-reduce, PowerSGD at ranks 1, 4, 16, Top-k and each DEFT variant at
    every density of ``DENSITIES`` (``<variant>-<density>``)."""
    return {"allreduce": Method("allreduce"),
            **{f"powersgd-r{r}": Method("powersgd", rank=r) for r in (1, 4, 16)},
            **{f"topk-{d}": Method("topk", density=v) for d, v in DENSITIES.items()},
            **{f"{name}-{d}": Method("deft", density=v, options=opts) for name, opts in deft_variants.items()
               for d, v in DENSITIES.items()}}


METHODS = method_table(DEFT_VARIANTS)
TARGET = 0.02  # all-reduce's final validation loss + 2%
DRY_RUN = {"context": 16, "width": 32, "layers": 1, "heads": 2, "steps": 6, "warmup": 2, "lr_warmup": 2,
           "eval_every": 2, "val_windows": 4}


# -- in each node ---------------------------------------------------------------------------------------------

def model_config(cfg: dict):
    from lm import GPTConfig

    return GPTConfig(cfg["context"], cfg["width"], cfg["layers"], cfg["heads"])


def train(name: str, cfg: dict, corpus, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from cluster_training import timed_training
    from lm import ByteGPT, adamw, batch_starts, bits_per_byte, lm_loss, lr_at, validation_starts, windows

    mcfg = model_config(cfg)
    torch.manual_seed(cfg["seed"])
    model = ByteGPT(mcfg)
    numel = sum(p.numel() for p in model.parameters())
    spec = METHODS[name]
    ddp, state = spec.attach(model, cfg["warmup"], cfg["seed"])
    opt = adamw(model, cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    per_rank = cfg["batch"] // world
    val = validation_starts(corpus.val.numel(), cfg["val_windows"], mcfg.context)[rank::world]

    def step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(i, cfg["steps"], cfg["lr"], cfg["lr_warmup"])
        starts = batch_starts(gen, corpus.train.numel(), cfg["batch"], mcfg.context)  # the global batch
        x, y = windows(corpus.train, starts[rank * per_rank:(rank + 1) * per_rank], mcfg.context)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(ddp(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    def evaluate(done: int) -> dict:
        total = torch.zeros(2, dtype=torch.float64)  # summed nats, bytes predicted
        with torch.no_grad():
            for chunk in val.split(16):
                x, y = windows(corpus.val, chunk, mcfg.context)
                total[0] += lm_loss(model(x), y).double() * y.numel()
                total[1] += y.numel()
        dist.all_reduce(total)
        nats = (total[0] / total[1]).item()
        return {"val_loss": nats, "val_bpb": bits_per_byte(nats)}

    exchanged = lambda done: spec.exchange_bytes(state, numel, done, cfg["warmup"])  # noqa: E731
    run = timed_training(step, evaluate, cfg["steps"], cfg["eval_every"], cfg["warmup"], exchanged)
    sparse_steps = max(1, cfg["steps"] - cfg["warmup"])
    return {"method": name, "spec": spec.describe(), **run, "final_bpb": run["curve"][-1]["val_bpb"],
            "exchange_bytes_per_step": (exchanged(cfg["steps"]) - 4.0 * numel * cfg["warmup"]) / sparse_steps}


def compute_and_allreduce(cfg: dict, corpus, world: int) -> dict:
    """A training step of this rank's share of the batch with no communication (AdamW included), and
    the all-reduce of the model's gradient alone (cluster_training.compute_and_allreduce)."""
    import torch

    from cluster_training import compute_and_allreduce as measure
    from lm import ByteGPT, adamw, batch_starts, lm_loss, windows

    mcfg = model_config(cfg)
    torch.manual_seed(cfg["seed"])
    model = ByteGPT(mcfg)
    opt = adamw(model, cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"])

    def step(i: int) -> None:
        x, y = windows(corpus.train, batch_starts(gen, corpus.train.numel(), cfg["batch"] // world, mcfg.context),
                       mcfg.context)
        opt.zero_grad(set_to_none=True)
        lm_loss(model(x), y).backward()
        opt.step()

    return measure(step, sum(p.numel() for p in model.parameters()), repeats=cfg["ratio_repeats"])


def worker(cfg: dict) -> int:
    from cluster_training import run_worker
    from lm import load_corpus

    corpus = load_corpus()
    return run_worker(cfg, lambda name, rank, world: train(name, cfg, corpus, rank, world),
                      lambda rank, world: {**compute_and_allreduce(cfg, corpus, world), "corpus": corpus.info()})


# -- the launcher ----------------------------------------------------------------------------------------------

def _config(args: argparse.Namespace, methods: list[str]) -> dict:
    from lm import flops_per_step, parameter_count

    cfg = {k: getattr(args, k) for k in ("context", "width", "layers", "heads", "batch", "steps", "lr", "lr_warmup",
                                          "warmup", "eval_every", "val_windows", "seed", "pg_timeout")}
    mcfg = model_config(cfg)
    return {**cfg, "methods": methods, "ratio_repeats": 4 if args.dry_run else 20,
            "parameters": parameter_count(mcfg), "flops_per_step": flops_per_step(mcfg, args.batch)}


def launch(args: argparse.Namespace) -> int:
    from cluster_training import launch_to_raw, split_runnable

    methods, skipped = ([], {}) if args.calibrate else split_runnable(METHODS, args.methods)
    for name, why in skipped.items():
        print(f"cluster_lm: skipping {name}: {why}", file=sys.stderr)
    if not methods and not args.calibrate:
        print("cluster_lm: no method left to run", file=sys.stderr)
        return 1
    cfg = _config(args, methods)
    stem = f"{'calibration' if args.calibrate else 'lm'}_n{args.nodes}_{args.bandwidth}_s{args.seed}{args.tag}"
    raw = Path(args.raw)
    if args.dry_run:
        out = _launch_local(cfg, args, raw, stem)
    else:
        out = launch_to_raw(__file__, cfg, args, raw, stem)
    if out is None:
        return 1
    out["skipped"] = skipped
    (raw / f"{stem}.json").write_text(json.dumps(out, indent=1))
    print(f"n = {args.nodes} at {args.bandwidth}: a step with no communication {out['compute_ms']:.1f} ms, the "
          f"all-reduce of the gradient alone {out['allreduce_alone_ms']:.1f} ms (all-reduce : compute "
          f"{out['allreduce_alone_ms'] / out['compute_ms']:.2f})")
    return 0 if args.calibrate else report(raw, Path(args.out))


def _launch_local(cfg: dict, args: argparse.Namespace, raw: Path, stem: str) -> dict | None:
    """The launch on this machine's loopback instead of a cluster: a single-node torchrun of
    ``args.nodes`` processes (no root, no shaping, no byte counters)."""
    raw.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
            str(args.nodes), __file__, "--worker", json.dumps(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("DEFT_CLUSTER_NODE", None)
    t0, load = time.time(), os.getloadavg()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        print(f"cluster_lm: --timeout {args.timeout:g} s passed; the local run was stopped", file=sys.stderr)
    (raw / f"{stem}.log").write_text(f"exit {p.returncode}\n--- stdout\n{stdout}--- stderr\n{stderr[-20000:]}")
    payloads = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if len(payloads) != 1:
        print(f"cluster_lm: the local run failed (exit {p.returncode}); see {raw / stem}.log", file=sys.stderr)
        return None
    if p.returncode != 0:  # as on the cluster: the result came back, then a rank died on its way out
        print(f"cluster_lm: the result came back, but exit {p.returncode}; see {raw / stem}.log", file=sys.stderr)
    return {"config": {**cfg, "nodes": args.nodes, "bandwidth": args.bandwidth, "link_goodput_mbps": None,
                       "exit_codes": [p.returncode], "wall_s": time.time() - t0, "dry_run": True,
                       "load_average_start": load, "load_average_end": os.getloadavg(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, **payloads[0]}


# -- report ------------------------------------------------------------------------------------------------------

def load_launches(raw: Path) -> list[dict]:
    """Every training launch in ``raw`` (calibrations left out), oldest first."""
    launches = [json.loads(p.read_text()) for p in sorted(raw.glob("lm_n*.json"))]
    return sorted(launches, key=lambda run: run["config"]["date"])


def summarize(launches: list[dict]) -> list[dict]:
    """One row per (n, bandwidth, seed, method); a method launched twice keeps its latest launch. The
    target of each (n, bandwidth, seed) is its all-reduce's final validation loss + 2%."""
    from cluster_training import time_to

    latest: dict[tuple, tuple[dict, dict]] = {}
    for run in launches:
        cfg = run["config"]
        for r in run["runs"]:
            latest[(cfg["nodes"], cfg["bandwidth"], cfg["seed"], r["method"])] = (run, r)
    rows = []
    for (n, bw, seed, name), (run, r) in latest.items():
        ref = latest.get((n, bw, seed, "allreduce"))
        target = ref[1]["final_bpb"] * (1 + TARGET) if ref else None
        reached = lambda bpb: bpb <= target  # noqa: E731
        t = time_to(r["curve"], "val_bpb", reached) if target is not None else None
        ref_t = time_to(ref[1]["curve"], "val_bpb", reached) if ref else None
        cfg = run["config"]
        tx = r.get("median_tx_bytes_per_step")
        rows.append({"nodes": n, "bandwidth": bw, "seed": seed, "method": name, "spec": r["spec"],
                     "final_bpb": r["final_bpb"], "target_bpb": target,
                     "final_vs_allreduce": r["final_bpb"] / ref[1]["final_bpb"] - 1 if ref else None,
                     "time_to_target_s": t, "allreduce_time_to_target_s": ref_t,
                     "speedup_to_target": ref_t / t if t and ref_t else None,
                     "allreduce_bpb_then": _bpb_at(ref[1]["curve"], r["train_time_s"]) if ref else None,
                     "train_time_s": r["train_time_s"], "median_step_ms": r["median_step_ms"],
                     "wire_mb_per_step": tx / 1e6 if tx is not None else None,
                     "exchange_mb_per_step": r["exchange_bytes_per_step"] / 1e6,
                     "compute_ms": run["compute_ms"], "allreduce_alone_ms": run["allreduce_alone_ms"],
                     "allreduce_over_compute": run["allreduce_alone_ms"] / run["compute_ms"],
                     "link_goodput_mbps": cfg["link_goodput_mbps"], "date": cfg["date"],
                     "python": run["corpus"]["python"], "corpus_files_sha256": run["corpus"]["files_sha256"]})
    order = {name: i for i, name in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["nodes"], r["bandwidth"], r["seed"], order.get(r["method"], len(order)), r["method"]))
    return rows


def _bpb_at(curve: list[dict], time_s: float) -> float | None:
    """The validation bits per byte of ``curve`` at its last evaluation at or before ``time_s`` of
    training (all-reduce's, at the time another method ended: who is ahead at the same wall-clock)."""
    seen = [e["val_bpb"] for e in curve if e["time_s"] <= time_s + 1e-9]
    return seen[-1] if seen else None


def _f(v, fmt: str, missing: str = "-") -> str:
    return missing if v is None else format(v, fmt)


def table(rows: list[dict], launches: list[dict]) -> str:
    first = launches[0]
    cfg, corpus = first["config"], first["corpus"]
    lines = [
        "Time to the same validation loss on the emulated cluster (bench/cluster_lm.py): a byte-level GPT "
        f"({cfg['layers']} blocks, width {cfg['width']}, context {cfg['context']}, {cfg['parameters']:,} parameters,",
        f"{cfg['flops_per_step'] / 1e9:.1f} GFLOP a step) on Python {corpus['python']}'s standard library "
        f"({corpus['train_files']} train files, {corpus['train_bytes']:,} bytes; {corpus['val_files']} held out, "
        f"{corpus['val_bytes']:,} bytes; file list sha256 {corpus['files_sha256'][:16]}),",
        f"global batch {cfg['batch']} x {cfg['context']} bytes, {cfg['steps']} steps, AdamW lr {cfg['lr']:g}, "
        f"{cfg['warmup']} dense steps first. bpb = validation bits per byte; target = all-reduce's final + "
        f"{TARGET:.0%};",
        "to target = rank 0's training time to the first evaluation at or under it; step ms = median after the dense "
        "steps;", "wire MB = rank 0's node's veth bytes sent per step (median after the dense steps); exch MB = what "
        "the exchange says it sent per step;", "AR then = all-reduce's validation bpb at the time this method's "
        "training ended (its last evaluation by then): below final bpb, all-reduce was ahead at the same wall-clock.", ""]
    for run in launches:
        c = run["config"]
        lines.append(f"launch n = {c['nodes']} at {c['bandwidth']}, seed {c['seed']} ({c['date']}, "
                     f"{c['wall_s'] / 60:.0f} min): a step with no communication {run['compute_ms']:.0f} ms, the "
                     f"all-reduce of the gradient alone {run['allreduce_alone_ms']:.0f} ms (all-reduce : compute "
                     f"{run['allreduce_alone_ms'] / run['compute_ms']:.2f}); link {_f(c['link_goodput_mbps'], '.0f')} "
                     f"Mb/s" + "".join(f"; skipped {k}: {v}" for k, v in run.get("skipped", {}).items()))
    lines += ["", f"{'n':>2} {'bw':>8} {'seed':>4} {'method':<16}{'final bpb':>10}{'vs AR':>8}{'to target s':>12}"
                  f"{'vs AR':>7}{'train s':>9}{'AR then':>9}{'step ms':>9}{'wire MB':>9}{'exch MB':>9}"]
    for r in rows:
        lines.append(f"{r['nodes']:>2} {r['bandwidth']:>8} {r['seed']:>4} {r['method']:<16}{r['final_bpb']:>10.4f}"
                     f"{_f(r['final_vs_allreduce'], '+.2%'):>8}{_f(r['time_to_target_s'], '.0f', 'not reached'):>12}"
                     f"{_f(r['speedup_to_target'], '.2f') + ('x' if r['speedup_to_target'] else ''):>7}{r['train_time_s']:>9.0f}"
                     f"{_f(r['allreduce_bpb_then'], '.4f'):>9}{r['median_step_ms']:>9.0f}"
                     f"{_f(r['wire_mb_per_step'], '.3f'):>9}{r['exchange_mb_per_step']:>9.3f}")
    return "\n".join(lines) + "\n"


def calibration_table(raw: Path) -> tuple[list[dict], str]:
    """The ``--calibrate`` launches in ``raw``: one row per (n, bandwidth), and their table."""
    rows = []
    for path in sorted(raw.glob("calibration_*.json")):
        run = json.loads(path.read_text())
        c = run["config"]
        rows.append({"nodes": c["nodes"], "bandwidth": c["bandwidth"], "link_goodput_mbps": c["link_goodput_mbps"],
                     "compute_ms": run["compute_ms"], "allreduce_alone_ms": run["allreduce_alone_ms"],
                     "allreduce_over_compute": run["allreduce_alone_ms"] / run["compute_ms"],
                     "load_average_start": c["load_average_start"][0], "date": c["date"]})
    rows.sort(key=lambda r: (r["nodes"], parse_rate(r["bandwidth"])))
    lines = ["Calibration (bench/cluster_lm.py --calibrate): a step of one rank's share of the batch with no "
             "communication and the all-reduce of the", "whole gradient alone, medians over 20 and 5, on the "
             "cluster's own cores; load = the machine's 1-minute load average at the start.", "",
             f"{'n':>2} {'bw':>8}{'link Mb/s':>10}{'compute ms':>11}{'all-reduce ms':>14}{'AR : compute':>13}"
             f"{'load':>6}  date"]
    lines += [f"{r['nodes']:>2} {r['bandwidth']:>8}{_f(r['link_goodput_mbps'], '.0f'):>10}{r['compute_ms']:>11.0f}"
              f"{r['allreduce_alone_ms']:>14.0f}{r['allreduce_over_compute']:>13.2f}{r['load_average_start']:>6.1f}"
              f"  {r['date']}" for r in rows]
    return rows, "\n".join(lines) + "\n"


def report(raw: Path, out_dir: Path) -> int:
    """The table (text), JSON and plot of the training launches in ``raw`` and the table of its
    calibrations, in ``out_dir``."""
    launches = load_launches(raw)
    calibration, cal_text = calibration_table(raw)
    if not launches and not calibration:
        print(f"cluster_lm: no launches in {raw}; run one first", file=sys.stderr)
        return 1
    rows = summarize(launches)
    text = "\n".join(part for part in (table(rows, launches) if launches else "", cal_text if calibration else "") if part)
    print(text, end="")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cluster_lm.txt").write_text(text)
    (out_dir / "cluster_lm.json").write_text(json.dumps({"rows": rows, "calibration": calibration,
                                                         "launches": launches}, indent=1))
    try:
        if launches:
            plot(rows, launches, out_dir / "cluster_lm.png")
    except ImportError as e:
        print(f"plot skipped ({e}): pip install matplotlib", file=sys.stderr)
    return 0


def _style(name: str, seed_rank: int) -> dict:
    family, _, variant = name.partition("-")
    shades = {"powersgd": {"r1": "#a1d99b", "r4": "#41ab5d", "r16": "#005a32"}}
    color = {"allreduce": "tab:red", "topk": "tab:orange", "deft": "tab:blue"}.get(family)
    if family == "deft" and variant.startswith("leader"):
        color = "tab:purple"
    if family == "powersgd":
        color = shades["powersgd"].get(variant, "tab:green")
    style = {"color": color, "lw": 2.2 if family == "deft" else 1.4, "ls": ":" if variant.endswith("0.1%") else "-"}
    if seed_rank:
        style.update(alpha=0.45, lw=1.0)
    return style


def plot(rows: list[dict], launches: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({(r["nodes"], r["bandwidth"]) for r in rows})
    fig, axes = plt.subplots(len(points), 2, figsize=(11, 4 * len(points)), squeeze=False)
    curves = {(run["config"]["nodes"], run["config"]["bandwidth"], run["config"]["seed"], r["method"]):
              (r["curve"], run["config"]["warmup"]) for run in launches for r in run["runs"]}
    for (ax_t, ax_b), (n, bw) in zip(axes, points):
        sub = [r for r in rows if (r["nodes"], r["bandwidth"]) == (n, bw)]
        seeds = sorted({r["seed"] for r in sub})
        for r in sub:
            curve, warmup = curves[(n, bw, r["seed"], r["method"])]
            label = r["method"] if r["seed"] == seeds[0] else None
            style = _style(r["method"], seeds.index(r["seed"]))
            ax_t.plot([p["time_s"] for p in curve[1:]], [p["val_bpb"] for p in curve[1:]], label=label, **style)
            sent = [p["wire_tx_bytes"] if p["wire_tx_bytes"] is not None else p["exchange_bytes"] for p in curve]
            dense = max(i for i, p in enumerate(curve) if p["step"] <= warmup)  # the dense steps' last point
            ax_b.plot([(b - sent[dense]) / 1e6 for b in sent[dense + 1:]], [p["val_bpb"] for p in curve[dense + 1:]],
                      label=label, **style)
        targets = [r["target_bpb"] for r in sub if r["method"] == "allreduce" and r["seed"] == seeds[0]]
        shown = [y for line in ax_t.get_lines() for y in line.get_ydata()]
        for ax in (ax_t, ax_b):
            if targets:
                ax.axhline(targets[0], color="grey", ls="--", lw=1, label="all-reduce + 2%" if ax is ax_t else None)
            ax.set_ylim(min(shown) * 0.98, max(shown) * 1.02)
            ax.grid(True, alpha=0.3)
            ax.set_ylabel("validation bits per byte")
        ax_t.set_xlabel("training time of rank 0 (s)")
        ax_b.set_xlabel("MB sent by rank 0's node after the dense steps (log)")
        ax_b.set_xscale("log")
        seed_note = f"seeds {', '.join(map(str, seeds))} (faint: seed {seeds[1]})" if len(seeds) > 1 else f"seed {seeds[0]}"
        ax_t.set_title(f"{n} nodes at {bw}, {seed_note}", fontsize=9)
        ax_b.set_title(f"{n} nodes at {bw}: against the bytes sent after the dense steps", fontsize=9)
        ax_t.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    from cluster_training import check_launch_args, positive_int

    from deft_kernels.benchmarks.cluster import OneLineParser, _nodes_arg, _positive_float, _prefix_arg, _rate_arg

    p = OneLineParser(prog="cluster_lm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="write the table, JSON and plot of the launches in --raw")
    mode.add_argument("--calibrate", action="store_true", help="measure only the compute step and the all-reduce alone")
    mode.add_argument("--dry-run", action="store_true", help="a tiny model for a few steps on loopback (no root, "
                      "no shaping): the pipeline end to end, output in a new temporary folder unless --raw/--out")
    p.add_argument("--nodes", type=_nodes_arg, default=2)
    p.add_argument("--bandwidth", type=_rate_arg, default="200mbit", help="every link's rate (200mbit: where "
                   "this model's all-reduce takes 1.6x (n = 2) and 2.3x (n = 4) its compute, bench/results/cluster_lm/calibration)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument("--batch", type=positive_int, default=16, help="global batch (windows), split over the nodes")
    p.add_argument("--context", type=positive_int, default=128)
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--lr-warmup", type=positive_int, default=50, help="steps of linear learning-rate warm-up")
    p.add_argument("--warmup", type=positive_int, default=50, help="dense steps first for every method (>= 2)")
    p.add_argument("--eval-every", type=positive_int, default=25, help="steps between evaluations")
    p.add_argument("--val-windows", type=positive_int, default=128, help="validation windows per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", type=_prefix_arg, default="dkl", help="the cluster's name prefix")
    p.add_argument("--timeout", type=_positive_float, default=7200.0, help="seconds before the launch is killed")
    p.add_argument("--pg-timeout", type=positive_int, default=300, help="process group timeout (s)")
    p.add_argument("--tag", default="", help="suffix of the raw result's name")
    p.add_argument("--raw", default=None, help="the folder of raw launches (default OUT/cluster_lm/raw)")
    p.add_argument("--out", default=None, help=f"the folder of the report (default {DEFAULT_OUT}; bench/results: the "
                   "committed ones)")
    args = p.parse_args(argv)
    if args.dry_run:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in DRY_RUN.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
        if args.raw is None or args.out is None:
            tmp = Path(tempfile.mkdtemp(prefix="cluster_lm_dry_run_"))
            args.raw, args.out = args.raw or str(tmp / "raw"), args.out or str(tmp)
            print(f"cluster_lm: dry run in {tmp}", file=sys.stderr)
        args.bandwidth = "loopback"
    args.out = args.out or DEFAULT_OUT
    args.raw = args.raw or str(raw_dir(args.out, "cluster_lm"))
    check_launch_args(p, args)
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} must be less than --steps {args.steps}")
    if args.lr_warmup >= args.steps:
        p.error(f"--lr-warmup {args.lr_warmup} must be less than --steps {args.steps}")
    if args.width % args.heads:
        p.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    return report(Path(args.raw), Path(args.out)) if args.report else launch(args)


if __name__ == "__main__":
    sys.exit(main())
