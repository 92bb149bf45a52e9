"""Step time of DDP training on the emulated cluster (deft_kernels.benchmarks.cluster): DDP's own
all-reduce, torch's PowerSGD hook, Top-k and DEFT (and a compute-only stub), one process per node, one
thread each, multi-node torchrun over links shaped to a set bandwidth.

    python bench/cluster_steps.py --model resnet18 --nodes 2 --bandwidth 1gbit   # one launch (needs root)
    python bench/cluster_steps.py --report                                        # table, JSON, plot of all launches

A sparse method is ``NAME:DENSITY``: ``topk``, ``cltk``, ``micro``, ``deft`` (DEFT's default, the
plan one step ahead) or ``deft-leader`` (DEFT with ``plan="leader"``, the paper's protocol;
``VARIANTS``), e.g. ``--methods compute sync allreduce deft-leader:0.01 deft:0.01``.

One launch is one (model, n, bandwidth): one torchrun on every node, in which every method has its own
DDP model built from the same seed and fed the same batches (``--warmup`` unmeasured steps each); the
``--steps`` timed steps are taken in ``--rounds`` rounds, every method taking its turn in each round,
so that a slow spell of the shared machine falls on all methods alike. PowerSGD gets one bucket (its
hook aborts on gloo with several, bench/compare_hooks.py); every other method DDP's default buckets.
Per method and rank it records:

- the step time (forward, backward with DDP's communication, optimizer): median over the timed steps,
  and the forward / backward / optimizer parts;
- the bytes the node's veth sent and received over the timed steps (its kernel counters, read in the
  node), next to what the exchange says it handed to the collectives (all-reduce: every fp32 gradient
  value; PowerSGD: its factors, ``PowerSGDState.total_numel_after_compression``; Top-k and DEFT:
  ``DeftState.compression_stats()['bytes_sent']``), and the hook's own split of its time (select,
  comm, other) for Top-k and DEFT;
- the exchange alone: after the DDP run, the same bytes over the same links with nothing else running:
  all-reduce of DDP's buckets (sizes recorded by the compute stub), PowerSGD's factor floats in one
  all-reduce, one ``Sparsifier.step`` (accumulate, select, exchange, unpack) on the rank's local
  gradient of the whole model.

``compute`` is the same DDP step with a hook that returns each bucket unchanged (no communication):
the compute-only step on the same cluster, same cores. ``sync`` adds one all-reduce of a single float
per step (at the last bucket): the ranks then wait for each other once a step, as under any
synchronous exchange, which on a shared machine costs the spread of the ranks' step times. Exposed
communication = step - compute. CPU time per step (``time.process_time``, all threads of the rank's
process) tells work from waiting.
Raw results (per-rank JSON and every node's output) go to ``--raw`` (default OUT/cluster_steps/raw/);
``--report`` reads that folder and writes OUT/cluster_steps.{txt,json,png}; ``--out`` (OUT) is
deft-bench-results by default, and bench/results for the committed files (bench/cluster_all.sh).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from deft_kernels.benchmarks import DEFAULT_OUT

# DeftState variants a method may name: method -> (sparsifier, the options it passes to DeftState).
VARIANTS = {"deft-leader": ("deft", {"plan": "leader"})}  # "deft" is DEFT's default, the plan one step ahead
SPARSE = ("topk", "deft", "cltk", "micro", *VARIANTS)
DEFAULT_METHODS = ["compute", "sync", "allreduce", "powersgd", "topk:0.01", "deft:0.01", "topk:0.001", "deft:0.001"]
BATCH = {"resnet18": 16, "ncf": 256}


def raw_dir(out: str, bench: str = "cluster_steps") -> Path:
    """Where a cluster benchmark's launches put their raw results under ``--out``, and where its
    ``--report`` reads them."""
    return Path(out) / bench / "raw"


# -- in each node: the training processes (torchrun runs this file with --worker) ----------------------------

def _counters(iface: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def _stub_hook(sizes: dict, bucket):
    """No communication: the bucket comes back as it is (the compute-only step). Records bucket sizes."""
    import torch

    sizes[bucket.index()] = bucket.buffer().numel()
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _sync_hook(sizes: dict, bucket):
    """Like the stub, plus one all-reduce of a single float at the last bucket: the ranks meet once a
    step, as every synchronous method makes them (the floor of any exchange on a shared machine)."""
    import torch
    import torch.distributed as dist

    if bucket.is_last():
        dist.all_reduce(torch.zeros(1))
    return _stub_hook(sizes, bucket)


def sparsifier_of(method: str) -> tuple[str, dict]:
    """The sparsifier's registry name and the options a sparse method (``SPARSE``) passes to it."""
    sparsifier, options = VARIANTS.get(method, (method, {}))
    return sparsifier, dict(options)


