"""driver.step over real processes (gloo on 127.0.0.1, 2 and 4 ranks) against the single-process
simulation (deft_kernels.simulate, on the reference ops).

One spawn per world size runs every configuration for a few steps plus the bad-input checks; the
ranks write what they saw to files and the parent asserts. Every spawn has a hard timeout (a hung
collective kills the ranks and fails the test instead of hanging the suite).

Gradients are small integers (bf16 included), so every sum the step computes (norms, all-reduce,
error feedback) is exact in any order: real and simulated runs must agree bit for bit, whatever
order gloo sums in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest
import torch
import torch.distributed as dist

from deft_kernels import driver
from deft_kernels.simulate import simulate
from deft_kernels.sparsifiers import DEFT, SPARSIFIERS, TopK, build

from multiproc import gloo_rank, run

SEED = 1234
STEPS = 4
SIZES = [700, 5, 1200, 1, 300, 40, 900]
TINY = [1] * 60 + [10, 10]  # two selectable fragments only: with 4 workers, two DEFT bins are empty
# label: (registry name, density, constructor kwargs, sizes, dtype)
CONFIGS = {
    "dense": ("dense", 1.0, {}, SIZES, torch.float32),
    "topk": ("topk", 0.02, {}, SIZES, torch.float32),
    "cltk": ("cltk", 0.02, {}, SIZES, torch.float32),
    "threshold": ("threshold", 1.0, {"threshold": 24.0}, SIZES, torch.float32),
    "threshold-selects-nothing": ("threshold", 1.0, {"threshold": 1e9}, SIZES, torch.float32),
    "sidco": ("sidco", 0.02, {}, SIZES, torch.float32),
    "sidco-gamma": ("sidco", 0.02, {"first_stage": "gamma"}, SIZES, torch.float32),
    "sidco-gpareto": ("sidco", 0.02, {"first_stage": "gpareto"}, SIZES, torch.float32),
    "deft": ("deft", 0.02, {}, SIZES, torch.float32),
    "deft-size-cost": ("deft", 0.02, {"cost_model": "size"}, SIZES, torch.float32),
    "deft-bf16": ("deft", 0.02, {}, SIZES, torch.bfloat16),
    "deft-empty-bins": ("deft", 0.05, {}, TINY, torch.float32),
    "micro": ("micro", 0.02, {}, SIZES, torch.float32),
}
SPAWN_TIMEOUT_S = 120


def make_grad(rank: int, step: int, sizes, dtype) -> torch.Tensor:
    """The gradient of ``rank`` at ``step``: integers in [-16, 16], a few per tensor much larger."""
    gen = torch.Generator().manual_seed(SEED + 1000 * rank + step)
    g = torch.randint(-16, 17, (sum(sizes),), generator=gen).float()
    g[torch.randint(0, g.numel(), (g.numel() // 50,), generator=gen)] *= 4
    return g.to(dtype)


def digest(plan) -> str:
    """A hash of a plan's content (tensors by value)."""
    def flat(x):
        if isinstance(x, torch.Tensor):
            return ("tensor", str(x.dtype), x.tolist())
        if dataclasses.is_dataclass(x):
            return tuple((f.name, flat(getattr(x, f.name))) for f in dataclasses.fields(x))
        if isinstance(x, (list, tuple)):
            return tuple(flat(v) for v in x)
        return x
    return hashlib.sha256(repr(flat(plan)).encode()).hexdigest()


def recording(sparsifier):
    """The sparsifier, also recording what it saw in each step: the plan's digest, ``a`` and the
    global index set."""
    base = type(sparsifier)

    class Recording(base):
        def select(self, acc, norms, offsets, plan, rank, world_size, step):
            self.seen.append({"plan": digest(plan), "acc": acc.clone()})
            return super().select(acc, norms, offsets, plan, rank, world_size, step)

        def observe(self, plan, sent, numel, world_size):
            self.seen[-1]["sent"] = sent.clone()
            super().observe(plan, sent, numel, world_size)

    sparsifier.__class__ = Recording
    sparsifier.seen = []
    return sparsifier


