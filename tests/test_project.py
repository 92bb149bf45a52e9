"""deft-bench project: the step model's formulas against hand-computed cases, the collectives taken
from the driver for every sparsifier, the refusal of bad input, and one small end-to-end run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deft_kernels import planning, sparsifiers
from deft_kernels.benchmarks import cli, perf_model as pm, project, worker_count

NET = pm.Network(pm.Link(0.0, 1e9))  # NCCL's tuner, bus bandwidth 1 GB/s (efficiency 1), one GPU per node
TWO_LEVEL = pm.Network(pm.Link(0.0, 1e9), pm.Link(2e-6, 1e11), per_node=8)  # + NVLink at 100 GB/s
GLOO = pm.Network(pm.Link(10e-6, 1e9), library="gloo")
US = 1e-6


# ---- formulas: NCCL 2.26.2's tuner, by hand -------------------------------------------------------


def test_ring_all_reduce_each_protocol():
    # n = 4 flat (one GPU per node: the inter-node step is priced with the tree's 5.0 / 8.5 / 14 us),
    # S = 1e8: ring latency base + 2(n-1) steps, bandwidth B x protocol factor x n / (2(n-1))
    t = pm.candidate_times("all_reduce", 4, 1e8, NET)
    assert t[("ring", "LL")] == pytest.approx((6.6 + 6 * 5.0) * US + 1e8 / (0.5e9 * 4 / 6))
    assert t[("ring", "LL128")] == pytest.approx((14.0 + 6 * 8.5) * US + 1e8 / (0.92e9 * 4 / 6))
    # Simple across nodes: the ring's latency plateau x 1.4 (1e8 bytes >= 64 B x 8 channels x 4 ranks)
    assert t[("ring", "Simple")] == pytest.approx(1.4 * (8.4 + 6 * 14.0) * US + 1e8 / (1e9 * 4 / 6))
    choice = pm.choose("all_reduce", 4, 1e8, NET)
    assert (choice.algorithm, choice.protocol) == ("ring", "Simple")
    assert choice.seconds == pytest.approx(0.15012936) == pm.all_reduce(4, 1e8, NET)


def test_small_all_reduce_takes_ll():
    # 8 bytes on 2 ranks: ring LL 6.6 + 2 x 5.0 us; the tree
    # LL pays 6.8 + 2 x log2(2) x 5.0 us and a slower bandwidth (0.92 / 3.8 / 2)
    t = pm.candidate_times("all_reduce", 2, 8, NET)
    assert t[("ring", "LL")] == pytest.approx(16.6 * US + 8 / 0.5e9)
    assert t[("tree", "LL")] == pytest.approx(16.8 * US + 8 / (1e9 * 0.92 / 3.8 * 0.5))
    assert pm.choose("all_reduce", 2, 8, NET).protocol == "LL"
    assert pm.all_reduce(1, 1e8, NET) == 0.0


def test_tree_all_reduce_derated():
    # 16 MiB on 1,024 ranks: the tree pays 2 log2(1024) = 20 inter-node steps; its bandwidth is
    # B x 0.92 x protocol factor x 1/2, times the size correction at log2(S / 64) = 18 (LL .9, LL128
    # .9, Simple .7): Simple's 0.92 x 0.7 = 0.64 of 2S/B (nccl-tests#232: 39.9 of 50 GB/s at 16 MB)
    s = 16 * 2 ** 20
    t = pm.candidate_times("all_reduce", 1024, s, NET)
    assert t[("tree", "LL")] == pytest.approx((6.8 + 20 * 5.0) * US + s / (1e9 * 0.92 / 3.8 * 0.5 * 0.9))
    assert t[("tree", "LL128")] == pytest.approx((14.0 + 20 * 8.5) * US + s / (1e9 * 0.92 * 120 / 128 * 0.5 * 0.9))
    assert t[("tree", "Simple")] == pytest.approx((8.4 + 20 * 14.0) * US + s / (1e9 * 0.92 * 0.5 * 0.7))
    assert t[("ring", "LL")] == pytest.approx((6.6 + 2046 * 5.0) * US + 2 * 1023 / 1024 * s / 0.5e9)
    choice = pm.choose("all_reduce", 1024, s, NET)
    assert (choice.algorithm, choice.protocol) == ("tree", "LL128")
    undera = pm.candidate_times("all_reduce", 1024, s, replace(NET, assumptions=pm.Assumptions(tree_derate=False)))
    assert undera[("tree", "Simple")] == pytest.approx(288.4 * US + 2 * s / 1e9)


def test_all_gather_ring_and_pat():
    # a share of 1 MB from each of 8 ranks: ring n-1 = 7 steps, bandwidth B n/(n-1) on the 8 MB
    # gathered; PAT (Simple only): 8 + log2(8) x 14 / 3.5 + 2.8 x 8 us, bandwidth 0.75 B
    t = pm.candidate_times("all_gather", 8, 1e6, NET)
    assert t[("ring", "LL")] == pytest.approx((6.6 + 7 * 5.0) * US + 8e6 / (0.5e9 * 8 / 7))
    assert t[("ring", "LL128")] == pytest.approx((14.0 + 7 * 8.5) * US + 8e6 / (0.92e9 * 8 / 7))
    assert t[("ring", "Simple")] == pytest.approx((8.4 + 7 * 14.0) * US + 7e6 / 1e9)  # no plateau for a gather
    assert t[("pat", "Simple")] == pytest.approx((8 + 3 * 14 / 3.5 + 2.8 * 8) * US + 8e6 / 0.75e9)
    assert pm.choose("all_gather", 8, 1e6, NET).algorithm == "ring"
    # 4 bytes from each of 1,024 ranks: PAT's 2.9 ms (its linear part, 2.8 us a rank) beats the ring's
    # 1,023 LL steps (5.1 ms)
    small = pm.choose("all_gather", 1024, 4, NET)
    assert (small.algorithm, small.seconds) == ("pat", pytest.approx((8 + 10 * 4 + 2.8 * 1024) * US + 4096 / 0.75e9))
    no_pat = replace(NET, assumptions=pm.Assumptions(pat=False))
    assert pm.choose("all_gather", 1024, 4, no_pat).seconds == pytest.approx((6.6 + 1023 * 5.0) * US + 4096 / (0.5e9 * 1024 / 1023))
    # PAT needs one GPU per node
    assert not any(alg == "pat" for alg, _ in pm.candidate_times("all_gather", 16, 4, TWO_LEVEL))


def test_broadcast_ring_only():
    # 1 kB from one rank to 8: a pipelined chain of n-1 = 7 steps (NCCL offers Broadcast by ring only)
    t = pm.candidate_times("broadcast", 8, 1e3, NET)
    assert set(t) == {("ring", "LL"), ("ring", "LL128"), ("ring", "Simple")}
    assert pm.broadcast(8, 1e3, NET) == pytest.approx((6.6 + 7 * 5.0) * US + 1e3 / 0.5e9)
    # without that assumption, a binomial tree: ceil(log2 8) = 3 rounds of the whole message
    tree = replace(NET, assumptions=pm.Assumptions(ring_broadcast=False))
    assert pm.choose("broadcast", 8, 1e3, tree) == pm.Choice(pytest.approx((6.6 + 3 * 5.0) * US + 3e3 / 0.5e9),
                                                             "binomial", "LL")


def test_two_level_ring():
    # 16 ranks on 2 nodes of 8: an all-gather ring of 15 steps, 1 across the network (with several
    # GPUs per node the ring's own 2.7 / 4.0 / 14 us) and 14 on NVLink (0.6 / 1.9 / 3.4 us, at least
    # the network post's 1 us, x3 for Simple); the bus is every GPU's own NIC: 8 x 1 GB/s
    t = pm.candidate_times("all_gather", 16, 1e6, TWO_LEVEL)
    assert t[("ring", "Simple")] == pytest.approx((8.4 + 14 * 3.4 + 14.0) * US + 16e6 / (8e9 * 16 / 15))
    assert t[("ring", "LL128")] == pytest.approx((14.0 + 14 * 1.9 + 4.0) * US + 16e6 / (0.92 * 8e9 * 16 / 15))
    assert t[("ring", "LL")] == pytest.approx((6.6 + 14 * 1.0 + 2.7) * US + 16e6 / (0.5 * 8e9 * 16 / 15))
    # one node: NVLink only, its own bus bandwidth
    assert pm.candidate_times("all_gather", 8, 1e6, TWO_LEVEL)[("ring", "Simple")] == pytest.approx(
        (8.4 + 7 * 3.4) * US + 8e6 / (1e11 * 8 / 7))
    # the tree across 2 nodes: 2 x ((8 - 1) NVLink tree steps + log2(2) network steps)
    assert pm.candidate_times("all_reduce", 16, 1e3, TWO_LEVEL)[("tree", "LL")] == pytest.approx(
        (6.8 + 2 * (7 * 0.6 + 5.0)) * US + 1e3 / (8e9 * 0.92 / 3.8 * 0.5))
    with pytest.raises(ValueError, match="per_node"):
        pm.Network(pm.Link(0.0, 1e9), pm.Link(0.0, 1e11), per_node=1)


def test_flat_latency_mode():
    # protocol latencies off: one flat 10 us per step, Simple's bandwidth, no base latency (the model
    # before issue 25): ring 2(n-1) alpha + 2(n-1)/n S/B against the tree 2 log2(n) alpha + 2S/B
    flat = replace(NET, assumptions=pm.Assumptions(protocol_latency=False, tree_derate=False))
    assert pm.all_reduce(4, 1e8, flat) == pytest.approx(6 * 10e-6 + 1.5 * 0.1)
    assert pm.all_reduce(4, 0.5, flat) == pytest.approx(4 * 10e-6 + 2 * 0.5 / 1e9)  # the tree for a tiny one
    assert pm.all_gather(4, 1e6, flat) == pytest.approx(3 * 10e-6 + 3e-3)


def test_gloo_as_calibrated():
    # ring all-reduce only, ring all-gather, the root sending the whole message to each rank in turn
    assert pm.all_reduce(4, 1e8, GLOO) == pytest.approx(6 * 10e-6 + 2 * 3 / 4 * 0.1)
    assert pm.all_reduce(4, 4, GLOO) == pytest.approx(6 * 10e-6 + 6e-9)  # no tree on gloo
    assert pm.all_gather(4, 1e6, GLOO) == pytest.approx(3 * 10e-6 + 3e-3)
    assert pm.broadcast(4, 1e6, GLOO) == pytest.approx(3 * (10e-6 + 1e-3))
    with pytest.raises(ValueError, match="library"):
        pm.Network(pm.Link(0.0, 1e9), library="mpi")
    with pytest.raises(ValueError, match="one level"):
        pm.Network(pm.Link(0.0, 1e9), pm.Link(0.0, 1e11), 8, library="gloo")
    with pytest.raises(ValueError, match="unknown collective"):
        pm.collective_time(pm.Collective("scatter", 1.0), 4, NET)


def test_bus_efficiency():
    eff = project.parse_bus_efficiency(["1:0.96", "3:0.7", "6:0.4"])
    assert [eff.at(m) for m in (1, 2, 3, 5, 6, 1024)] == [0.96, 0.96, 0.7, 0.7, 0.4, 0.4]
    assert project.parse_bus_efficiency(["0.9"]).at(512) == 0.9
    net = pm.Network(pm.Link(0.0, 1e9), efficiency=eff)
    assert net.bus_bandwidth(2) == pytest.approx(0.96e9) and net.bus_bandwidth(64) == pytest.approx(0.4e9)
    assert pm.all_gather(64, 1e6, net) == pytest.approx(pm.all_gather(64, 1e6, replace(NET, inter=pm.Link(0.0, 0.4e9))))
    for bad in (["1.5"], ["0"], ["2:0.9", "1:0.8"], ["x"]):
        with pytest.raises(ValueError):
            project.parse_bus_efficiency(bad)


def test_exchange_pays_the_tail_and_overhead():
    buckets = [[pm.Collective("all_reduce", 4e8, "gradients")], [pm.Collective("all_reduce", 1e8, "gradients")]]
    exchange, tail = pm.exchange_time(buckets, 4, GLOO)
    assert tail == pytest.approx(pm.all_reduce(4, 1e8, GLOO))
    assert exchange == pytest.approx(tail + pm.all_reduce(4, 4e8, GLOO))
    sparse = [[pm.Collective("all_gather", 400.0, "indices"), pm.Collective("broadcast", 0, "plan")]]
    with_overhead = pm.exchange_time(sparse, 4, GLOO.with_overhead(2e-3))[0]
    assert with_overhead - pm.exchange_time(sparse, 4, GLOO)[0] == pytest.approx(2e-3)  # a call of no bytes is not issued
    assert pm.collective_time(pm.Collective("all_reduce", 4), 1, GLOO.with_overhead(2e-3)) == 0.0
    assert GLOO.with_overhead(2e-3).with_bandwidth(5e8).overhead == 2e-3  # the break-even search keeps it
    with pytest.raises(ValueError, match="overhead"):
        GLOO.with_overhead(-1.0)


def test_ddp_bucket_assignment():
    # DDP's rebuilt buckets: parameters in reverse, a first bucket of 1 MiB, then 25 MiB, each closed
    # once it holds at least its cap (a parameter larger than the cap closes the bucket it joins)
    mib = 2 ** 20
    nbytes = [30 * mib, 10 * mib, 10 * mib, 2 * mib, mib // 2, mib // 2]
    assert pm.ddp_bucket_assignment(nbytes) == [[5, 4], [3, 2, 1, 0]]
    assert pm.ddp_bucket_assignment(nbytes, 25, None) == [[5, 4, 3, 2, 1, 0]]
    assert pm.ddp_bucket_assignment(nbytes, 5, None) == [[5, 4, 3, 2], [1], [0]]
    sizes = [n // 4 for n in nbytes]
    buckets, key = project.bucket_assignment(sizes, bucket_sizes=[sizes[5] + sizes[4] + sizes[3] + 1000, sum(sizes[:3]) - 1000])
    assert buckets == [[5, 4, 3], [2, 1, 0]] and key.startswith("sizes:")  # the nearest parameter boundary
    assert project.bucket_assignment(sizes, buckets=2)[0] == [[5, 4, 3, 2, 1], [0]]
    with pytest.raises(ValueError, match="cover"):
        project.bucket_assignment(sizes, bucket_sizes=[5])


def test_step_parts():
    p = pm.step_parts(compute=0.100, backward=0.060, selection=0.005, exchange=0.080, overlap=0.5)
    assert (p.hidden, p.exposed, p.step) == pytest.approx((0.040, 0.040, 0.145))
    p = pm.step_parts(compute=0.100, backward=0.060, selection=0.0, exchange=0.200, overlap=1.0)
    assert (p.hidden, p.step) == pytest.approx((0.060, 0.240))  # hidden at most backward
    # the last bucket's 30 ms are never hidden, even when backward could take them
    p = pm.step_parts(compute=0.100, backward=0.060, selection=0.0, exchange=0.050, overlap=1.0, tail=0.030)
    assert (p.hidden, p.exposed) == pytest.approx((0.020, 0.030))
    with pytest.raises(ValueError, match="overlap"):
        pm.step_parts(0.1, 0.05, 0.0, 0.1, 1.5)
    with pytest.raises(ValueError, match="tail"):
        pm.step_parts(0.1, 0.05, 0.0, 0.1, 1.0, tail=0.2)


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
    # the modelled 4-byte all-reduce, gloo's ring as calibrated: 2(n-1) alpha + 2(n-1)/n 4/B: at
    # n = 2, 0.2 ms + 0.04 us; at n = 4, 0.6 ms + 0.06 us
    ar2, ar4 = 2 * 100e-6 + 4 / 1e8, 6 * 100e-6 + 6 / 1e8
    assert per_n[2] == pytest.approx(((2.5e-3 - ar2) + (1.0e-3 - ar2)) / 2)  # median of the two short runs
    assert per_n[4] == pytest.approx(6e-3 - ar4)
    assert [r["used"] for r in runs] == [True, True, True, False]
    assert vp._overhead("sync") == "sync" and vp._overhead("none") == "none" and vp._overhead("1.5") == 1.5
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        vp._overhead("-1")


def test_validation_reads_each_points_protocol_and_buckets(tmp_path):
    vp = _validate_projection()
    # a cluster point's DEFT protocol: its "plan" field, "leader" where the grid's driver had none
    assert vp.method_of({"method": "deft"}) == "deft-leader"
    assert vp.method_of({"method": "deft", "plan": "ahead"}) == "deft-ahead"
    assert vp.method_of({"method": "topk", "plan": "ahead"}) == "topk"
    with pytest.raises(LookupError, match="plan protocol"):
        vp.method_of({"method": "deft", "plan": "sometimes"})
    # DDP's buckets of a launch, from its raw record's compute-only row
    rows = [{"method": "sync"}, {"method": "compute", "bucket_sizes": [7086090, 4087872]}]
    (tmp_path / "resnet18_n2_1gbit.json").write_text(json.dumps({"ranks": [{"rows": rows}]}))
    assert vp.ddp_buckets("resnet18", 2, "1gbit", raw=tmp_path) == [7086090, 4087872]
    assert vp.ddp_buckets("resnet18", 4, "1gbit", raw=tmp_path) is None


# ---- the collectives taken from the driver --------------------------------------------------------

SIZES = [300, 50, 650]  # three tensors; 650 > N / 3 is cut into 3 fragments at n = 3


def _record(name: str, n: int = 3):
    """A recorded profile step of ``name`` (``deft-ahead``: DEFT's default protocol; ``deft``: as a
    profile records it, with the paper's protocol, whose roles price both)."""
    torch.manual_seed(0)
    grads = [torch.randn(sum(SIZES)) for _ in range(n)]
    options = {"threshold": {"threshold": 1.5}, "deft": {"plan": "leader"}, "deft-ahead": {}}.get(name, {})
    rec = project.record_sequence(name.split("-")[0], 0.05, grads, SIZES, n, warmup=1, steps=2, options=options)
    return rec, options


@pytest.mark.parametrize("name", [s for s in sparsifiers.SPARSIFIERS if s != "dense"] + ["deft-ahead"])
def test_sequence_taken_from_the_driver(name):
    n, numel, tensors = 3, sum(SIZES), len(SIZES)
    rec, options = _record(name, n)
    template = project.check_rules(rec, SIZES, 0.05, options)  # raises where the rules and the driver differ
    expected_roles = {"deft-ahead": ["indices", "values"], "deft": ["header", "plan", "indices", "values"],
                      "topk": ["header", "indices", "values"],
                      "threshold": ["header", "indices", "values"], "sidco": ["header", "indices", "values"],
                      "micro": ["plan", "header", "indices", "values"], "cltk": ["plan", "values"]}[name]
    assert [t["role"] for t in template] == expected_roles
    step = rec["steps"][0]
    elements = {t["role"]: sum(w[2] for w in r["wire"]) for t, r in zip(template, step["requests"])}
    k = planning.budget(0.05, numel)
    if "header" in elements:
        assert elements["header"] == 2 + tensors  # code, count, a used flag per tensor
    fragments = len(planning.fragment_sizes(SIZES, n))
    # DEFT one step ahead: every rank makes the plan, none travels; the leader's: 3 per fragment
    plan = {"cltk": k, "micro": n, "deft": 3 * fragments}.get(name)
    assert elements.get("plan") == (None if plan is None else plan + 1)  # + the failure protocol's status slot
    if "indices" in elements:
        assert elements["indices"] == max(step["counts"])  # padded to the longest
    # the header rides in CLT-k's values, and in DEFT's with the fragment norms for the next plan; the
    # others carry the failure protocol's status block of n slots
    tail = {"cltk": n + tensors, "deft-ahead": fragments + n + tensors}.get(name, n)
    assert elements["values"] == step["union"] + tail
    if name in ("deft", "deft-ahead", "cltk"):
        assert step["union"] >= k  # exactly the budget, plus DEFT's one-per-fragment floor


def test_size_rules_of_the_plan_ahead_step():
    # DEFT(plan="ahead"): the proposals' all-gather and one all-reduce of the values at the union,
    # one norm per fragment, a status slot per rank and a used count per tensor; no header, no plan
    n, tensors = 3, len(SIZES)
    fragments = len(planning.fragment_sizes(SIZES, n))  # 300, 50 whole; 650 cut into 3
    assert fragments == 5
    rules = project.size_rules("deft", 0.05, SIZES, n, union=52, max_count=20, plan_elements=3 * fragments, plan="ahead")
    assert rules == [("GatherProposals", "indices", 20), ("AllReduce", "values", 52 + fragments + n + tensors)]
    leader = project.size_rules("deft", 0.05, SIZES, n, union=52, max_count=20, plan_elements=3 * fragments)
    assert [r[1] for r in leader] == ["header", "plan", "indices", "values"]
    assert project.size_rules("topk", 0.05, SIZES, 3, 60, 25, None, "ahead") == \
        project.size_rules("topk", 0.05, SIZES, 3, 60, 25, None)  # DEFT's protocol only
    with pytest.raises(ValueError, match="plan must be"):
        project.size_rules("deft", 0.05, SIZES, n, 52, 20, 3 * fragments, "sometimes")


def test_fragment_norms_from_the_slices(tmp_path):
    # on the measured layout, with tensors shorter than the slice count, the fragment norms are the
    # gradient's own; a layout tensor twice as long keeps the same norm per element
    torch.manual_seed(0)
    grad = torch.randn(sum(SIZES))
    layout = [("a.weight", 300), ("a.bias", 50), ("b.weight", 650)]
    cum, offset = {}, 0
    for name, size in layout:
        sq = grad[offset:offset + size].double().square()
        cum[name] = torch.cat([sq.new_zeros(1), sq.cumsum(0)])
        offset += size
    norms = {"layout": layout, "cum": cum}
    sizes, got = project.fragment_norms(norms, [n for n, _ in layout], SIZES, 3)
    offsets = planning.fragment_offsets(SIZES, 3).tolist()
    want = [float(grad[lo:hi].norm()) for lo, hi in zip(offsets[:-1], offsets[1:])]
    assert sizes.tolist() == planning.fragment_sizes(SIZES, 3)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    _, doubled = project.fragment_norms(norms, ["a.weight"], [600], 1)
    assert float(doubled[0]) == pytest.approx(float(grad[:300].norm()) * 2 ** 0.5, rel=1e-5)
    # a deeper stack of numbered blocks reads the measured block at the same relative depth
    assert project.source_names(["wte", "h.0.w", "h.3.w", "h.7.w"], ["wte", "h.0.w", "h.1.w"]) == \
        ["wte", "h.0.w", "h.0.w", "h.1.w"]
    with pytest.raises(ValueError, match="no measured tensor"):
        project.source_names(["fc.weight"], ["wte"])


def _fake_profile(name: str, union: int, max_count: int) -> dict:
    """A profile with one simulated n (3) of ``name`` on SIZES, widths as the driver sends them."""
    rec, options = _record(name)
    return {"numel": sum(SIZES), "sizes": SIZES, "threshold": None,
            "templates": {name: project.check_rules(rec, SIZES, 0.05, options)},
            "records": {name: {"3": {"union": union, "max_count": max_count, "mean_count": max_count,
                                     "other_ms": 0.0}}}}


@pytest.mark.parametrize("index_bytes", [None, 4, 8])
def test_index_bytes_in_the_wire(index_bytes):
    # Top-k at n = 3 on 3 tensors, union 60, the largest proposal 25: header row of 2 + 3 int64 per
    # rank = 40 bytes; indices 25 x 4 (int32, what the driver sends below 2^31 elements) or 25 x 8;
    # values (60 + a status slot per rank) x 4 bytes
    profile = _fake_profile("topk", union=60, max_count=25)
    (seq,), _ = project._bucket_sequences("topk", 3, profile, SIZES, [[2, 1, 0]], None, 0.05, None,
                                          project.index_bytes_of(sum(SIZES), index_bytes))
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
    (["--preset", "eth25", "--bus-efficiency", "1.2"], "--bus-efficiency"),
    (["--preset", "eth25", "--bus-efficiency", "4:0.5", "2:0.9"], "--bus-efficiency"),
    (["--preset", "eth25", "--without", "gravity"], "--without"),
    (["--preset", "eth25", "--deft-plan", "someday"], "--deft-plan"),
    (["--preset", "eth25", "--buckets", "3", "--bucket-mb", "10"], "--bucket-mb"),
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


VERDICT = re.compile(r'^on \S+ at \d+ workers DEFT \(plan="(ahead|leader)"\) is (as fast as|\d+% (slower|faster) than) '
                     r'all-reduce \([\d.]+ ms per step against [\d.]+ ms\); (it pays below [\d.e+]+ Gb/s per worker '
                     r'\(line rate\)|it pays at every line rate up to [\d,]+ Gb/s|it does not pay at any line rate down '
                     r'to [\d.]+ Gb/s)$')


def _argv(tmp_path, *extra):
    return ["project", "--model", f"{__name__}:tiny", "--sparsifiers", "deft", "topk", "--workers", "2", "4", "64",
            "1024", "--bandwidth", "0.01", "100", "--latency", "5", "--sim-workers", "1", "2", "4",
            "--distinct-gradients", "4", "--sim-steps", "1", "--sim-warmup", "1", "--compute-ms", "50",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path), "--no-plot", *extra]


