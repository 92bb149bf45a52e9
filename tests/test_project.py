"""deft-bench project: the step model's formulas against hand-computed cases, the collectives taken
from the driver for every sparsifier, the refusal of bad input, and one small end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deft_kernels import planning, sparsifiers
from deft_kernels.benchmarks import cli, perf_model as pm, project, worker_count

LINK = pm.Link(alpha=10e-6, bandwidth=1e9)  # 10 us, 1 GB/s
FLAT = pm.Network(LINK)


# ---- formulas -------------------------------------------------------------------------------------


def test_all_reduce_ring_and_tree():
    # ring: 2*3*10us + 2*3/4 * 0.1 s = 0.15006 s; tree: 2*2*10us + 2*0.1 s = 0.20004 s -> the ring
    assert pm.all_reduce(4, 1e8, FLAT) == pytest.approx(0.15006)
    # no payload: ring 60 us, tree 40 us -> the tree
    assert pm.all_reduce(4, 0, FLAT) == pytest.approx(40e-6)
    assert pm.all_reduce(1, 1e8, FLAT) == 0.0


def test_all_gather_and_broadcast():
    # 3 * 10 us + 3 * 1 MB / 1 GB/s
    assert pm.all_gather(4, 1e6, FLAT) == pytest.approx(0.00303)
    # binomial tree 3 * (10 us + 1 ms) = 3.03 ms; chain 7 * 10 us + 1 ms = 1.07 ms -> the chain
    assert pm.broadcast(8, 1e6, FLAT) == pytest.approx(0.00107)
    # a small message: tree 3 * (10 us + 1 us) = 33 us; chain 70 us + 1 us -> the tree
    assert pm.broadcast(8, 1e3, FLAT) == pytest.approx(33e-6)
    # gloo's broadcast: the root sends to each of the 3 others in turn
    assert pm.broadcast(4, 1e6, pm.Network(LINK, library="gloo")) == pytest.approx(3 * (10e-6 + 1e-3))
    with pytest.raises(ValueError, match="library"):
        pm.Network(LINK, library="mpi")


def test_two_level_network():
    intra = pm.Link(1e-6, 1e11)
    net = pm.Network(LINK, intra, per_node=8)
    s = 8e8
    # 16 workers: reduce-scatter and all-gather on 8 (7 us + 7/8 * 8 ms each), then a 2-node ring
    # all-reduce of S/8 = 100 MB: 2 * 10 us + 2 * 1/2 * 0.1 s
    expected = 2 * (7e-6 + 7 / 8 * s / 1e11) + (2e-5 + 0.1)
    assert pm.all_reduce(16, s, net) == pytest.approx(expected)
    # within one node only NVLink counts
    assert pm.all_reduce(8, s, net) == pytest.approx(pm.all_reduce(8, s, pm.Network(intra)))
    # all-gather of 1 MB shares on 2 nodes x 8: a ring of 8 inside, a ring of 2 across (each worker
    # with its peer on the other node), then inside the 7 shares the node-mates brought
    share = 1e6
    expected = (7e-6 + 7 * share / 1e11) + (1e-5 + share / 1e9) + (7e-6 + 7 * share / 1e11)
    assert pm.all_gather(16, share, net) == pytest.approx(expected)
    with pytest.raises(ValueError, match="per_node"):
        pm.Network(LINK, intra, per_node=1)


def test_exchange_pays_latency_per_bucket():
    seq = [pm.Collective("all_reduce", 4e8, "gradients")]
    one = pm.exchange_time(seq, 4, FLAT)
    four = pm.exchange_time(seq, 4, FLAT, buckets=4)
    assert four - one == pytest.approx(3 * 6 * 10e-6)  # three more buckets, 2(n-1) alphas each
    assert pm.exchange_time([pm.Collective("all_gather", 0, "indices")], 4, FLAT) == 0.0  # not issued
    with pytest.raises(ValueError, match="unknown collective"):
        pm.collective_time(pm.Collective("scatter", 1.0), 4, FLAT)
    assert pm.ddp_buckets(100 * 2 ** 20, 25) == 5  # 1 MiB, then 99 MiB in 25 MiB buckets
    assert pm.ddp_buckets(2 ** 19, 25) == 1


def test_collective_overhead_paid_once_per_call():
    net = FLAT.with_overhead(2e-3)  # 2 ms per collective call
    seq = [pm.Collective("all_reduce", 4e8, "values"), pm.Collective("all_gather", 400.0, "indices"),
           pm.Collective("broadcast", 0, "plan")]  # no bytes: not issued, no overhead
    plain = pm.exchange_time(seq, 4, FLAT, buckets=3)
    assert pm.exchange_time(seq, 4, net, buckets=3) - plain == pytest.approx(3 * 2 * 2e-3)  # 3 buckets x 2 calls
    # all-reduce of 4 bytes on 2 workers: 2 alphas + 2 x 1/2 x 4 B / 1 GB/s + the overhead
    assert pm.collective_time(pm.Collective("all_reduce", 4), 2, net) == pytest.approx(2 * 10e-6 + 4e-9 + 2e-3)
    assert pm.collective_time(pm.Collective("all_reduce", 4), 1, net) == 0.0  # one worker: nothing sent
    assert net.with_bandwidth(5e8).overhead == 2e-3  # the break-even search keeps it
    with pytest.raises(ValueError, match="overhead"):
        FLAT.with_overhead(-1.0)


def test_step_parts():
    p = pm.step_parts(compute=0.100, backward=0.060, selection=0.005, exchange=0.080, overlap=0.5)
    assert (p.hidden, p.exposed, p.step) == pytest.approx((0.040, 0.040, 0.145))
    p = pm.step_parts(compute=0.100, backward=0.060, selection=0.0, exchange=0.200, overlap=1.0)
    assert (p.hidden, p.step) == pytest.approx((0.060, 0.240))  # hidden at most backward
    with pytest.raises(ValueError, match="overlap"):
        pm.step_parts(0.1, 0.05, 0.0, 0.1, 1.5)


def test_break_even():
    # advantage 8/b - 1 crosses at b = 8
    assert pm.break_even(lambda b: 8 / b - 1, 1e-3, 1e5) == pytest.approx(8, rel=1e-6)
    assert pm.break_even(lambda b: 1.0, 1e-3, 1e5) is None
    assert pm.break_even(lambda b: -1.0, 1e-3, 1e5) == 1e-3


def test_fits():
    a, b = pm.fit_power_law([2, 4, 8, 16], [3 * x ** 0.5 for x in (2, 4, 8, 16)])
    assert (a, b) == pytest.approx((3, 0.5))
    feats = [(1 / n, 1.0) for n in (2, 4, 8)]
    assert pm.fit_nonnegative(feats, [5 / n + 0.3 for n in (2, 4, 8)]) == pytest.approx([5, 0.3])
    # y falls faster than 1/n: the intercept would be negative, so the fit keeps the 1/n term alone
    theta = pm.fit_nonnegative(feats, [8 / n - 1 for n in (2, 4, 8)])
    assert theta[1] == 0 and theta[0] > 0


def _validate_projection():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "validate_projection.py"
    spec = importlib.util.spec_from_file_location("validate_projection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_calibrated_from_sync_runs():
    vp = _validate_projection()
    fits = {"1gbit": {"alpha_s": 100e-6, "bandwidth_Bps": 1e8}}

    def row(model, n, method, step_ms):
        return {"model": model, "nodes": n, "bandwidth": "1gbit", "method": method, "step_ms": step_ms}

    steps = [row("ncf", 2, "compute", 6.0), row("ncf", 2, "sync", 8.5),  # 2.5 ms - the modelled all-reduce
             row("small", 2, "compute", 7.0), row("small", 2, "sync", 8.0),
             row("ncf", 4, "compute", 10.0), row("ncf", 4, "sync", 16.0),
             row("big", 2, "compute", 450.0), row("big", 2, "sync", 500.0)]  # too long a step to count
    per_n, runs = vp.sync_overhead(steps, fits)
    # the modelled 4-byte all-reduce: the cheaper of ring 2(n-1) alpha + 2(n-1)/n 4/B and tree: at
    # n = 2, 0.2 ms + 0.04 us; at n = 4 the tree, 4 alpha + 8/B = 0.4 ms + 0.08 us
    ar2, ar4 = 2 * 100e-6 + 4 / 1e8, 4 * 100e-6 + 8 / 1e8
    assert per_n[2] == pytest.approx(((2.5e-3 - ar2) + (1.0e-3 - ar2)) / 2)  # median of the two short runs
    assert per_n[4] == pytest.approx(6e-3 - ar4)
    assert [r["used"] for r in runs] == [True, True, True, False]
    assert vp._overhead("sync") == "sync" and vp._overhead("none") == "none" and vp._overhead("1.5") == 1.5
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        vp._overhead("-1")


# ---- the collectives taken from the driver --------------------------------------------------------

SIZES = [300, 50, 650]  # three tensors; 650 > N / 3 is cut into 3 fragments at n = 3


def _record(name: str, n: int = 3):
    torch.manual_seed(0)
    grads = [torch.randn(sum(SIZES)) for _ in range(n)]
    options = {"threshold": 1.5} if name == "threshold" else {}
    rec = project.record_sequence(name, 0.05, grads, SIZES, n, warmup=1, steps=2, options=options)
    return rec, options


@pytest.mark.parametrize("name", [s for s in sparsifiers.SPARSIFIERS if s != "dense"])
def test_sequence_taken_from_the_driver(name):
    n, numel, tensors = 3, sum(SIZES), len(SIZES)
    rec, options = _record(name, n)
    template = project.check_rules(rec, SIZES, 0.05, options)  # raises where the rules and the driver differ
    expected_roles = {"deft": ["indices", "values"], "topk": ["header", "indices", "values"],
                      "threshold": ["header", "indices", "values"], "sidco": ["header", "indices", "values"],
                      "micro": ["plan", "header", "indices", "values"], "cltk": ["plan", "values"]}[name]
    assert [t["role"] for t in template] == expected_roles
    step = rec["steps"][0]
    elements = {t["role"]: sum(w[2] for w in r["wire"]) for t, r in zip(template, step["requests"])}
    k = planning.budget(0.05, numel)
    if "header" in elements:
        assert elements["header"] == 2 + tensors  # code, count, a used flag per tensor
    fragments = len(planning.fragment_sizes(SIZES, n))
    plan = {"cltk": k, "micro": n}.get(name)  # DEFT's plan is made by every rank, one step ahead: none travels
    assert elements.get("plan") == (None if plan is None else plan + 1)  # + the failure protocol's status slot
    if "indices" in elements:
        assert elements["indices"] == max(step["counts"])  # padded to the longest
    # the header rides in CLT-k's values, and in DEFT's with the fragment norms for the next plan; the
    # others carry the failure protocol's status block of n slots
    tail = {"cltk": n + tensors, "deft": fragments + n + tensors}.get(name, n)
    assert elements["values"] == step["union"] + tail
    if name in ("deft", "cltk"):
        assert step["union"] >= k  # exactly the budget, plus DEFT's one-per-fragment floor


def _fake_profile(name: str, union: int, max_count: int) -> dict:
    """A profile with one simulated n (3) of ``name`` on SIZES, widths as the driver sends them."""
    rec, options = _record(name)
    return {"numel": sum(SIZES), "sizes": SIZES, "threshold": None, "deft_plan": {},
            "templates": {name: project.check_rules(rec, SIZES, 0.05, options)},
            "records": {name: {"3": {"union": union, "max_count": max_count, "mean_count": max_count,
                                     "other_ms": 0.0}}}}


@pytest.mark.parametrize("index_bytes", [None, 4, 8])
def test_index_bytes_in_the_wire(index_bytes):
    # Top-k at n = 3 on 3 tensors, union 60, the largest proposal 25: header row of 2 + 3 int64 per
    # rank = 40 bytes; indices 25 x 4 (int32, what the driver sends below 2^31 elements) or 25 x 8;
    # values (60 + a status slot per rank) x 4 bytes
    profile = _fake_profile("topk", union=60, max_count=25)
    seq, _ = project._sequence("topk", 3, profile, SIZES, 0.05, None, index_bytes)
    assert {c.role: (c.op, c.nbytes) for c in seq} == {
        "header": ("all_gather", 40), "indices": ("all_gather", 25 * (index_bytes or 4)),
        "values": ("all_reduce", (60 + 3) * 4)}
    assert project.index_bytes_of(1000) == 4 and project.index_bytes_of(2**31) == 8  # the driver's rule
    assert project.index_bytes_of(2**31, 8) == 8


def test_index_bytes_refused():
    with pytest.raises(ValueError, match="int32 indices cannot address"):
        project.index_bytes_of(2**31, 4)
    with pytest.raises(ValueError, match="4 or 8"):
        project.index_bytes_of(1000, 2)


def test_check_rules_catches_a_changed_exchange():
    rec, options = _record("topk")
    rec["steps"][1]["requests"][1]["wire"] = [("all_gather", 8, max(rec["steps"][1]["counts"]) + 1)]
    with pytest.raises(RuntimeError, match="topk at n = 3, measured step 1"):
        project.check_rules(rec, SIZES, 0.05, options)
    rec, options = _record("topk")
    del rec["steps"][0]["requests"][0]
    with pytest.raises(RuntimeError, match="the model expects"):
        project.check_rules(rec, SIZES, 0.05, options)


def test_powersgd_shapes():
    # a 64 x 3x3x3 conv is a 64 x 27 matrix, 1728 > 2 * 91: P 64, Q 27; a 10 x 4 matrix, 40 > 2 * 14:
    # P 10, Q 4; a 2 x 2 matrix (4 <= 2 * 4) and a bias stay plain
    got = project.powersgd_shapes([[64, 3, 3, 3], [10, 4], [2, 2], [64]], rank=1)
    assert (got["p_elements"], got["q_elements"], got["plain_elements"]) == (64 + 10, 27 + 4, 4 + 64)


# ---- refusal of bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, option", [
    (["--bandwidth", "-1"], "--bandwidth"),
    (["--bandwidth", "0"], "--bandwidth"),
    (["--preset", "eth25", "--workers", "0"], "--workers"),
    (["--preset", "token-ring"], "--preset"),
    (["--preset", "eth25", "--latency", "-3"], "--latency"),
    (["--preset", "eth25", "--overlap", "2"], "--overlap"),
    (["--preset", "eth25", "--index-bytes", "2"], "--index-bytes"),
    (["--preset", "eth25", "--index-bytes", "four"], "--index-bytes"),
    (["--preset", "eth25", "--collective-overhead", "-1"], "--collective-overhead"),
    ([], "--preset"),
])
def test_bad_input_is_refused_in_one_line(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["project", *argv, "--no-plot"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and err.startswith("deft-bench project: error:")


# ---- end to end, a small model --------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def tiny():
    """A model factory for ``--model test_project:tiny``."""
    model = _Tiny()

    def loss_fn(m):
        return F.cross_entropy(m(torch.randn(16, 64)), torch.randint(10, (16,)))

    return model, loss_fn


def test_projection_end_to_end(tmp_path):
    model = f"{__name__}:tiny"
    worker_count.main(["--model", model, "--workers", "1", "2", "4", "--sparsifiers", "deft", "topk",
                       "--distinct-gradients", "4", "--repeats", "1", "--out", str(tmp_path), "--no-plot",
                       "--no-progress"])
    selection = tmp_path / worker_count.output_stem(model, "cpu")
    argv = ["project", "--model", model, "--sparsifiers", "deft", "topk", "--workers", "2", "4", "64", "1024",
            "--bandwidth", "0.01", "100", "--latency", "5", "--sim-workers", "1", "2", "4", "--distinct-gradients",
            "4", "--sim-steps", "1", "--sim-warmup", "1", "--selection-json", f"{selection}.json",
            "--compute-ms", "50", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path), "--no-plot"]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / f"{project.output_stem(model, None)}.json").read_text())
    points = {(p["network"], p["workers"], p["method"]): p for p in doc["points"]}
    assert {m for *_, m in points} == {"allreduce", "powersgd", "deft", "topk"}
    for p in doc["points"]:
        assert p["step_ms"] == pytest.approx(p["compute_ms"] + p["selection_ms"] + p["exposed_ms"])
        if p["method"] == "allreduce":
            assert p["speedup"] == 1.0 and p["selection_ms"] == 0
    slow, fast = (points[(net, 1024, "allreduce")] for net in ("0.01Gb/s,5us", "100Gb/s,5us"))
    assert slow["exchange_ms"] > fast["exchange_ms"]
    # the all-reduce sends 4 N bytes; DEFT's values are fp32 at its union
    numel = doc["config"]["numel"]
    assert points[("100Gb/s,5us", 64, "allreduce")]["bytes"] == {"gradients": 4 * numel}
    assert {b["verdict"] for b in doc["break_even"]} <= {project.CROSSES, project.ALWAYS, project.NEVER}
    for b in doc["break_even"]:
        if b["verdict"] == project.CROSSES:
            assert b["break_even_gbps"] > 0
    deft = points[("100Gb/s,5us", 64, "deft")]
    assert doc["config"]["index_bytes"] == 4  # int32, as the driver sends
    # the profile is cached: a second run measures nothing and is fast; with int64 indices and a
    # fixed cost per collective, DEFT's index bytes double and its exchange grows by the overheads
    assert cli.main(argv + ["--index-bytes", "8", "--collective-overhead", "1.5"]) == 0
    doc8 = json.loads((tmp_path / f"{project.output_stem(model, None)}.json").read_text())
    deft8 = next(p for p in doc8["points"] if (p["network"], p["workers"], p["method"]) == ("100Gb/s,5us", 64, "deft"))
    assert deft8["bytes"]["indices"] == 2 * deft["bytes"]["indices"]
    assert deft8["bytes"]["values"] == deft["bytes"]["values"]
    assert doc8["config"]["collective_overhead_ms"] == 1.5
    buckets = doc8["config"]["buckets"]
    extra = deft8["exchange_ms"] - deft["exchange_ms"]
    assert extra >= 2 * 1.5 * buckets  # two collectives per bucket (the plan one step ahead), 1.5 ms each (+ the wider indices)
    assert len(list((tmp_path / "cache").glob("profile_*.json"))) == 1
    assert math.isfinite(doc["config"]["compute_ms"])