def error_of(call) -> str:
    try:
        call()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def bad_input_checks(rank: int) -> dict:
    """Bad input on every rank at once (each raises its own error after the step's header exchange,
    see tests/test_exchange_faults.py for one bad rank among healthy ones), on one rank only at the
    first step (the setup agreement), and a world size that changed (raised before any collective:
    the call is on another group, alone)."""
    g = make_grad(rank, 0, SIZES, torch.float32)
    s = TopK(0.1)
    driver.step(s, g, sizes=SIZES)
    alone = dist.new_group([0])  # every rank must call new_group
    errors = {
        "layout": error_of(lambda: driver.step(s, g, sizes=SIZES[::-1])),
        "length": error_of(lambda: driver.step(s, torch.cat([g, g]))),
        "sizes-sum": error_of(lambda: driver.step(s, g, sizes=[1, 2])),
        "non-float": error_of(lambda: driver.step(s, g.to(torch.int32), sizes=SIZES)),
        "density-zero": error_of(lambda: DEFT(0.0)),
        "density-above-one": error_of(lambda: build("topk", 1.5)),
    }
    if rank == 0:
        errors["world-size"] = error_of(lambda: driver.step(s, g, sizes=SIZES, group=alone))
    dist.barrier()
    # Ranks that disagree at the first step: same length, tensors in another order on the last rank
    # (without the check DEFT would silently mix parameters), then different lengths. Every rank
    # must raise, and the instance must start afresh afterwards.
    world = dist.get_world_size()
    permuted = SIZES[::-1] if rank == world - 1 else SIZES
    fresh = DEFT(0.02)
    errors["layout-across-ranks"] = error_of(lambda: driver.step(fresh, g, sizes=permuted))
    errors["reset-after-disagreement"] = fresh.residual is None and fresh.step_count == 0
    longer = torch.cat([g, g[:7]]) if rank == 0 else g
    errors["length-across-ranks"] = error_of(lambda: driver.step(TopK(0.1), longer))
    errors["density-across-ranks"] = error_of(lambda: driver.step(TopK(0.1 if rank else 0.2), g, sizes=SIZES))
    odd = g.to(torch.int32) if rank == 0 else g  # rejected on rank 0 only: the others must not hang
    errors["non-float-on-one-rank"] = error_of(lambda: driver.step(TopK(0.1), odd, sizes=SIZES))
    driver.step(fresh, g, sizes=SIZES)  # agreeing ranks go on normally with the same instance
    errors["agreeing-after-reset"] = fresh.step_count == 1
    dist.barrier()
    return errors


@gloo_rank
def worker(rank: int, world_size: int, out_dir) -> dict:
    results = {}
    for label, (name, density, kwargs, sizes, dtype) in CONFIGS.items():
        s = recording(build(name, density, **kwargs))
        steps = []
        for t in range(STEPS):
            out, stats = driver.step(s, make_grad(rank, t, sizes, dtype), sizes=sizes)
            steps.append({"out": out, "residual": None if s.residual is None else s.residual.clone(),
                          "stats": dataclasses.asdict(stats)})
        digests = [None] * world_size
        dist.all_gather_object(digests, [seen["plan"] for seen in s.seen])
        results[label] = {"steps": steps, "seen": s.seen, "digests": digests,
                          "state": s.state_dict()}
    results["errors"] = bad_input_checks(rank)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"n{n}")
def world(request, tmp_path_factory):
    """(n, per-rank results, per-config simulations) for one spawn of n ranks."""
    n = request.param
    ranks = run(worker, n, tmp_path_factory.mktemp(f"ranks{n}"), timeout=SPAWN_TIMEOUT_S)
    sims = {label: simulate(name, density, [[make_grad(r, t, sizes, dtype) for t in range(STEPS)] for r in range(n)],
                            sizes=sizes, **kwargs)
            for label, (name, density, kwargs, sizes, dtype) in CONFIGS.items()}
    return n, ranks, sims


@pytest.mark.slow
@pytest.mark.parametrize("label", list(CONFIGS))
def test_every_rank_matches_the_simulation_exactly(world, label):
    n, ranks, sims = world
    for r, res in enumerate(ranks):
        for t, (real, sim) in enumerate(zip(res[label]["steps"], sims[label])):
            where = f"rank {r}, step {t}"
            assert torch.equal(real["out"], sim.outputs[r]), where
            assert real["out"].dtype == CONFIGS[label][4], where
            if sim.residuals[r] is None:
                assert real["residual"] is None, where
            else:
                assert torch.equal(real["residual"], sim.residuals[r]), where
            assert real["stats"]["sent"] == sim.sent.numel(), where
            assert real["stats"]["selected"] == sim.selected[r].numel(), where
            if label != "dense":
                assert torch.equal(res[label]["seen"][t]["sent"], sim.sent), where


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label in CONFIGS if label != "dense"])
def test_conservation_on_every_rank_and_step(world, label):
    n, ranks, _ = world
    for r, res in enumerate(ranks):
        for t, (real, seen) in enumerate(zip(res[label]["steps"], res[label]["seen"])):
            acc, sent = seen["acc"], seen["sent"]
            mask = torch.zeros_like(acc, dtype=torch.bool)
            mask[sent] = True
            assert torch.equal(acc, real["residual"] + torch.where(mask, acc, torch.zeros_like(acc))), (r, t)
            assert not bool(real["residual"][mask].any()), (r, t)  # the sent set is cleared
            assert not bool(real["out"][~mask].any()), (r, t)  # nothing is output outside it


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label in CONFIGS if label != "dense"])
def test_every_rank_used_the_same_plan_as_the_simulation(world, label):
    n, ranks, sims = world
    expect = [digest(sim.plan) for sim in sims[label]]
    for res in ranks:
        assert res[label]["digests"] == [expect] * n  # all-gathered on the ranks: each saw all the others