def _attach(method: str, density: float | None, ddp, warmup: int, seed: int, sizes: dict):
    """Register ``method``'s hook; returns (state or None, bytes-per-call function)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from deft_kernels import DeftState, deft_hook

    if method in ("compute", "sync"):
        ddp.register_comm_hook(sizes, _stub_hook if method == "compute" else _sync_hook)
        return None
    if method == "allreduce":
        return None
    if method == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=max(2, warmup - 1), random_seed=seed)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    sparsifier, options = sparsifier_of(method)
    state = DeftState(sparsifier=sparsifier, density=density, warmup_steps=max(1, warmup - 2), **options)
    ddp.register_comm_hook(state, deft_hook)
    return state


def _sent_so_far(method: str, state, numel: int, steps_done: int) -> float:
    if method in ("compute", "sync"):
        return 0.0
    if method == "allreduce":
        return 4.0 * numel * steps_done
    if method == "powersgd":
        return 4.0 * state.total_numel_after_compression
    return float(state.compression_stats()["bytes_sent"])


def _isolated_exchange(method: str, density: float | None, module, loss_fn, sizes: dict, per_step_floats: float,
                       repeats: int = 3) -> dict:
    """The method's exchange with nothing else running (after the DDP run; see the module docstring)."""
    import torch
    import torch.distributed as dist

    from deft_kernels import driver, sparsifiers

    if method in ("compute", "sync"):
        return {}
    times, stats = [], []
    if method == "allreduce":
        bufs = [torch.randn(sizes[i]) for i in sorted(sizes)]
        for r in range(repeats + 1):
            dist.barrier()
            t = time.perf_counter()
            for b in bufs:
                dist.all_reduce(b)
            times.append(time.perf_counter() - t)
    elif method == "powersgd":
        buf = torch.randn(max(1, int(per_step_floats)))
        for r in range(repeats + 1):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t)
    else:
        module.zero_grad()
        loss_fn(module).backward()
        params = [p for p in module.parameters() if p.requires_grad]
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        sparsifier, options = sparsifier_of(method)
        sp = sparsifiers.build(sparsifier, density, **options)
        for r in range(repeats + 1):
            dist.barrier()
            t = time.perf_counter()
            _, st = driver.step(sp, grad, sizes=[p.numel() for p in params])
            times.append(time.perf_counter() - t)
            stats.append(st)
    out = {"exchange_iso_ms": 1e3 * statistics.median(times[1:])}
    if stats:
        for key in ("t_select", "t_comm", "t_other"):
            out[f"iso_{key}_ms"] = 1e3 * statistics.median(getattr(s, key) for s in stats[1:])
        out["iso_bytes_sent"] = statistics.median(s.bytes_sent for s in stats[1:])
    return out


