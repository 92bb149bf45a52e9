"""deft_kernels.metrics: the figures against independent computations on a world of one (in this
process: the local gradient from autograd, the residual from the state, the bytes from the budget),
the files and TensorBoard events read back, the warnings once each, bad arguments; and the three
examples (files, TensorBoard, Lightning) on 2 ranks, their outputs read back, the two ranks' bytes
checked against each other."""

import csv
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState
from deft_kernels.metrics import CsvSink, JsonlSink, Metrics, StepMetrics, TensorBoardSink, _imbalance, _rank_loads
from deft_kernels.planning import budget

from multiproc import gloo_rank, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS, WARMUP, DENSITY = 8, 3, 0.05


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (it comes with the test extra: pip install '.[test]')")




def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def _train(state, metrics, steps=STEPS, lr=0.1):
    """DDP with ``metrics.hook``; returns each step's local gradient norm (autograd, before DDP)."""
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.01)  # 2 buckets once rebuilt
    ddp.register_comm_hook(state, metrics.hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
        local = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        norms.append(float(torch.cat([t.flatten() for t in local]).norm()))
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    return norms


def test_figures_match_independent_computations(world_of_one, tmp_path):
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    seen: list[StepMetrics] = []
    with Metrics(state, sinks=[seen.append, CsvSink(tmp_path / "m.csv"), JsonlSink(tmp_path / "m.jsonl")]) as metrics:
        norms = _train(state, metrics)
    assert [m.step for m in seen] == list(range(STEPS))
    assert [m.phase for m in seen] == ["warmup"] * WARMUP + ["sparse"] * (STEPS - WARMUP)
    numel = sum(p.numel() for p in _model().parameters())
    for m, norm in zip(seen, norms):
        assert m.rank == 0 and m.numel == numel and m.density_asked == DENSITY
        assert m.exposed > 0 and math.isfinite(m.exposed)
        # one provisional bucket in DDP's first iteration, 2 once rebuilt
        assert len(m.buckets) == (1 if m.step == 0 else 2) and sum(b.numel for b in m.buckets) == numel
        assert m.grad_norm == pytest.approx(norm, rel=1e-5)
        if m.phase == "warmup":
            assert m.bytes_sent == m.bytes_received == 4 * numel and m.density_sent == 1.0
            assert math.isnan(m.residual_norm) and math.isnan(m.bin_imbalance)
            continue
        for b in m.buckets:
            k = budget(DENSITY, b.numel)
            # one rank: its int32 indices (the bucket has < 2^31 elements), its values and its fragment norms
            # (the plan one step ahead) go out, the summed values and norms come back
            norms = 4 * (state.sparsifiers[b.bucket].offsets.numel() - 1)
            assert (b.bytes_sent, b.bytes_received) == (4 * (k - _common(state, b.bucket)) + 4 * k + norms, 4 * k + norms)
            assert b.density_sent == k / b.numel and b.bin_imbalance == 1.0
            assert b.t_select >= 0 and b.residual_ratio == pytest.approx(b.residual_norm / b.grad_norm)
        assert m.bytes_sent == sum(b.bytes_sent for b in m.buckets)
        assert m.grad_norm == pytest.approx(math.sqrt(sum(b.grad_norm ** 2 for b in m.buckets)), rel=1e-6)
    residuals = torch.cat([sp.residual for _, sp in sorted(state.sparsifiers.items())])
    assert seen[-1].residual_norm == pytest.approx(float(residuals.norm()), rel=1e-6)
    assert seen[-1].residual_ratio == pytest.approx(seen[-1].residual_norm / seen[-1].grad_norm)

    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == sum(1 + len(m.buckets) for m in seen)
    last = [r for r in rows if r["step"] == str(STEPS - 1) and r["bucket"] == "all"]
    assert len(last) == 1 and float(last[0]["residual_ratio"]) == pytest.approx(seen[-1].residual_ratio)
    lines = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [line["step"] for line in lines] == list(range(STEPS)) and lines[0]["residual_norm"] is None
    assert lines[-1]["buckets"][0]["bytes_sent"] == seen[-1].buckets[0].bytes_sent


def _common(state, bucket):
    plan = state.last_plans[bucket]
    return int(plan.sizes[plan.common].sum())


def test_every_records_one_iteration_in_n(world_of_one):
    state = DeftState(sparsifier="topk", density=DENSITY, warmup_steps=WARMUP)
    seen = []
    _train(state, Metrics(state, sinks=[seen.append], every=3))
    assert [m.step for m in seen] == [0, 3, 6]
    assert all(math.isnan(m.bin_imbalance) for m in seen)  # Top-k has no bins


def test_warns_once_per_band(world_of_one):
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    metrics = Metrics(state, density_band=(0.2, 0.9), max_residual_ratio=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(state, metrics)
    ours = [str(w.message) for w in caught if "deft_kernels.metrics" in str(w.message)]
    assert len(ours) == 2 and metrics.warned == {"density", "residual"}, ours
    assert any("outside the band [0.2, 0.9]" in m for m in ours)
    assert any("above 0.001" in m for m in ours)


def test_no_warning_inside_the_default_bands(world_of_one):
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    metrics = Metrics(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(state, metrics)
    assert not [w for w in caught if "deft_kernels.metrics" in str(w.message)] and not metrics.warned
    assert metrics.max_residual_ratio == pytest.approx(3 / math.sqrt(DENSITY))


@_needs("tensorboard")
def test_tensorboard_sink_writes_readable_scalars(world_of_one, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    seen = []
    with Metrics(state, sinks=[seen.append, TensorBoardSink(SummaryWriter(log_dir=str(tmp_path)))]) as metrics:
        _train(state, metrics)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"deft/residual_ratio", "deft/bytes_sent", "deft/sparse", "deft/bucket0/density_sent"} <= set(tags)
    ratio = events.Scalars("deft/residual_ratio")
    assert [e.step for e in ratio] == list(range(WARMUP, STEPS))  # NaN (warm-up) is left out
    assert ratio[-1].value == pytest.approx(seen[-1].residual_ratio, rel=1e-6)
    assert [e.value for e in events.Scalars("deft/sparse")] == [0.0] * WARMUP + [1.0] * (STEPS - WARMUP)


def test_bin_imbalance_rotates_each_bucket_by_its_own_turn():
    """Hand-computed: 3 ranks, 3 buckets whose steps ran at turns 4, 5, 6 (step_count 5, rotation =
    bucket index); in a bucket at turn t rank r selects in bin (t + r) % 3."""
    costs = [[6.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]
    # bucket 0, turn 4: ranks 0, 1, 2 in bins 1, 2, 0 -> 0, 0, 6
    # bucket 1, turn 5: bins 2, 0, 1 -> 3, 1, 2
    # bucket 2, turn 6: bins 0, 1, 2 -> 0, 0, 3
    loads = _rank_loads([(costs[0], 4), (costs[1], 5), (costs[2], 6)], 3)
    assert loads == [3.0, 1.0, 11.0] and _imbalance(loads) == pytest.approx(11 / 5)
    # every bucket at turn 4 (the rotation left out) would give 2, 6, 7: 1.4
    assert _rank_loads([(c, 4) for c in costs], 3) == [2.0, 6.0, 7.0]


IMBALANCE_WARMUP, IMBALANCE_STEPS = 2, 6


@gloo_rank
def _imbalance_worker(rank, world_size, tmp):
    """DEFT on several DDP buckets; per sparse step, what Metrics reported and what each bucket's plan
    and this rank's selection were."""
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=IMBALANCE_WARMUP)
    seen = []

    def sink(m):
        if m.phase == "sparse":
            plans = state.last_plans
            seen.append({"step": m.step, "total": m.bin_imbalance, "buckets": {
                b.bucket: {"costs": plans[b.bucket].bin_costs(), "selected": state.last_stats[b.bucket].selected,
                           "k": [int(plans[b.bucket].k[f].sum()) for f in plans[b.bucket].bins]}
                for b in m.buckets}})

    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.001)  # 3 buckets once rebuilt
    ddp.register_comm_hook(state, Metrics(state, sinks=[sink]).hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1 + rank)
    for _ in range(IMBALANCE_STEPS):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    return seen


@pytest.mark.slow
def test_bin_imbalance_on_two_ranks_follows_each_buckets_rotation(tmp_path):
    """2 gloo ranks, 3 buckets: each rank selected in the bin (turn + rank) % n of every bucket (its
    selection count is that bin's k), and the step's imbalance is that of the loads summed so."""
    n = 2
    by_rank = run(_imbalance_worker, n, tmp_path, timeout=240)
    differs = False
    for rank, seen in enumerate(by_rank):
        assert len(seen) == IMBALANCE_STEPS - IMBALANCE_WARMUP
        for record in seen:
            assert len(record["buckets"]) >= 3, record
            loads, ignoring_rotation = [0.0] * n, [0.0] * n
            for index, b in record["buckets"].items():
                turn = record["step"] - IMBALANCE_WARMUP + index  # sparse steps so far + rotation
                assert b["selected"] == b["k"][(turn + rank) % n], (record["step"], index, b)
                for r in range(n):
                    loads[r] += b["costs"][(turn + r) % n]
                    ignoring_rotation[r] += b["costs"][(turn - index + r) % n]
            expected = max(loads) / (sum(loads) / n)
            assert record["total"] == pytest.approx(expected, rel=1e-9)
            differs |= abs(expected - max(ignoring_rotation) / (sum(ignoring_rotation) / n)) > 1e-3
    assert differs  # the case tells the rotation apart


def test_bad_arguments_name_the_argument(tmp_path):
    state = DeftState(density=DENSITY)
    with pytest.raises(TypeError, match="state must be a DeftState"):
        Metrics(object())
    with pytest.raises(TypeError, match="sinks must be an iterable"):
        Metrics(state, sinks="m.csv")
    with pytest.raises(TypeError, match=r"sinks\[1\] must be callable"):
        Metrics(state, sinks=[print, "m.csv"])
    with pytest.raises(ValueError, match="every must be >= 1"):
        Metrics(state, every=0)
    with pytest.raises(TypeError, match="density_band must be a pair"):
        Metrics(state, density_band=0.5)
    with pytest.raises(ValueError, match="density_band must satisfy"):
        Metrics(state, density_band=(2.0, 0.5))
    with pytest.raises(ValueError, match="max_residual_ratio must be > 0"):
        Metrics(state, max_residual_ratio=0)
    with pytest.raises(TypeError, match="max_residual_ratio must be a number"):
        Metrics(state, max_residual_ratio="10")
    with pytest.raises(ValueError, match="state must be the DeftState this Metrics was made for"):
        Metrics(state).hook(DeftState(density=DENSITY), None)
    with pytest.raises(TypeError, match="path must be a str"):
        CsvSink(3)
    with pytest.raises(TypeError, match="path must be a str"):
        JsonlSink(None)
    with pytest.raises(TypeError, match="writer must have add_scalar"):
        TensorBoardSink(object())
    with pytest.raises(TypeError, match="prefix must be a str"):
        TensorBoardSink(_FakeWriter(), prefix=1)


class _FakeWriter:
    def add_scalar(self, name, value, step):
        pass


# ---- the examples, on 2 ranks -------------------------------------------------------------------


def _run_example(script: str, out_dir: Path) -> str:
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), str(out_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"examples/{script} still running after 240 s: killed")
    assert proc.returncode == 0, out + err
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], out
    return out