@pytest.mark.slow
@pytest.mark.parametrize("label", ["deft", "deft-size-cost", "deft-bf16", "deft-empty-bins"])
def test_deft_global_set_has_no_duplicates_and_is_the_owners_k(world, label):
    n, ranks, sims = world
    for t, sim in enumerate(sims[label]):
        plan = sim.plan
        proposals = torch.cat([*sim.selected, plan.common_indices()])
        assert proposals.numel() == proposals.unique().numel() == int(plan.k.sum())
        owners = sum(int(plan.k[b].sum()) for b in plan.bins)
        assert [res[label]["steps"][t]["stats"]["selected"] for res in ranks] == [s.numel() for s in sim.selected]
        assert sum(s.numel() for s in sim.selected) == owners
        for res in ranks:
            assert res[label]["steps"][t]["stats"]["sent"] == owners + plan.common_indices().numel()
    if label == "deft-empty-bins" and n == 4:
        assert any(res[label]["steps"][0]["stats"]["selected"] == 0 for res in ranks)


@pytest.mark.slow
def test_micro_thresholds_agree_across_ranks(world):
    n, ranks, _ = world
    states = [res["micro"]["state"]["extra"]["thresholds"] for res in ranks]
    assert len(states[0]) == n and all(s == states[0] for s in states)


@pytest.mark.slow
def test_nothing_selected_means_nothing_sent_and_no_hang(world):
    n, ranks, _ = world
    for res in ranks:
        for real in res["threshold-selects-nothing"]["steps"]:
            assert real["stats"]["sent"] == 0 and not bool(real["out"].any())


@pytest.mark.slow
def test_bad_input_raises_on_every_rank_with_a_clear_message(world):
    n, ranks, _ = world
    expect = {
        "layout": "layout \\(sizes\\) changed between steps",
        "length": "grad length changed between steps",
        "sizes-sum": "sizes must be non-negative and sum to grad.numel",
        "non-float": "grad must be a float tensor",
        "density-zero": "density must lie in \\(0, 1\\]",
        "density-above-one": "density must lie in \\(0, 1\\]",
    }
    for r, res in enumerate(ranks):
        for key, pattern in expect.items():
            assert re.search(pattern, res["errors"][key]), (r, key, res["errors"][key])
    assert re.search(f"world size changed between steps \\({n} -> 1\\)", ranks[0]["errors"]["world-size"])
    lengths = str([sum(SIZES) + 7] + [sum(SIZES)] * (n - 1))
    for r, res in enumerate(ranks):
        errors = res["errors"]
        for key in ("layout-across-ranks", "length-across-ranks", "density-across-ranks"):
            assert errors[key].startswith("ValueError: ranks disagree on the step's setup"), (r, key, errors[key])
        assert f"grad lengths per rank {lengths}" in errors["length-across-ranks"], (r, errors["length-across-ranks"])
        expect_one = "TypeError: grad must be a float tensor" if r == 0 else "ValueError: rank(s) [0] rejected their input"
        assert errors["non-float-on-one-rank"].startswith(expect_one), (r, errors["non-float-on-one-rank"])
        assert errors["reset-after-disagreement"] is True and errors["agreeing-after-reset"] is True, r


def test_every_registered_sparsifier_is_covered():
    """A sparsifier registered later (another branch) must get a configuration here, or this fails."""
    assert set(SPARSIFIERS) <= {name for name, *_ in CONFIGS.values()}, sorted(set(SPARSIFIERS) - {
        name for name, *_ in CONFIGS.values()})


@pytest.mark.slow
def test_top_k_union_grows_with_n_and_deft_does_not(world):
    n, ranks, _ = world
    k = int(0.02 * sum(SIZES))
    for t in range(STEPS):
        topk_sent = ranks[0]["topk"]["steps"][t]["stats"]["sent"]
        deft_sent = ranks[0]["deft"]["steps"][t]["stats"]["sent"]
        cltk_sent = ranks[0]["cltk"]["steps"][t]["stats"]["sent"]
        # Independent workers overlap little: the union is close to n * k; DEFT and CLT-k stay at k
        # (DEFT: plus what the clamp to at least one element per fragment adds).
        assert topk_sent >= 0.8 * n * k
        assert cltk_sent == k and k <= deft_sent <= k + len(SIZES) * n