def test_projection_end_to_end(tmp_path, capsys):
    model = f"{__name__}:tiny"
    worker_count.main(["--model", model, "--workers", "1", "2", "4", "--sparsifiers", "deft", "topk",
                       "--distinct-gradients", "4", "--repeats", "1", "--out", str(tmp_path), "--no-plot",
                       "--no-progress"])
    selection = tmp_path / worker_count.output_stem(model, "cpu")
    argv = _argv(tmp_path, "--selection-json", f"{selection}.json")
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / f"{project.output_stem(model, None)}.json").read_text())
    points = {(p["network"], p["workers"], p["method"]): p for p in doc["points"]}
    assert {m for *_, m in points} == {"allreduce", "powersgd", "deft-ahead", "deft-leader", "topk"}
    for p in doc["points"]:
        assert p["step_ms"] == pytest.approx(p["compute_ms"] + p["selection_ms"] + p["exposed_ms"])
        assert p["exposed_ms"] >= p["tail_ms"] - 1e-9  # the last bucket is never hidden
        if p["method"] == "allreduce":
            assert p["speedup"] == 1.0 and p["selection_ms"] == 0
    slow, fast = (points[(net, 1024, "allreduce")] for net in ("0.01Gb/s,+5us", "100Gb/s,+5us"))
    assert slow["exchange_ms"] > fast["exchange_ms"]
    # the all-reduce sends 4 N bytes; DEFT's plan-ahead step two collectives, the leader's four
    numel = doc["config"]["numel"]
    assert points[("100Gb/s,+5us", 64, "allreduce")]["bytes"] == {"gradients": 4 * numel}
    ahead, leader = (points[("100Gb/s,+5us", 64, m)] for m in ("deft-ahead", "deft-leader"))
    assert set(ahead["bytes"]) == {"indices", "values"} and set(leader["bytes"]) == {"header", "plan", "indices", "values"}
    assert doc["config"]["overlap"] == {"allreduce": 1.0, "powersgd": 1.0, "deft-ahead": 1.0, "deft-leader": 0.0,
                                        "topk": 0.0}
    assert {b["verdict"] for b in doc["break_even"]} <= {project.CROSSES, project.ALWAYS, project.NEVER}
    for b in doc["break_even"]:
        if b["verdict"] == project.CROSSES:
            assert b["break_even_gbps"] > 0
    # a verdict in words for every network, n and DEFT protocol, in the printed table too
    assert len(doc["verdicts"]) == 2 * 4 * 2
    for v in doc["verdicts"]:
        assert VERDICT.match(v["text"]), v["text"]
    out = capsys.readouterr().out
    assert doc["verdicts"][0]["text"] in out and "assumptions" in out and "compute: 50.0 ms per step, given" in out
    assert doc["config"]["index_bytes"] == 4  # int32, as the driver sends
    # the profile is cached: a second run measures nothing and is fast; with int64 indices and a
    # fixed cost per collective, DEFT's index bytes double and its exchange grows by the overheads
    assert cli.main(argv + ["--index-bytes", "8", "--collective-overhead", "1.5"]) == 0
    doc8 = json.loads((tmp_path / f"{project.output_stem(model, None)}.json").read_text())
    by8 = {(p["network"], p["workers"], p["method"]): p for p in doc8["points"]}
    buckets = doc8["config"]["buckets"]
    for method, calls in (("deft-ahead", 2), ("deft-leader", 4)):
        old, new = points[("100Gb/s,+5us", 64, method)], by8[("100Gb/s,+5us", 64, method)]
        assert new["bytes"]["indices"] == 2 * old["bytes"]["indices"]
        assert new["bytes"]["values"] == old["bytes"]["values"]
        assert new["exchange_ms"] - old["exchange_ms"] >= calls * 1.5 * buckets  # 1.5 ms a call (+ wider indices)
    assert doc8["config"]["collective_overhead_ms"] == 1.5
    assert len(list((tmp_path / "cache").glob("profile_*.json"))) == 1
    assert math.isfinite(doc["config"]["compute_ms"])


