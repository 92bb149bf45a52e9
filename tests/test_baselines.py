"""The baselines (CLT-k, hard threshold, SIDCo, MiCRO) against direct torch computations, on one
process: through step() (world size 1) and with n ranks simulated by calling plan/select."""

import math

import pytest
import torch

from deft_kernels.sparsifiers import CLTK, HardThreshold, MiCRO, SIDCo
from deft_kernels.sparsifiers.micro import partition_bounds
from deft_kernels.sparsifiers.sidco import sidco_threshold


def phases(s, acc, n, step):
    """Plan on the leader, then every rank's proposal and the always-sent part (no communication)."""
    offsets = s.fragment_offsets([acc.numel()], n)
    plan = s.plan(acc, None, offsets, n, step)
    return plan, [s.select(acc, None, offsets, plan, r, n, step) for r in range(n)], s.always_sent(plan, acc.device)


def test_cltk_leader_sends_exactly_its_top_k(seed):
    acc = torch.randn(2000, generator=torch.Generator().manual_seed(seed))
    plan, picks, fixed = phases(CLTK(0.01), acc, 4, step=1)
    assert all(p.numel() == 0 for p in picks)
    expect = torch.sort(torch.topk(acc.abs(), 20).indices).values
    assert torch.equal(fixed, expect) and plan.device.type == "cpu"


def test_cltk_step_on_one_worker_conserves(seed):
    g = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    s = CLTK(0.05)
    out, stats = s.step(g)
    assert stats.sent == 50 and torch.equal(out + s.residual, g)


def test_hard_threshold_selects_at_or_above_lambda_and_nan(seed):
    acc = torch.randn(3000, generator=torch.Generator().manual_seed(seed))
    acc[7] = float("nan")
    acc[8] = 1.5  # exactly lambda: selected
    _, picks, _ = phases(HardThreshold(0.01, threshold=1.5), acc, 2, 0)
    expect = torch.nonzero((acc.abs() >= 1.5) | acc.isnan()).flatten()
    assert all(torch.equal(p, expect) for p in picks)
    assert 7 in expect.tolist() and 8 in expect.tolist()


@pytest.mark.parametrize("dist_name", ["laplace", "normal"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_sidco_count_is_near_k(seed, dist_name, stages):
    gen = torch.Generator().manual_seed(seed)
    n = 200_000
    acc = torch.randn(n, generator=gen)
    if dist_name == "laplace":  # |a| exactly exponential: the fit is right at every stage
        acc = -torch.log(torch.rand(n, generator=gen)) * torch.sign(torch.randn(n, generator=gen))
    k = int(0.01 * n)
    count = (acc.abs() >= sidco_threshold(acc, 0.01, stages)).sum().item()
    if (dist_name, stages) == ("normal", 1):
        # Gaussian tails are lighter than the exponential fit: one stage puts the threshold far too
        # high (about 2% of k pass). This is why SIDCo fits the tail in stages.
        assert count < k / 10, (count, k)
        return
    # Exponential data: within 15% at any stage count; Gaussian: the staged tail fits come close.
    bound = {"laplace": 1.15, "normal": 2.0 if stages == 2 else 1.6}[dist_name]
    assert k / bound <= count <= k * bound, (count, k)


def test_sidco_workers_use_their_own_thresholds(seed):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.randn(10000, generator=gen)
    s = SIDCo(0.01)
    _, picks, fixed = phases(s, acc, 3, 0)
    eta = sidco_threshold(acc, 0.01, 2)
    assert fixed is None and all(torch.equal(p, torch.nonzero(acc.abs() >= eta).flatten()) for p in picks)


def test_micro_partitions_are_exclusive_rotate_and_cover(seed):
    acc = torch.randn(1003, generator=torch.Generator().manual_seed(seed))
    n = 4
    bounds = [partition_bounds(1003, n, p) for p in range(n)]
    assert bounds[0][0] == 0 and bounds[-1][1] == 1003
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    s = MiCRO(0.05)
    for step in range(n):
        plan, picks, _ = phases(s, acc, n, step)
        for r, p in enumerate(picks):
            lo, hi = bounds[(step + r) % n]
            assert torch.equal(p, torch.nonzero(acc[lo:hi].abs() >= plan).flatten() + lo)
        allidx = torch.cat(picks)
        assert allidx.unique().numel() == allidx.numel()


@pytest.mark.parametrize("power", [1, 3])  # Gaussian tails (steeper than exponential) and heavy ones
def test_micro_threshold_steers_the_count_toward_k(seed, power):
    gen = torch.Generator().manual_seed(seed)
    s = MiCRO(0.01)
    n, numel = 4, 100_000
    sent = []
    for step in range(30):  # a stationary stream, residual reset so the data stays comparable
        acc = torch.randn(numel, generator=gen) ** power
        plan, picks, _ = phases(s, acc, n, step)
        count = sum(p.numel() for p in picks)
        # Each worker sees 1/n of the vector; scaled to the whole vector, the count should reach k.
        s.observe(count * n, n)
        sent.append(count * n)
    k = int(0.01 * numel)
    if power == 3:
        assert abs(sent[0] - k) / k > 0.3  # the fitted first estimate is off on heavy tails...
    assert all(0.7 * k <= c <= 1.3 * k for c in sent[-5:]), sent  # ...and the steering converges


def test_micro_state_round_trip_keeps_the_threshold(seed):
    g = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
    s = MiCRO(0.01)
    s.step(g)
    t = MiCRO(0.01)
    t.load_state_dict(s.state_dict())
    assert t.threshold == s.threshold and math.isfinite(t.threshold)


@pytest.mark.parametrize("exc, match, call", [
    (TypeError, "threshold must be a number", lambda: HardThreshold(0.01)),
    (ValueError, "threshold must be finite and > 0", lambda: HardThreshold(0.01, threshold=-1.0)),
    (ValueError, "threshold must be finite and > 0", lambda: HardThreshold(0.01, threshold=float("inf"))),
    (ValueError, "stages must be a positive int", lambda: SIDCo(0.01, stages=0)),
    (ValueError, "gain must lie in", lambda: MiCRO(0.01, gain=0.0)),
    (ValueError, "density must lie in", lambda: CLTK(1.5)),
])
def test_bad_arguments_name_themselves(exc, match, call):
    with pytest.raises(exc, match=match):
        call()
