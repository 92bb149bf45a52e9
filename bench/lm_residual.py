"""Where each method's error-feedback residual grows on the byte GPT of bench/cluster_lm.py, and what
its steps leave out: the cluster benchmark's training, probed in one process.

    python bench/lm_residual.py --out bench/results/cluster_lm/residual   # n = 2, d = 1% and 0.1%

``--workers`` simulated workers (``driver.simulate_step``: the package's own step, the ranks in
lockstep) train the model of bench/cluster_lm.py with its schedule: the same seed, the same batches
(one generator draws the global batch, rank r takes its slice), AdamW, the learning rate of step t
of a ``--steps`` schedule. The gradient is cut into DDP's buckets as the DDP hook sees them (read
from a one-process DDP after its buckets are rebuilt), one sparsifier per bucket and worker, as
DeftState keeps them. The first ``--warmup`` steps are dense (run once); from there each method
trains its own copy for ``--probe-steps`` steps (``dense``: the mean gradient; otherwise
``<sparsifier>-<density>``, e.g. ``deft-0.001``: DEFT one step ahead; ``deft_leader-0.001``: the
leader's plan).

Per step and parameter group (the token embedding, tied to the output; the positions; the blocks'
qkv, proj, fc and out matrices; every bias and LayerNorm weight as ``vectors``): the indices sent,
the error-feedback residual's L2 norm (rank 0's, after the step) over the norm of one step's mean
gradient there (``r/g``: about how many steps of gradient the group holds back), and ``captured``:
the share of the mean accumulated gradient's squared L2 mass that the step sent (``||A[S]||^2 /
||A||^2`` inside the group, A the mean over the workers of ``g + r``). The validation loss (bits
per byte, ``--val-windows`` windows over the held-out files) every ``--eval-every`` steps.
Writes OUT.json (every step) and OUT.txt (the table).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from deft_kernels import driver, sparsifiers

sys.path.insert(0, str(Path(__file__).parent))
from lm import (ByteGPT, GPTConfig, adamw, batch_starts, bits_per_byte, load_corpus, lm_loss, lr_at,  # noqa: E402
                validation_starts, windows)

GROUPS = ("tok", "pos", "qkv", "proj", "fc", "out", "vectors")


def group_of(name: str, param: torch.Tensor) -> str:
    """The parameter group of a ByteGPT parameter by its name (``GROUPS``)."""
    if param.dim() < 2:
        return "vectors"
    return name.split(".")[0] if name.startswith(("tok", "pos")) else name.split(".")[-2]


def ddp_buckets(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """The indices (into ``model.parameters()``) of each DDP bucket as a comm hook sees them after
    DDP rebuilt its buckets in backward order (the second iteration on), from a one-process DDP
    of a copy of ``model``, with DDP's default bucket sizes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    probe = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(probe.parameters())}
    seen: list[list[int]] = []

    def record(_, bucket):
        seen.append([index[id(p)] for p in bucket.parameters()])
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))
        try:
            ddp = DDP(probe)
            ddp.register_comm_hook(None, record)
            for _ in range(2):
                seen.clear()
                lm_loss(ddp(x), y).backward()
        finally:
            dist.destroy_process_group()
    return seen


class Probe:
    """One method's copy of the training, from the state at the end of the dense steps."""

    def __init__(self, name: str, model, opt, buckets, workers: int) -> None:
        self.name, self.model, self.opt, self.buckets = name, model, opt, buckets
        kind, _, density = name.partition("-")
        self.sparse = kind != "dense"
        if self.sparse:
            sparsifier, plan = {"deft": ("deft", {"plan": "ahead"}), "deft_leader": ("deft", {"plan": "leader"})}.get(
                kind, (kind, {}))
            self.ranks = [[sparsifiers.build(sparsifier, float(density), **plan) for _ in range(workers)]
                          for _ in buckets]
        self.steps: list[dict] = []
        self.curve: list[dict] = []