def test_missing_selection_measured_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    # run where no bench/results/worker_count_*.json exists: it measures the selection times itself
    # (cached), prints DEFT's rows and a verdict, and says what it cached and how to clear it
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert cli.main(_argv(tmp_path, "--workers", "4", "64")) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  deft-ahead +\d", out, re.M) and re.search(r"^  deft-leader +\d", out, re.M)
    assert any(VERDICT.match(line.strip()) for line in out.splitlines())
    cached = list((tmp_path / "cache" / "selection").glob("worker_count_*.json"))
    assert len(cached) == 1 and f"selection: measured here now ({cached[0]}" in out
    assert "cache: " in out and f"rm -r {tmp_path / 'cache'}" in out and "the model's real gradients" in out
    # a second run takes the cached measurement
    assert cli.main(_argv(tmp_path, "--workers", "4")) == 0
    assert "selection: measured here before" in capsys.readouterr().out


def test_missing_selection_with_no_measure_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(tmp_path, "--no-measure"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deft-bench project: error: no selection times") and len(err.splitlines()) == 1
    assert f"deft-bench --model {__name__}:tiny --workers 1 2 4" in err and "--selection-json" in err
    assert not (tmp_path / "cache").exists()  # stopped before measuring anything
    # free selection needs no measurement
    assert cli.main(_argv(tmp_path, "--no-measure", "--selection-scale", "0", "--workers", "4")) == 0
    assert "selection: free" in capsys.readouterr().out