class MethodRun:
    """One method's DDP model on this rank, built from the seed, timed in blocks of steps."""

    def __init__(self, spec: str, cfg: dict, rank: int, iface: str) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        from deft_kernels.benchmarks import models

        self.method, _, d = spec.partition(":")
        self.density = float(d) if d else None
        self.cfg, self.rank, self.iface = cfg, rank, iface
        torch.manual_seed(cfg["seed"])  # the same initial weights on every rank and for every method
        self.module, self.loss_fn = models.build(cfg["model"], batch_size=cfg["batch"])
        self.numel = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        self.gen_state = torch.Generator().manual_seed(cfg["seed"] + 1 + rank).get_state()  # each rank its batches
        # PowerSGD's hook aborts on gloo with several buckets (bench/compare_hooks.py): one bucket for it
        self.ddp = DDP(self.module, bucket_cap_mb=10_000 if self.method == "powersgd" else cfg["bucket_cap_mb"])
        self.sizes: dict = {}
        self.state = _attach(self.method, self.density, self.ddp, cfg["warmup"], cfg["seed"], self.sizes)
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=0.01, momentum=0.9)
        self.laps: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
        self.done = 0
        self.wire = [0, 0]
        self.cpu = 0.0  # CPU time of this process (all its threads: autograd, gloo, the hook's) in timed steps
        self.sent = 0.0
        self.hook = {"t_select": 0.0, "t_comm": 0.0, "t_other": 0.0, "sent": 0, "selected": 0, "steps": 0}

    def _step(self, record: bool) -> None:
        import torch

        rng = torch.get_rng_state()
        torch.set_rng_state(self.gen_state)  # this method's own stream of batches, whatever runs between
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = self.loss_fn(self.ddp)
        t1 = time.perf_counter()
        loss.backward()  # returns when DDP has every bucket's result (the hooks' futures included)
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        self.gen_state = torch.get_rng_state()
        torch.set_rng_state(rng)
        self.done += 1
        if record:
            for key, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("step", t3 - t0)):
                self.laps[key].append(v)

    def warmup(self) -> None:
        for _ in range(self.cfg["warmup"]):
            self._step(False)

    def timed(self, steps: int) -> None:
        import torch.distributed as dist

        dist.barrier()
        hook0 = self.state.compression_stats() if self.method in SPARSE else None
        sent0 = _sent_so_far(self.method, self.state, self.numel, self.done)
        c0 = _counters(self.iface)
        cpu0 = time.process_time()
        for _ in range(steps):
            self._step(True)
        self.cpu += time.process_time() - cpu0
        c1 = _counters(self.iface)
        dist.barrier()
        self.wire[0] += c1[0] - c0[0]
        self.wire[1] += c1[1] - c0[1]
        self.sent += _sent_so_far(self.method, self.state, self.numel, self.done) - sent0
        if hook0 is not None:
            hook1 = self.state.compression_stats()
            for key in self.hook:
                self.hook[key] += hook1[key] - hook0[key]

    def finish(self, bucket_sizes: dict) -> dict:
        from deft_kernels import driver

        steps = len(self.laps["step"])
        row = {"method": self.method, "density": self.density, "numel": self.numel, "rank": self.rank,
               "steps_ms": [1e3 * t for t in self.laps["step"]],
               **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in self.laps.items()},
               "cpu_ms": 1e3 * self.cpu / steps, "wire_tx_bytes": self.wire[0] / steps, "wire_rx_bytes": self.wire[1] / steps,
               "exchange_bytes": self.sent / steps}
        if self.method in SPARSE:
            for key in ("t_select", "t_comm", "t_other"):
                row[f"hook_{key}_ms"] = 1e3 * self.hook[key] / self.hook["steps"]
            row["sent_elements"] = self.hook["sent"] / self.hook["steps"]
            row["selected_elements"] = self.hook["selected"] / self.hook["steps"]
            row["index_bytes"] = driver.index_dtype(self.numel).itemsize
        if sparsifier_of(self.method)[0] == "deft":  # the plan protocol that ran, for validate_projection
            row["plan"] = plan_of(self.method)
        if self.method == "compute":
            row["bucket_sizes"] = [self.sizes[i] for i in sorted(self.sizes)]
        del self.opt, self.ddp
        gc.collect()
        row.update(_isolated_exchange(self.method, self.density, self.module, self.loss_fn, bucket_sizes,
                                      row["exchange_bytes"] / 4.0))
        return row


