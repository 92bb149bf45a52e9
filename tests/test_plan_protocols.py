"""DEFT's two plan protocols (docs/algorithm.md, "The plan one step ahead"; docs/exchange.md):

- ``plan="leader"``, the paper's protocol, selects exactly what the step selected before the plan one
  step ahead was added: held to golden cases recorded at commit 2b5df5b (tests/data/leader_cases.pt,
  written by tests/data/record_leader_cases.py);
- ``plan="ahead"`` issues two collectives per step after its first, reads nothing of the device on
  the host inside a step (run on ``meta`` tensors, which hold no data, so any such read raises; today's
  step fails there), keeps DEFT's guarantees (exact density, disjoint bins, conservation bit for bit),
  surfaces a rank's failure one step late on every rank alike, and resumes bit for bit from a
  checkpoint (the carried norms are part of the state).
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from deft_kernels import driver, planning, reference
from deft_kernels.driver import AllGather, GatherProposals, run_lockstep, step_program
from deft_kernels.sparsifiers import build

DATA = Path(__file__).parent / "data"

import sys  # noqa: E402

sys.path.insert(0, str(DATA))
import record_leader_cases as recorded  # noqa: E402
from programs import watch  # noqa: E402


# ---- the paper's protocol selects what it selected before ----


GOLDEN = torch.load(DATA / "leader_cases.pt", weights_only=False)


@pytest.mark.parametrize("key", sorted(GOLDEN["recorded"]))
def test_leader_protocol_selects_exactly_what_the_step_selected_before(key):
    name, rotation = key.split("/rot")
    case = next(c for c in GOLDEN["cases"] if c[0] == name)
    expect = GOLDEN["recorded"][key]
    got = recorded.run_case(case, lambda d: build("deft", d, plan="leader"), int(rotation))
    assert len(got) == len(expect)
    for step, (g, e) in enumerate(zip(got, expect)):
        where = f"{key} step {step}"
        assert torch.equal(g["k"], e["k"]), where
        assert len(g["bins"]) == len(e["bins"]) and all(torch.equal(a, b) for a, b in zip(g["bins"], e["bins"])), where
        assert torch.equal(g["common"], e["common"]), where
        for r in range(len(e["selected"])):
            assert torch.equal(g["selected"][r], e["selected"][r]), (where, r)
            assert torch.equal(g["sent"][r], e["sent"][r]), (where, r)
            assert torch.equal(g["values"][r], e["values"][r]), (where, r)
            assert g["residual"][r] == e["residual"][r], (where, r)


def test_the_default_plan_is_one_step_ahead():
    assert build("deft", 0.01).plan_protocol == "ahead"
    with pytest.raises(ValueError, match="plan must be one of"):
        build("deft", 0.01, plan="lead")


# ---- the plan one step ahead ----

SIZES = [300, 40, 500, 7, 1, 2048]


def _grad(rank: int, step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(7919 * rank + step)).to(dtype)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_two_collectives_per_step_and_no_host_read_after_the_first(n):
    ranks = [build("deft", 0.05) for _ in range(n)]
    for step in range(4):
        logs = [[] for _ in range(n)]
        run_lockstep([watch(step_program(sp, _grad(r, step), sizes=SIZES, rank=r, world_size=n), logs[r], padded=True)
                      for r, sp in enumerate(ranks)])
        for log in logs:
            kinds = [e[0] for e in log if e[0] != "reads"]
            reads = sum(e[1] for e in log if e[0] == "reads")
            if step == 0:  # the setup, the current norms summed (no previous step to carry them)
                assert kinds == ["AllGather", "AllReduce", "GatherProposals", "AllReduce"], kinds
                assert reads == 2  # the setup's agreement and the summed norms
            else:
                assert kinds == ["GatherProposals", "AllReduce"], (step, kinds)
                assert reads == 0, (step, reads)
            assert [e[1] for e in log if e[0] == "AllReduce"] == [torch.float32] * (1 + (step == 0))
            assert [e[1] for e in log if e[0] == "GatherProposals"] == [torch.int32]


def test_the_wire_description_is_what_the_step_sends():
    n = 3
    ranks = [build("deft", 0.05) for _ in range(n)]
    for step in range(3):
        logs = [[] for _ in range(n)]
        results = run_lockstep([watch(step_program(sp, _grad(r, step), sizes=SIZES, rank=r, world_size=n), logs[r], padded=True)
                                for r, sp in enumerate(ranks)])
        sp = ranks[0]
        counts = [r.selected.numel() for r in results]
        described = driver.wire(driver.shape_of(sp), world_size=n, numel=sum(SIZES), tensors=len(SIZES),
                                fragments=sp.offsets.numel() - 1, union_size=results[0].sent.numel(),
                                max_count=max(counts), first=step == 0)
        sent = [(e[0], e[1], math.prod(e[2])) for e in logs[0] if e[0] != "reads"]
        assert [(w.request, w.dtype, w.elements) for w in described] == sent, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_exact_density_disjoint_bins_and_conservation(n, dtype):
    density = 0.05
    ranks = [build("deft", density) for _ in range(n)]
    for step in range(5):
        results = driver.simulate_step(ranks, [_grad(r, step, dtype) for r in range(n)], sizes=SIZES,
                                       keep_accumulated=True)
        plan = results[0].plan
        k_total = planning.budget(density, sum(SIZES))
        fragments = ranks[0].offsets.numel() - 1
        assert k_total <= results[0].sent.numel() <= k_total + fragments - 1
        assert results[0].sent.numel() == plan.sent_count
        assert results[0].sent.unique().numel() == results[0].sent.numel()  # no duplicates: disjoint bins
        assert sum(r.selected.numel() for r in results) + plan.common_indices().numel() == plan.sent_count
        for r, (sp, res) in enumerate(zip(ranks, results)):
            assert all(torch.equal(res.sent, other.sent) for other in results)
            assert all(torch.equal(res.plan.k, other.plan.k) for other in results)  # every rank made the same plan
            kept = torch.ones(sum(SIZES), dtype=torch.bool)
            kept[res.sent] = False
            assert torch.equal(sp.residual, torch.where(kept, res.accumulated.to(sp.residual.dtype), 0)), (step, r)


def test_the_plan_is_made_from_the_previous_steps_summed_norms():
    n = 3
    ranks = [build("deft", 0.05) for _ in range(n)]
    results = driver.simulate_step(ranks, [_grad(r, 0) for r in range(n)], sizes=SIZES, keep_accumulated=True)
    offsets = ranks[0].offsets
    summed = sum(reference.accumulate_norms(torch.zeros_like(res.accumulated), res.accumulated.clone(), offsets)
                 for res in results)
    nxt = driver.simulate_step(ranks, [_grad(r, 1) for r in range(n)], sizes=SIZES)
    torch.testing.assert_close(ranks[0].carried_norms, summed, rtol=1e-6, atol=1e-6)
    expect = planning.make_plan(ranks[0].carried_norms, offsets.diff(), planning.budget(0.05, sum(SIZES)), n, "size")
    assert torch.equal(nxt[0].plan.k, expect.k)
    assert all(torch.equal(a, b) for a, b in zip(nxt[0].plan.bins, expect.bins))


# ---- sync-free: no host read of device data inside a step ----


class _MetaCollectives:
    """A fake process group for steps on ``meta`` tensors: records every collective and answers with
    meta tensors of the right shapes (no data: nothing can be read from them)."""

    def __init__(self, n: int) -> None:
        self.n, self.issued = n, []

    def answer(self, request):
        self.issued.append(type(request).__name__)
        if isinstance(request, GatherProposals):
            return [request.mine.new_empty(c) for c in request.counts]
        if isinstance(request, AllGather):
            return [torch.empty_like(request.tensor) for _ in range(self.n)]
        return request.tensor  # an all-reduce's sum, a broadcast's tensor: same shape


def _run_recorded(program, comm: _MetaCollectives):
    value = None
    while True:
        try:
            request = program.send(value)
        except StopIteration as stop:
            return stop.value
        value = comm.answer(request)


def _on_meta(sp, rank: int, n: int, real_steps: int = 1):
    """``sp`` after ``real_steps`` real (CPU) steps of a simulated world, moved to the meta device."""
    ranks = [build("deft", 0.05, plan=sp.plan_protocol) for _ in range(n)]
    ranks[rank] = sp
    for step in range(real_steps):
        driver.simulate_step(ranks, [_grad(r, step) for r in range(n)], sizes=SIZES)
    driver.settle(sp)
    sp.to("meta")
    return sp


def test_a_step_ahead_runs_on_meta_tensors_with_two_collectives():
    """Meta tensors hold no data: ``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero`` and every other
    read of device data raise on them. The step one step ahead runs to its end there."""
    n, rank = 4, 1
    sp = _on_meta(build("deft", 0.05), rank, n)
    comm = _MetaCollectives(n)
    grad = torch.empty(sum(SIZES), device="meta")
    result = _run_recorded(step_program(sp, grad, sizes=SIZES, rank=rank, world_size=n, out=grad), comm)
    assert comm.issued == ["GatherProposals", "AllReduce"]
    assert result.out is grad and result.sent.device.type == "meta"
    assert result.stats.sent == result.plan.sent_count  # every count is host knowledge
    assert isinstance(sp.pending.tail, driver.program.Later)  # the tail waits to be read one step later


def test_the_leader_protocol_reads_device_data_and_fails_on_meta_tensors():
    """The same run with the paper's protocol (today's step): it reads the header, the plan and the
    status block on the host, which meta tensors cannot give."""
    n, rank = 4, 1
    sp = _on_meta(build("deft", 0.05, plan="leader"), rank, n)
    grad = torch.empty(sum(SIZES), device="meta")
    with pytest.raises((NotImplementedError, RuntimeError), match="(?i)meta"):
        _run_recorded(step_program(sp, grad, sizes=SIZES, rank=rank, world_size=n), _MetaCollectives(n))


# ---- failures surface one step late, on every rank alike ----


class _Boom(RuntimeError):
    """The stand-in for an out-of-memory error or a failed launch on one rank."""


def _raising(*args, **kwargs):
    raise _Boom("out of memory (injected)")


FAULTS = {
    "select": (lambda sp: setattr(sp, "select", _raising), "its selection raised"),
    "pack": (lambda sp: setattr(sp, "kernels", types.SimpleNamespace(**{**vars(sp.kernels), "sparse_pack": _raising})),
             "packing its values raised"),
    "accumulate": (lambda sp: setattr(sp, "kernels", types.SimpleNamespace(**{**vars(sp.kernels),
                                                                             "accumulate_norms": _raising})),
                   "the error-feedback accumulation raised"),
}


@pytest.mark.parametrize("where", sorted(FAULTS))
def test_a_failure_surfaces_at_the_next_step_on_every_rank(where):
    n, bad = 3, 1
    ranks = [build("deft", 0.05) for _ in range(n)]
    driver.simulate_step(ranks, [_grad(r, 0) for r in range(n)], sizes=SIZES)
    residuals = [sp.residual.clone() for sp in ranks]
    inject, words = FAULTS[where]
    inject(ranks[bad])
    results = driver.simulate_step(ranks, [_grad(r, 1) for r in range(n)], sizes=SIZES, keep_accumulated=True)
    # the step ran to its end on every rank, in step: the average lacks the failed rank's values
    assert all(torch.equal(res.sent, results[0].sent) for res in results)
    for r, (sp, res) in enumerate(zip(ranks, results)):
        if r == bad:  # nothing of its own was sent: it keeps its whole gradient (or, accumulate failed: as before)
            expect = residuals[r] if where == "accumulate" else residuals[r] + _grad(r, 1)
            assert torch.equal(sp.residual, expect)
        else:
            kept = torch.ones(sum(SIZES), dtype=torch.bool)
            kept[res.sent] = False
            assert torch.equal(sp.residual, torch.where(kept, res.accumulated, 0))
    for sp in ranks:
        sp.__dict__.pop("select", None), sp.__dict__.pop("kernels", None)
    errors = []
    for r, sp in enumerate(ranks):  # the next step reads the status first: every rank raises there
        with pytest.raises(Exception) as caught:
            driver.settle(sp)
        errors.append(caught.value)
    for r, e in enumerate(errors):
        if r == bad:
            assert isinstance(e, _Boom), e
        else:
            assert isinstance(e, ValueError) and str(e).startswith(f"another rank stopped at step 1 (rank {bad}: ")
            assert words in str(e), e


def test_a_rejected_input_surfaces_at_the_next_step_on_every_rank():
    n, bad = 3, 2
    ranks = [build("deft", 0.05) for _ in range(n)]
    driver.simulate_step(ranks, [_grad(r, 0) for r in range(n)], sizes=SIZES)
    run_lockstep([step_program(sp, _grad(r, 1).half() if r == bad else _grad(r, 1), sizes=SIZES, rank=r,
                               world_size=n) for r, sp in enumerate(ranks)])  # in step to the end
    for r, sp in enumerate(ranks):  # the next step (or settle) raises on every rank
        words = "earlier steps were torch.float32" if r == bad else "rank 2: grad dtype or device changed"
        with pytest.raises((TypeError, ValueError), match=words):
            driver.settle(sp)


# ---- state: checkpoints and the NaN policy ----


def test_resume_from_a_state_dict_is_bit_exact():
    n = 3
    ranks = [build("deft", 0.05) for _ in range(n)]
    for step in range(3):
        driver.simulate_step(ranks, [_grad(r, step) for r in range(n)], sizes=SIZES)
    for sp in ranks:
        driver.settle(sp)
    saved = [sp.state_dict() for sp in ranks]
    assert all(s["carried_norms"] is not None for s in saved)
    resumed = [build("deft", 0.05) for _ in range(n)]
    for sp, s in zip(resumed, saved):
        sp.load_state_dict(s)
    for step in range(3, 6):
        a = driver.simulate_step(ranks, [_grad(r, step) for r in range(n)], sizes=SIZES)
        b = driver.simulate_step(resumed, [_grad(r, step) for r in range(n)], sizes=SIZES)
        for x, y in zip(a, b):
            assert torch.equal(x.out, y.out) and torch.equal(x.sent, y.sent)
    assert all(torch.equal(x.residual, y.residual) for x, y in zip(ranks, resumed))


def test_state_dict_reads_the_latest_step_first():
    sp = build("deft", 0.05)
    driver.simulate_step([sp], [_grad(0, 0)], sizes=SIZES)
    assert sp.pending is not None and sp.carried_norms is None
    assert sp.state_dict()["carried_norms"].shape == (sp.offsets.numel() - 1,)
    assert sp.pending is None


def test_a_non_finite_value_reaches_the_output_at_once_or_one_step_later():
    """The NaN policy, one step late where it must be: a NaN is the largest magnitude, so a fragment's
    top-k takes it at once; where a fragment holds more non-finite values than its k, the rest reach
    the output at the next step, whose plan (from the summed norms, now NaN there) sends it whole."""
    n = 2
    ranks = [build("deft", 0.02) for _ in range(n)]
    driver.simulate_step(ranks, [_grad(r, 0) for r in range(n)], sizes=SIZES)
    grads = [_grad(r, 1) for r in range(n)]
    grads[0][1000:1040] = math.nan  # 40 NaNs in the 2048-element tensor's first fragments
    first = driver.simulate_step(ranks, grads, sizes=SIZES)
    assert bool(first[0].out.isnan().any())
    left = int(ranks[0].residual.isnan().sum())
    assert left > 0  # more NaNs than k in that fragment
    second = driver.simulate_step(ranks, [_grad(r, 2) for r in range(n)], sizes=SIZES)
    assert int(second[0].out.isnan().sum()) >= left and not bool(ranks[0].residual.isnan().any())


@pytest.mark.parametrize("options", [({"plan": "ahead"}, {"plan": "leader"}),
                                     ({"cost_model": "size"}, {"cost_model": "size_log_k"}),
                                     ({"residual_dtype": None}, {"residual_dtype": torch.float32})])
def test_ranks_configured_differently_refuse_to_run_together(options):
    """The setup agreement covers the sparsifier's options (before, only its name, density, sizes,
    dtype and rotation: ranks with another cost model or plan protocol ran together)."""
    ranks = [build("deft", 0.05, **kw) for kw in options]
    programs = [step_program(sp, _grad(r, 0).half(), sizes=SIZES, rank=r, world_size=2) for r, sp in enumerate(ranks)]
    with pytest.raises(ValueError, match="ranks disagree on the step's setup .*its options"):
        run_lockstep(programs)