@pytest.mark.slow
def test_files_example_two_ranks(tmp_path):
    out = _run_example("metrics_files.py", tmp_path)
    assert re.search(r"step 59 sparse: density sent 0\.0100", out), out  # the callback's line
    by_rank = [[r for r in csv.DictReader(open(tmp_path / f"rank{r}.csv")) if r["bucket"] != "all"]
               for r in range(2)]
    assert len(by_rank[0]) == len(by_rank[1]) == 60  # one bucket (75k parameters)
    for r0, r1 in zip(*by_rank):
        assert (r0["step"], r0["bucket"], r0["numel"], r0["density_sent"]) == \
               (r1["step"], r1["bucket"], r1["numel"], r1["density_sent"])
        if r0["phase"] == "sparse":
            values = 4 * round(float(r0["density_sent"]) * int(r0["numel"]))
            # what one rank receives besides the summed values is what the other one sent besides them
            assert int(r0["bytes_received"]) - values == int(r1["bytes_sent"]) - values
            assert int(r1["bytes_received"]) - values == int(r0["bytes_sent"]) - values
            assert float(r0["bin_imbalance"]) >= 1.0
    lines = [json.loads(line) for line in open(tmp_path / "rank1.jsonl")]
    assert len(lines) == 60 and lines[-1]["rank"] == 1 and lines[-1]["phase"] == "sparse"