def worker(cfg: dict) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg["pg_timeout"]))
    rank = dist.get_rank()
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    runs = [MethodRun(spec, cfg, rank, iface) for spec in cfg["methods"]]
    for run in runs:
        run.warmup()
    # Rounds: every method takes its turn in each, so a slow spell of the shared machine hits all alike.
    per_round = [cfg["steps"] // cfg["rounds"] + (r < cfg["steps"] % cfg["rounds"]) for r in range(cfg["rounds"])]
    for steps in per_round:
        for run in runs:
            run.timed(steps)
    bucket_sizes = next((run.sizes for run in runs if run.method == "compute"), {})
    rows = []
    for run in runs:
        rows.append(run.finish(bucket_sizes))
        print(f"rank {rank}: {run.method} {run.density or ''} median step {rows[-1]['step_ms']:.1f} ms",
              file=sys.stderr, flush=True)
    print("RESULT " + json.dumps({"rank": rank, "node": int(os.environ["DEFT_CLUSTER_NODE"]), "rows": rows}), flush=True)
    dist.destroy_process_group()
    return 0


# -- the launcher (root): one cluster, one torchrun per node -----------------------------------------------------

def launch_on_cluster(script: str, cfg: dict, args: argparse.Namespace, raw: Path, stem: str,
                      expect: int) -> dict | None:
    """Run ``script --worker CFG`` under a multi-node torchrun on every node of a new cluster
    (``args.nodes``, ``args.bandwidth``, ``args.prefix``, at most ``args.timeout`` seconds), after a
    bulk transfer that measures the link. Every node's output goes to ``raw/stem.log``. Returns
    ``{"config": cfg and the launch's facts, "results": the payloads of the RESULT lines}``, or None
    (saying why in one line) when fewer than ``expect`` payloads came back. A node that fails after
    its result is printed is reported and kept in ``config["exit_codes"]``."""
    from deft_kernels.benchmarks.cluster import Cluster, bulk_transfer, check_available, parse_rate

    name = Path(script).stem
    missing = check_available()
    if missing:
        raise SystemExit(f"{name}: {missing}")  # one line, exit status 1
    raw.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Cluster(nodes=args.nodes, bandwidth=args.bandwidth, prefix=args.prefix) as c:
        link = bulk_transfer(c, max(4_000_000, int(parse_rate(args.bandwidth) / 8 * 0.3)), timeout=30)
        try:
            results = c.run(lambda n: c.torchrun_argv(n.index, [script, "--worker", json.dumps(cfg)]),
                            timeout=args.timeout, env={"OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired as e:
            results = e.results
            print(f"{name}: --timeout {args.timeout:g} s passed; every node was stopped", file=sys.stderr)
    (raw / f"{stem}.log").write_text("".join(f"=== node {i} exit {r.returncode}\n--- stdout\n{r.stdout}--- stderr\n"
                                             f"{r.stderr[-20000:]}" for i, r in enumerate(results)))
    payloads = [json.loads(line[len("RESULT "):]) for r in results for line in r.stdout.splitlines()
                if line.startswith("RESULT ")]
    codes = [r.returncode for r in results]
    if len(payloads) != expect:
        print(f"{name}: a node failed (exit codes {codes}); see {raw / stem}.log", file=sys.stderr)
        return None
    if any(codes):  # every result came back, then a rank died on its way out (kept in the JSON)
        print(f"{name}: every result came back, but exit codes {codes}; see {raw / stem}.log", file=sys.stderr)
    return {"config": {**cfg, "nodes": args.nodes, "bandwidth": args.bandwidth, "link_goodput_mbps": link / 1e6,
                       "exit_codes": codes,
                       "wall_s": time.time() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
            "results": payloads}


def launch(args: argparse.Namespace) -> int:
    cfg = {"model": args.model, "batch": args.batch or BATCH.get(args.model, 16), "methods": args.methods,
           "warmup": args.warmup, "steps": args.steps, "rounds": min(args.rounds, args.steps),
           "bucket_cap_mb": args.bucket_cap_mb, "seed": args.seed, "pg_timeout": args.pg_timeout}
    stem = f"{args.model}_n{args.nodes}_{args.bandwidth}{args.tag}"
    raw = Path(args.raw)
    load = os.getloadavg()
    run = launch_on_cluster(__file__, cfg, args, raw, stem, expect=args.nodes)
    if run is None:
        return 1
    out = {"config": {**run["config"], "load_average_start": load, "load_average_end": os.getloadavg()},
           "ranks": sorted(run["results"], key=lambda r: r["rank"])}
    (raw / f"{stem}.json").write_text(json.dumps(out, indent=1))
    print(f"{stem}: link {out['config']['link_goodput_mbps']:.0f} Mb/s goodput, {out['config']['wall_s']:.0f} s; "
          f"{raw / stem}.json")
    for row in summarize(out):
        print(f"  {row['label']:<12} step {row['step_ms']:8.1f} ms  exposed {row['exposed_ms']:8.1f}  "
              f"exchange alone {row.get('exchange_iso_ms', float('nan')):8.1f}  wire {row['wire_tx_mb']:7.3f} MB "
              f"(exchange says {row['exchange_mb']:.3f})")
    return 0


# -- report ---------------------------------------------------------------------------------------------------

def plan_of(method: str) -> str:
    """The DEFT plan protocol a method runs: its variant's ``plan`` (``deft-leader``), else DEFT's default."""
    import inspect

    from deft_kernels.sparsifiers import DEFT

    return sparsifier_of(method)[1].get("plan", inspect.signature(DEFT).parameters["plan"].default)


def _plan(row: dict, cfg: dict) -> str | None:
    """A DEFT row's plan protocol: as recorded; for launches that did not record it, a variant's own
    (``deft-leader``: "leader"), and "ahead" for ``deft`` in a launch that also ran ``deft-leader``
    (that variant exists only since the plan one step ahead became DEFT's default); else None (a
    launch from before ``DEFT(plan=...)``: the leader's step)."""
    if row.get("plan") or sparsifier_of(row["method"])[0] != "deft":
        return row.get("plan")
    if row["method"] in VARIANTS:
        return plan_of(row["method"])
    return "ahead" if any(m.partition(":")[0] in VARIANTS for m in cfg.get("methods", ())) else None


def _label(row: dict) -> str:
    """``method[plan] density``: a ``deft`` row that recorded its plan protocol names it (a variant's
    name says it already); rows measured before the protocols existed have none (they ran ``"leader"``)."""
    plan = f"[{row['plan']}]" if row.get("plan") and row["method"] not in VARIANTS else ""
    return row["method"] + plan + (f" {row['density']:.1%}" if row["density"] else "")


def summarize(run: dict) -> list[dict]:
    """One row per method of one launch: the slowest rank's median step (every rank waits for it), the
    mean over nodes of the bytes on the wire."""
    cfg = run["config"]
    n = cfg["nodes"]
    by_spec: dict[str, list[dict]] = {}
    for rank in run["ranks"]:
        for row in rank["rows"]:
            by_spec.setdefault(_label(row), []).append(row)
    compute = max(r["step_ms"] for r in by_spec["compute"]) if "compute" in by_spec else None
    sync = max(r["step_ms"] for r in by_spec["sync"]) if "sync" in by_spec else None
    allreduce_iso = max(r["exchange_iso_ms"] for r in by_spec["allreduce"]) if "allreduce" in by_spec else None
    rows = []
    for label, rs in by_spec.items():
        step = max(r["step_ms"] for r in rs)
        row = {"model": cfg["model"], "nodes": n, "bandwidth": cfg["bandwidth"], "label": label,
               "method": rs[0]["method"], "plan": _plan(rs[0], cfg), "density": rs[0]["density"], "numel": rs[0]["numel"],
               "step_ms": step,
               "compute_ms": compute, "exposed_ms": step - compute if compute else None,
               "step_over_compute": step / compute if compute else None,
               "sync_ms": sync, "step_over_sync": step / sync if sync else None,
               "forward_ms": max(r["forward_ms"] for r in rs), "backward_ms": max(r["backward_ms"] for r in rs),
               "optimizer_ms": max(r["optimizer_ms"] for r in rs),
               "cpu_ms": statistics.mean(r["cpu_ms"] for r in rs) if "cpu_ms" in rs[0] else None,
               "wire_tx_mb": statistics.mean(r["wire_tx_bytes"] for r in rs) / 1e6,
               "wire_rx_mb": statistics.mean(r["wire_rx_bytes"] for r in rs) / 1e6,
               "exchange_mb": statistics.mean(r["exchange_bytes"] for r in rs) / 1e6,
               "compute_over_allreduce": compute / allreduce_iso if compute and allreduce_iso else None,
               "link_goodput_mbps": cfg["link_goodput_mbps"]}
        ring = 2 * (n - 1) / n  # what each node sends in gloo's ring all-reduce, per byte reduced
        if row["method"] in SPARSE:  # all-gather of the indices (padded to the largest), all-reduce of the values
            # index bytes as recorded (int32 below 2^31 elements); launches that did not record them: int64
            row["wire_model_mb"] = ((n - 1) * rs[0].get("index_bytes", 8) * max(r["selected_elements"] for r in rs)
                                    + ring * 4 * rs[0]["sent_elements"]) / 1e6
        elif row["method"] in ("allreduce", "powersgd"):
            row["wire_model_mb"] = ring * row["exchange_mb"]
        if "exchange_iso_ms" in rs[0]:
            row["exchange_iso_ms"] = max(r["exchange_iso_ms"] for r in rs)
        for key in ("hook_t_select_ms", "hook_t_comm_ms", "hook_t_other_ms", "iso_t_select_ms", "iso_t_comm_ms",
                    "iso_t_other_ms"):
            if key in rs[0]:
                row[key] = max(r[key] for r in rs)
        rows.append(row)
    return rows


def _bw_bits(bw: str) -> float:
    from deft_kernels.benchmarks.cluster import parse_rate

    return parse_rate(bw)


def report(out_dir: Path, raw: Path) -> int:
    runs = [json.loads(p.read_text()) for p in sorted(raw.glob("*.json"))]
    if not runs:
        print(f"cluster_steps: no launches in {raw}; run one first", file=sys.stderr)
        return 1
    # A point (model, n, bandwidth) may take several launches (--tag: e.g. all-reduce apart from the
    # sparsifiers at 100 Mb/s, n = 4); each keeps the compute-only step of its own launch, and a
    # method measured twice keeps its first launch's row.
    rows, seen, allreduce = [], set(), {}
    for row in (row for run in runs for row in summarize(run)):
        key = (row["model"], row["nodes"], row["bandwidth"])
        if row["method"] == "allreduce":
            allreduce[key] = row
        if (key, row["label"]) not in seen:
            seen.add((key, row["label"]))
            rows.append(row)
    for row in rows:
        ref = allreduce.get((row["model"], row["nodes"], row["bandwidth"]))
        if row["compute_over_allreduce"] is None and ref and row["compute_ms"]:
            row["compute_over_allreduce"] = row["compute_ms"] / ref["exchange_iso_ms"]
    rows.sort(key=lambda r: (r["model"], r["nodes"], _bw_bits(r["bandwidth"]), r["label"]))
    head = (f"{'model':<9}{'n':>2} {'bw':>7} {'method':<12}{'step ms':>9}{'/comp':>7}{'/sync':>7}{'CPU ms':>7}{'exposed':>9}{'xchg alone':>11}{'comm alone':>11}"
            f"{'sel/comm/other (hook, ms)':>27}{'wire MB':>9}{'xchg MB':>9}{'wire/x':>7}{'model MB':>9}{'comp:AR':>8}")
    lines = ["Step time on the emulated cluster (bench/cluster_steps.py): median step of the slowest rank over the timed",
             "steps; /comp = step / compute-only step; /sync = step / (compute + one 1-float all-reduce per step);",
             "CPU ms = CPU time per step of one rank's process (all threads; mean over ranks); exposed = step - compute;",
             "xchg alone = the exchange with nothing else running (Top-k/DEFT: a whole Sparsifier.step); comm alone = its",
             "collectives only; hook = Top-k/DEFT hook's own split per step (all buckets); wire MB = the node's veth tx",
             "bytes per step (mean over nodes); xchg MB = what the exchange says it handed to the collectives;",
             "model MB = what gloo's ring algorithms send per node for that exchange (all-reduce 2(n-1)/n of the",
             "bytes; all-gather n-1 times the largest rank's mean part: DEFT pads to each step's largest part, which",
             "this leaves out, as it leaves out the leader protocol's header and plan and the tail of norms and status",
             "after the values); comp:AR = compute step / all-reduce alone.", "", head]
    for r in rows:
        hook = (f"{r['hook_t_select_ms']:.0f}/{r['hook_t_comm_ms']:.0f}/{r['hook_t_other_ms']:.0f}"
                if "hook_t_select_ms" in r else "")
        wire_x = r["wire_tx_mb"] / r["exchange_mb"] if r["exchange_mb"] else float("nan")
        lines.append(f"{r['model']:<9}{r['nodes']:>2} {r['bandwidth']:>7} {r['label']:<12}{r['step_ms']:>9.1f}"
                     f"{r['step_over_compute'] or float('nan'):>7.2f}{r['step_over_sync'] or float('nan'):>7.2f}"
                     f"{r['cpu_ms'] or float('nan'):>7.0f}{r['exposed_ms'] or 0:>9.1f}"
                     f"{r.get('exchange_iso_ms', float('nan')):>11.1f}{r.get('iso_t_comm_ms', float('nan')):>11.1f}{hook:>27}{r['wire_tx_mb']:>9.3f}"
                     f"{r['exchange_mb']:>9.3f}{wire_x:>7.2f}{r.get('wire_model_mb', float('nan')):>9.3f}"
                     f"{r['compute_over_allreduce'] or float('nan'):>8.2f}")
    lines += ["", *condensed(rows)]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cluster_steps.txt").write_text(text)
    (out_dir / "cluster_steps.json").write_text(json.dumps({"rows": rows, "launches": [r["config"] for r in runs]},
                                                           indent=1))
    print(text, end="")
    try:
        plot(rows, out_dir / "cluster_steps.png")
    except ImportError as e:
        print(f"plot skipped ({e}): pip install matplotlib", file=sys.stderr)
    return 0


CONDENSED = ["compute", "allreduce", "powersgd", *(f"{m} {d}" for d in ("1.0%", "0.1%")
                                                   for m in ("topk", "deft-leader", "deft"))]


def condensed(rows: list[dict]) -> list[str]:
    """The step times side by side, one line per (model, n, bandwidth), as a markdown table: the
    columns of ``CONDENSED`` that some row has, then each DEFT protocol's step at d = 1% over compute."""
    present = {r["label"] for r in rows}
    labels = [label for label in CONDENSED if label in present]
    ratios = [label for label in ("deft-leader 1.0%", "deft 1.0%") if label in present]
    names = {"deft-leader 1.0%": "DEFT leader 1% / compute", "deft 1.0%": "DEFT 1% / compute"}
    out = ["| model | n | bandwidth | compute : all-reduce alone | " + " | ".join(labels + [names[r] for r in ratios])
           + " |", "|---|---|---|---|" + "---|" * (len(labels) + len(ratios))]
    for key in dict.fromkeys((r["model"], r["nodes"], r["bandwidth"]) for r in rows):
        by = {r["label"]: r for r in rows if (r["model"], r["nodes"], r["bandwidth"]) == key}
        ratio = next((r["compute_over_allreduce"] for r in by.values() if r["compute_over_allreduce"]), None)
        cells = [f"{by[label]['step_ms']:,.0f}" if label in by else "" for label in labels]
        cells += [f"{by[label]['step_over_compute']:.2f}" if label in by and by[label]["step_over_compute"] else ""
                  for label in ratios]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {f'{ratio:.3g}' if ratio else ''} | " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = sorted({(r["model"], r["nodes"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (model, n) in zip(axes[0], panels):
        sub = [r for r in rows if r["model"] == model and r["nodes"] == n]
        for label in sorted({r["label"] for r in sub}, key=lambda s: (s != "compute", s)):
            pts = sorted(((_bw_bits(r["bandwidth"]) / 1e9, r["step_ms"] / 1e3) for r in sub if r["label"] == label))
            style = {"compute": dict(color="k", ls="--"), "sync": dict(color="grey", ls=":"),
                     "allreduce": dict(color="tab:red", lw=2), "powersgd": dict(color="tab:green")}.get(label, {})
            if label.startswith("deft"):  # the leader protocol in purple beside the default's blue
                style = dict(lw=2.5, color="tab:purple" if label.startswith("deft-leader") else "tab:blue",
                             ls="-" if "1.0%" in label else ":")
            elif label.startswith("topk"):
                style = dict(color="tab:orange", ls="-" if "1.0%" in label else ":")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("link bandwidth (Gb/s)")
        ax.set_title(f"{model}, {n} nodes")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("step time (s), median")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("DDP step time on the emulated cluster (1 CPU thread per node)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------------

def _methods_arg(text: str) -> str:
    m = re.fullmatch(rf"(compute|sync|allreduce|powersgd)|({'|'.join(map(re.escape, SPARSE))}):(0?\.\d+|1)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected compute, sync, allreduce, powersgd or SPARSIFIER:DENSITY "
                                         f"({', '.join(SPARSE)}; e.g. deft:0.01, deft-leader:0.01), got {text!r}")
    return text


def parse_args(argv: list[str] | None):
    from deft_kernels.benchmarks.cluster import OneLineParser, _nodes_arg, _positive_float, _prefix_arg, _rate_arg

    p = OneLineParser(prog="cluster_steps.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="write the table, JSON and plot of every launch so far")
    p.add_argument("--model", default="resnet18", choices=sorted(BATCH), help="built-in model")
    p.add_argument("--nodes", type=_nodes_arg, default=2)
    p.add_argument("--bandwidth", type=_rate_arg, default="1gbit")
    p.add_argument("--methods", type=_methods_arg, nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (>= 1)")
    p.add_argument("--bucket-cap-mb", type=_positive_float, default=25.0,
                   help="DDP's bucket_cap_mb for every method but PowerSGD (which gets one bucket)")
    p.add_argument("--rounds", type=int, default=10, help="the timed steps are split into rounds; every method "
                   "takes its turn in each (>= 1)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first per method (>= 3)")
    p.add_argument("--batch", type=int, default=None, help="batch per node (default: resnet18 16, ncf 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", type=_prefix_arg, default="dkc", help="the cluster's name prefix")
    p.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds before the launch is killed")
    p.add_argument("--pg-timeout", type=int, default=120, help="process group timeout (s)")
    p.add_argument("--tag", default="", help="suffix of the raw result's name")
    p.add_argument("--raw", default=None, help="the folder of raw launches: a launch writes there, --report "
                   "summarises it (default: OUT/cluster_steps/raw)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder of the raw launches and of the report "
                   "(bench/results: the committed ones)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.warmup < 3:
        p.error(f"--warmup must be >= 3 (DDP rebuilds its buckets at step 2; hooks warm up), got {args.warmup}")
    if args.bandwidth is None and not args.report and not args.worker:
        p.error("--bandwidth none: the launches are named by their rate; give one")
    if not re.fullmatch(r"[\w.-]*", args.tag):
        p.error(f"--tag must be letters, digits, '_', '.', '-', got {args.tag!r}")
    args.raw = args.raw or str(raw_dir(args.out))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.report:
        return report(Path(args.out), Path(args.raw))
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