def bucket_grads(params: list[torch.Tensor], bucket: list[int], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each worker's flat gradient of one bucket (its parameters in the bucket's order)."""
    return [torch.cat([g[i].reshape(-1) for i in bucket]) for g in grads]


def sparse_step(probe: Probe, params, groups, grads) -> tuple[list[torch.Tensor], dict]:
    """One step of ``probe``'s sparsifiers on every bucket: the averaged output per parameter and the
    step's statistics per group."""
    out = [None] * len(params)
    stats = {g: {"sent": 0, "resid2": 0.0, "grad2": 0.0, "acc2": 0.0, "captured2": 0.0} for g in GROUPS}
    for bucket, sps in zip(probe.buckets, probe.ranks):
        flat = bucket_grads(params, bucket, grads)
        sizes = [params[i].numel() for i in bucket]
        results = driver.simulate_step(sps, flat, sizes=sizes, keep_accumulated=True)
        mean_acc = torch.stack([r.accumulated for r in results]).mean(0)
        mean_grad = torch.stack(flat).mean(0)
        sent = torch.zeros(mean_acc.numel(), dtype=torch.bool)
        sent[results[0].sent] = True
        resid = results[0].accumulated.masked_fill(sent, 0.0)
        start = 0
        for i, size, piece in zip(bucket, sizes, results[0].out.split(sizes)):
            out[i] = piece.view_as(params[i])
            sl, s = slice(start, start + size), groups[i]
            a = mean_acc[sl].double()
            stats[s]["sent"] += int(sent[sl].sum())
            stats[s]["resid2"] += float(resid[sl].double().square().sum())
            stats[s]["grad2"] += float(mean_grad[sl].double().square().sum())
            stats[s]["acc2"] += float(a.square().sum())
            stats[s]["captured2"] += float(a[sent[sl]].square().sum())
            start += size
    return out, stats


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    cfg = GPTConfig(args.context, args.width, args.layers, args.heads)
    model = ByteGPT(cfg)
    names = [n for n, _ in model.named_parameters()]
    groups = [group_of(n, p) for n, p in model.named_parameters()]
    opt = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    per = args.batch // args.workers
    val = validation_starts(corpus.val.numel(), args.val_windows, cfg.context)
    x0, y0 = windows(corpus.train, torch.arange(per) * cfg.context, cfg.context)
    buckets = ddp_buckets(model, x0, y0)

    def worker_grads(model) -> list[list[torch.Tensor]]:
        starts = batch_starts(gen, corpus.train.numel(), args.batch, cfg.context)
        grads = []
        for r in range(args.workers):
            x, y = windows(corpus.train, starts[r * per:(r + 1) * per], cfg.context)
            model.zero_grad(set_to_none=True)
            lm_loss(model(x), y).backward()
            grads.append([p.grad.detach().clone() for p in model.parameters()])
        return grads

    def evaluate(model) -> float:
        total = 0.0
        with torch.no_grad():
            for chunk in val.split(16):
                x, y = windows(corpus.val, chunk, cfg.context)
                total += float(lm_loss(model(x), y)) * y.numel()
        return bits_per_byte(total / (val.numel() * cfg.context))

    def apply(model, opt, t: int, out: list[torch.Tensor]) -> list[float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(t, args.steps, args.lr, args.lr_warmup)
        before = [p.detach().clone() for p in model.parameters()]
        for p, g in zip(model.parameters(), out):
            p.grad = g.clone()
        opt.step()
        return [float((p.detach() - b).double().square().sum()) for p, b in zip(model.parameters(), before)]

    start = time.perf_counter()
    dense_curve = [{"step": 0, "val_bpb": evaluate(model)}]
    for t in range(args.warmup):
        grads = worker_grads(model)
        apply(model, opt, t, [torch.stack(gs).mean(0) for gs in zip(*grads)])
    dense_curve.append({"step": args.warmup, "val_bpb": evaluate(model)})
    branch = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), gen.get_state())
    probes = []
    for name in args.methods:
        m = ByteGPT(cfg)
        m.load_state_dict(branch[0])
        o = adamw(m, args.lr)
        o.load_state_dict(copy.deepcopy(branch[1]))  # load_state_dict keeps the tensors it is given
        gen.set_state(branch[2])
        probe = Probe(name, m, o, buckets, args.workers)
        params = list(m.parameters())
        for t in range(args.warmup, args.warmup + args.probe_steps):
            grads = worker_grads(m)
            if probe.sparse:
                out, stats = sparse_step(probe, params, groups, grads)
            else:
                out, stats = [torch.stack(gs).mean(0) for gs in zip(*grads)], {}
            moved = apply(m, o, t, out)
            for i, g in enumerate(groups):
                stats.setdefault(g, {}).setdefault("update2", 0.0)
                stats[g]["update2"] += moved[i]
            probe.steps.append({"step": t + 1, "groups": stats})
            if (t + 1 - args.warmup) % args.eval_every == 0:
                probe.curve.append({"step": t + 1, "val_bpb": evaluate(m)})
            if args.progress and (t + 1) % 10 == 0:
                print(f"{name}: step {t + 1}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
        probes.append(probe)
    sizes = {g: sum(p.numel() for p, s in zip(model.parameters(), groups) if s == g) for g in GROUPS}
    return {"config": {**vars(args), "parameters": sum(sizes.values()), "group_sizes": sizes,
                       "buckets": [[names[i] for i in b] for b in buckets],
                       "bucket_numel": [sum(model.get_parameter(names[i]).numel() for i in b) for b in buckets],
                       "corpus": corpus.info(), "torch": torch.__version__, "python": platform.python_version(),
                       "seconds": time.perf_counter() - start,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
            "dense_curve": dense_curve,
            "methods": {p.name: {"curve": p.curve, "steps": p.steps} for p in probes}}


def summary(doc: dict, first: int, last: int) -> dict:
    """Per method and group, over the steps numbered ``first``..``last`` (after the dense steps):
    the share of the sent indices, the mean ``captured`` share, ``r/g`` at ``last``, and the update's
    RMS per element against dense's."""
    sizes = doc["config"]["group_sizes"]
    rows = {}
    for name, m in doc["methods"].items():
        window = [s for s in m["steps"] if first <= s["step"] <= last]
        if not window:
            continue
        end = window[-1]["groups"]
        sent_total = sum(s["groups"][g].get("sent", 0) for s in window for g in GROUPS) or 1
        rows[name] = {g: {
            "sent_share": sum(s["groups"][g].get("sent", 0) for s in window) / sent_total,
            "captured": (sum(s["groups"][g].get("captured2", 0.0) for s in window)
                         / max(1e-300, sum(s["groups"][g].get("acc2", 0.0) for s in window))),
            "r_over_g": (end[g]["resid2"] / end[g]["grad2"]) ** 0.5 if end[g].get("grad2") else None,
            "update_rms": (sum(s["groups"][g]["update2"] for s in window) / (len(window) * sizes[g])) ** 0.5,
        } for g in GROUPS}
    return rows


def table(doc: dict) -> str:
    c = doc["config"]
    lines = [f"bench/lm_residual.py: the byte GPT of bench/cluster_lm.py ({c['parameters']:,} parameters, DDP buckets of "
             f"{', '.join(f'{n:,}' for n in c['bucket_numel'])} elements), n = {c['workers']} simulated workers, "
             f"{c['warmup']} dense steps, then {c['probe_steps']} steps of each method", "",
             "validation bits per byte (step: value)",
             f"  dense steps: " + ", ".join(f"{p['step']}: {p['val_bpb']:.3f}" for p in doc["dense_curve"])]
    for name, m in doc["methods"].items():
        lines.append(f"  {name:<20}" + ", ".join(f"{p['step']}: {p['val_bpb']:.3f}" for p in m["curve"]))
    w, end = c["warmup"], c["warmup"] + c["probe_steps"]
    for first, last in ((w + 1, min(end, w + 20)), (max(w + 1, end - 24), end)):
        rows = summary(doc, first, last)
        lines += ["", f"steps {first}-{last}: per group, sent = share of the indices sent, captured = share of the mean "
                  "accumulated gradient's squared L2 mass sent, r/g = rank 0's residual norm over one step's mean gradient "
                  f"norm at step {last}, upd = RMS of the parameter change per element and step (x1e-4)",
                  f"{'method':<20}" + "".join(f"{g:>26}" for g in GROUPS),
                  f"{'':<20}" + "".join(f"{'sent capt  r/g   upd':>26}" for _ in GROUPS)]
        for name, groups in rows.items():
            lines.append(f"{name:<20}" + "".join(
                (f"{v['sent_share']:>7.1%}{v['captured']:>6.3f}{v['r_over_g']:>7.1f}" if v["r_over_g"] is not None
                 else f"{'-':>7}{'-':>6}{'-':>7}") + f"{v['update_rms'] * 1e4:>6.2f}" for v in groups.values()))
    lines.append("")
    lines.append("group sizes: " + ", ".join(f"{g} {n:,}" for g, n in c["group_sizes"].items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lm_residual.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["dense", "topk-0.01", "deft-0.01", "topk-0.001", "deft-0.001"],
                   help="dense, or <sparsifier>-<density> (sparsifier: topk, deft, deft_leader, cltk, ...)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=50, help="dense steps first (bench/cluster_lm.py's --warmup)")
    p.add_argument("--probe-steps", type=int, default=100, help="steps of each method after the dense ones")
    p.add_argument("--steps", type=int, default=600, help="the schedule's length (its learning rate at each step)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=16, help="global batch (windows)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.json and OUT.txt")
    p.add_argument("--progress", action="store_true", help="a line on stderr every 10 steps")
    args = p.parse_args(argv)
    for name in ("workers", "warmup", "probe_steps", "steps", "lr_warmup", "batch", "context", "width", "layers",
                 "heads", "eval_every", "val_windows", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch % args.workers:
        p.error(f"--batch {args.batch} must be a multiple of --workers {args.workers}")
    if args.warmup + args.probe_steps > args.steps:
        p.error(f"--warmup + --probe-steps ({args.warmup + args.probe_steps}) must not pass --steps {args.steps}")
    for name in args.methods:
        kind, _, density = name.partition("-")
        if name == "dense":
            continue
        try:
            ok = kind.replace("deft_leader", "deft") in sparsifiers.SPARSIFIERS and 0 < float(density) <= 1
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--methods: {name!r} is neither dense nor <sparsifier>-<density in (0, 1]> "
                    f"(sparsifiers: {', '.join(sorted(sparsifiers.SPARSIFIERS))}, deft_leader)")
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