@pytest.mark.slow
@_needs("tensorboard")
def test_tensorboard_example_two_ranks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run_example("metrics_tensorboard.py", tmp_path)
    for rank in range(2):
        events = EventAccumulator(str(tmp_path / f"rank{rank}"))
        events.Reload()
        density = events.Scalars("deft/density_sent")
        assert len(density) == 60 and density[-1].value == pytest.approx(0.01, rel=0.01)
        assert len(events.Scalars("deft/residual_ratio")) == 50


@pytest.mark.slow
@_needs("lightning")
def test_lightning_example_logs_through_self_log(tmp_path):
    _run_example("metrics_lightning.py", tmp_path)
    (logged,) = tmp_path.glob("**/metrics.csv")
    rows = list(csv.DictReader(open(logged)))
    ratio = [float(r["deft/residual_ratio"]) for r in rows if r.get("deft/residual_ratio")]
    assert len(ratio) == 50 and all(0 < v < 30 for v in ratio)
    assert {"deft/bytes_sent", "deft/exposed", "deft/bin_imbalance", "deft/sparse"} <= rows[0].keys()


@pytest.mark.parametrize("name", ["deft", "topk", "cltk"])
def test_bytes_received_is_what_the_other_ranks_sent(name, seed):
    """The driver's payload figures over 4 simulated ranks: besides the summed values, each rank
    receives exactly the indices the other ranks sent (Top-k's proposals overlap; CLT-k gathers none)."""
    from deft_kernels import sparsifiers
    from deft_kernels.driver import simulate_step

    n = 4
    sps = [sparsifiers.build(name, 0.02) for _ in range(n)]
    for _ in range(2):
        stats = [r.stats for r in simulate_step(sps, [torch.randn(5000) for _ in range(n)], sizes=[3000, 2000])]
        # the all-reduced payload: the values, and DEFT's fragment norms for the next plan
        values = 4 * stats[0].sent + (4 * (sps[0].offsets.numel() - 1) if name == "deft" else 0)
        for r, st in enumerate(stats):
            assert st.bytes_received - values == sum(s.bytes_sent - values for q, s in enumerate(stats) if q != r)
        assert (sum(s.bytes_sent for s in stats) > n * values) == (name != "cltk")
