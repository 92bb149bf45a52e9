"""The step driver in one process: ranks simulated in lockstep (deft_kernels.driver.simulate_step /
run_lockstep), the asynchronous queue on fake collectives, and the contracts docs/exchange.md states:
the collectives of each sparsifier's step and their order, the plan as one tensor, the failure
protocol, unused tensors, the numeric rule and the count of host reads per step.

The same programs run over torch.distributed in tests/test_distributed.py, test_hook.py and
test_exchange_faults.py."""

from __future__ import annotations

import random
import threading
import time
import types

import pytest
import torch

from deft_kernels import driver, reference
from deft_kernels.driver import (AllGather, AllReduce, Broadcast, ExchangeQueue, run_lockstep,
                                 step_program)
from deft_kernels.sparsifiers import SPARSIFIERS, build
from deft_kernels.transfer import HOST_READS, to_host

from programs import watch

SIZES = [300, 40, 500, 7, 1]
#: Every step shape: the registered sparsifiers (DEFT with its default plan, one step ahead) and DEFT
#: with the paper's protocol.
VARIANTS = {**{name: (name, {}) for name in SPARSIFIERS}, "threshold": ("threshold", {"threshold": 0.5}),
            "deft_leader": ("deft", {"plan": "leader"})}


def _build(name: str, density: float = 0.05):
    registered, kwargs = VARIANTS[name]
    return build(registered, 1.0 if name == "dense" else density, **kwargs)


def _grad(rank: int, step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(1000 * rank + step)).to(dtype)


def _ranks(name: str, n: int, density: float = 0.05) -> list:
    return [_build(name, density) for _ in range(n)]


def _catching(program):
    """The program, returning the exception it raises instead of raising it."""
    try:
        return (yield from program)
    except Exception as e:  # noqa: BLE001
        return e


def _run(sparsifiers, grads, wrap=None, **kwargs):
    programs = [step_program(sp, g, sizes=SIZES, rank=r, world_size=len(grads), **kwargs)
                for r, (sp, g) in enumerate(zip(sparsifiers, grads))]
    return run_lockstep([p if wrap is None else wrap(r, p) for r, p in enumerate(programs)])


# ---- the shape of a step ----

#: The collectives of a step after the first, in order (the first step starts with one more
#: all-gather: the setup agreement; DEFT one step ahead then sums its first norms: FIRST). The value
#: all-reduce carries every rank's status block, so it runs even when nothing is sent.
COLLECTIVES = {
    "deft": ["GatherProposals", "AllReduce"],
    "deft_leader": ["AllGather", "Broadcast", "GatherProposals", "AllReduce"],
    "topk": ["AllGather", "GatherProposals", "AllReduce"],
    "threshold": ["AllGather", "GatherProposals", "AllReduce"],
    "sidco": ["AllGather", "GatherProposals", "AllReduce"],
    "micro": ["Broadcast", "AllGather", "GatherProposals", "AllReduce"],
    "cltk": ["Broadcast", "AllReduce"],
    "dense": ["AllReduce"],
}

FIRST = {"deft": ["AllReduce"]}

#: Host reads through transfer.to_host in a step after the first, on the leader and on the other
#: ranks: the header (or the plan), then the status block of the value all-reduce (the failure
#: protocol's last check). CLT-k and Dense read both in one. MiCRO's leader reads once more while a
#: partition's threshold is not yet positive, and every MiCRO rank reads the sent set in observe.
#: DEFT one step ahead reads nothing: its status block is read one step later (transfer.Later).
HOST_READS_PER_STEP = {"deft": (0, 0), "deft_leader": (2, 2), "topk": (2, 2), "threshold": (2, 2), "cltk": (1, 1),
                       "dense": (1, 1), "micro": (3, 4)}


def test_every_registered_sparsifier_has_its_collectives_listed():
    assert set(COLLECTIVES) == set(VARIANTS) and set(SPARSIFIERS) <= set(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("n", [1, 3])
def test_collectives_and_host_reads_per_step(name, n):
    ranks = _ranks(name, n)
    for step in range(3):
        logs = [[] for _ in range(n)]
        _run(ranks, [_grad(r, step) for r in range(n)], wrap=lambda r, p: watch(p, logs[r]))
        kinds = [[e[0] for e in log if e[0] != "reads"] for log in logs]
        reads = [sum(e[1] for e in log if e[0] == "reads") for log in logs]
        expect = (["AllGather", *FIRST.get(name, [])] if step == 0 else []) + COLLECTIVES[name]
        assert all(k == expect for k in kinds), (step, kinds)
        if step >= 1 and name in HOST_READS_PER_STEP:
            leader, other = HOST_READS_PER_STEP[name]
            assert reads == [leader if r == step % n else other for r in range(n)], (step, reads)
        if name == "deft_leader":  # the sync contract: two reads per rank, the first step one more (the setup)
            assert reads == [2 + (step == 0)] * n, (step, reads)
        if name == "deft":  # none after the first step; the first reads the setup and its summed norms
            assert reads == [2 * (step == 0)] * n, (step, reads)


def test_deft_plan_travels_as_one_int64_tensor_of_a_size_known_in_advance():
    n = 3
    ranks = _ranks("deft_leader", n)
    _run(ranks, [_grad(r, 0) for r in range(n)])
    logs = [[] for _ in range(n)]
    _run(ranks, [_grad(r, 1) for r in range(n)], wrap=lambda r, p: watch(p, logs[r]))
    fragments = ranks[0].offsets.numel() - 1
    for log in logs:
        (broadcast,) = [e for e in log if e[0] == "Broadcast"]
        assert broadcast == ("Broadcast", torch.int64, (3 * fragments + 1,))  # and the status slot
        (header,) = [e for e in log if e[0] == "AllGather"]
        assert header == ("AllGather", torch.int64, (2 + len(SIZES),))  # code, count, a flag per tensor


@pytest.mark.parametrize("name", ["deft_leader", "micro", "cltk"])
def test_plan_wire_round_trip(name):
    n = 4
    ranks = _ranks(name, n, density=0.2)
    sp = ranks[0]
    _run(ranks, [_grad(r, 0) for r in range(n)])
    acc = _grad(0, 5)
    plan = sp.plan(acc, reference.accumulate_norms(torch.zeros_like(acc), acc.clone(), sp.offsets), sp.offsets, n, 1)
    length, dtype = sp.plan_wire(acc.numel(), sp.offsets, n)
    wire = sp.encode_plan(plan)
    assert wire.shape == (length,) and wire.dtype == dtype
    back = sp.decode_plan(wire.clone(), sp.offsets, n)
    if name == "deft_leader":
        assert plan.common.numel() > 0  # the wire carries the common part too
        for field in ("sizes", "k", "common", "costs"):
            assert torch.equal(getattr(back, field), getattr(plan, field)), field
        assert all(torch.equal(a, b) for a, b in zip(back.bins, plan.bins)) and len(back.bins) == n
        assert sp.proposal_counts(back, n, 1) == [int(plan.k[plan.fragments_of(r, 1)].sum()) for r in range(n)]
    else:
        assert torch.equal(back, plan)


# ---- failure protocol ----

BAD = {
    "longer": lambda g, sizes: (torch.cat([g, g[:9]]), sizes[:-1] + [sizes[-1] + 9]),
    "fp16": lambda g, sizes: (g.half(), sizes),
    "2-D": lambda g, sizes: (g[None], sizes),
    "layout": lambda g, sizes: (g, sizes[::-1]),
}
WORDS = {"longer": "length", "fp16": "dtype", "2-D": "flat", "layout": "layout"}


#: The step shapes whose status is read within the step (DEFT one step ahead reads it one step
#: later: tests/test_plan_protocols.py holds its failure protocol).
AT_ONCE = sorted(set(VARIANTS) - {"deft"})


@pytest.mark.parametrize("name", AT_ONCE)
@pytest.mark.parametrize("how", sorted(BAD))
@pytest.mark.parametrize("bad_rank", [1, 2])  # at step 1 of 3 ranks: the leader, then not the leader
def test_one_rank_rejecting_its_input_stops_every_rank_at_the_same_point(name, how, bad_rank):
    n = 3
    ranks = _ranks(name, n)
    _run(ranks, [_grad(r, 0) for r in range(n)])
    residuals = [None if sp.residual is None else sp.residual.clone() for sp in ranks]
    programs = []
    for r, sp in enumerate(ranks):
        g, sizes = _grad(r, 1), list(SIZES)
        if r == bad_rank:
            g, sizes = BAD[how](g, sizes)
        programs.append(_catching(step_program(sp, g, sizes=sizes, rank=r, world_size=n)))
    errors = run_lockstep(programs)  # raises if the ranks fell out of step
    for r, e in enumerate(errors):
        assert isinstance(e, (TypeError, ValueError)), (r, e)
        if r != bad_rank:
            assert str(e).startswith(f"another rank stopped at step 1 (rank {bad_rank}: "), e
            assert WORDS[how] in str(e), e
    for r, sp in enumerate(ranks):
        assert sp.step_count == 1
        if r == bad_rank and residuals[r] is not None:
            assert torch.equal(sp.residual, residuals[r])  # the rank that rejected its input did nothing
        elif residuals[r] is not None:  # the others keep the step's gradient: nothing lost
            assert torch.equal(sp.residual, (residuals[r] + _grad(r, 1)))
    # Still in step: the next step with good input runs on every rank.
    _run(ranks, [_grad(r, 2) for r in range(n)])
    assert all(sp.step_count == 2 for sp in ranks)


class _Boom(RuntimeError):
    """The stand-in for an out-of-memory error or a failed launch on one rank."""


def _raising(*args, **kwargs):
    raise _Boom("out of memory (injected)")


#: Where a rank's own work can fail before a collective its peers wait on, and how it is injected
#: into that rank's sparsifier: the words the others' error must contain.
FAULTS = {
    "plan": (lambda sp: setattr(sp, "plan", _raising), "the leader's plan raised"),
    "select": (lambda sp: setattr(sp, "select", _raising), "its selection raised"),
    "pack": (lambda sp: setattr(sp, "kernels", types.SimpleNamespace(**{**vars(sp.kernels), "sparse_pack": _raising})),
             "packing its values raised"),
}
HAS_PLAN = {"deft_leader", "micro", "cltk"}


@pytest.mark.parametrize("name", sorted(set(AT_ONCE) - {"dense"}))
@pytest.mark.parametrize("where", sorted(FAULTS))
def test_a_failure_in_a_ranks_own_work_stops_every_rank_at_the_same_point(name, where):
    if where == "plan" and name not in HAS_PLAN:
        pytest.skip("no plan")
    n, bad_rank = 3, 1  # step 1: rank 1 leads
    ranks = _ranks(name, n)
    _run(ranks, [_grad(r, 0) for r in range(n)])
    residuals = [sp.residual.clone() for sp in ranks]
    inject, words = FAULTS[where]
    inject(ranks[bad_rank])
    errors = _run(ranks, [_grad(r, 1) for r in range(n)], wrap=lambda r, p: _catching(p))  # raises if out of step
    for r, e in enumerate(errors):
        if r == bad_rank:
            assert isinstance(e, _Boom), e
        else:
            assert isinstance(e, ValueError), e
            assert str(e).startswith(f"another rank stopped at step 1 (rank {bad_rank}: "), e
            assert words in str(e), e
    for r, sp in enumerate(ranks):
        assert sp.step_count == 1
        assert torch.equal(sp.residual, residuals[r] + _grad(r, 1))  # every rank keeps the step's gradient
    for sp in ranks:  # the fault is gone: still in step, the next step runs on every rank
        sp.__dict__.pop("plan", None), sp.__dict__.pop("select", None), sp.__dict__.pop("kernels", None)
    _run(ranks, [_grad(r, 2) for r in range(n)])
    assert all(sp.step_count == 2 for sp in ranks)


def test_rotation_spreads_the_leaders_of_one_iteration_over_the_ranks():
    """n buckets (sparsifiers with rotation 0..n-1), one step each: every rank plans exactly once."""
    n = 4
    leaders = []
    buckets = []
    for index in range(n):
        ranks = _ranks("deft_leader", n)
        for r, sp in enumerate(ranks):
            sp.rotation = index
            sp.plan = (lambda plan, r: lambda *a: (leaders.append(r), plan(*a))[1])(sp.plan, r)
        buckets.append(ranks)
    for step in range(2):
        leaders.clear()
        for ranks in buckets:
            _run(ranks, [_grad(r, step) for r in range(n)])
        assert sorted(leaders) == list(range(n)), (step, leaders)


def test_lockstep_refuses_ranks_that_fall_out_of_step():
    def asks(request):
        yield request

    def ends():
        return
        yield

    t = torch.zeros(2)
    with pytest.raises(RuntimeError, match="fell out of step"):
        run_lockstep([asks(AllReduce(t)), asks(AllGather(t))])
    with pytest.raises(RuntimeError, match="fell out of step"):
        run_lockstep([asks(AllReduce(t)), asks(AllReduce(torch.zeros(3)))])
    with pytest.raises(RuntimeError, match="ended while others went on"):
        run_lockstep([asks(AllReduce(t)), ends()])


# ---- unused tensors and the numeric rule ----


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - {"dense"}))
def test_tensors_no_rank_used_keep_their_residual_and_get_no_output(name):
    n = 3
    ranks = _ranks(name, n, density=0.3)
    bounds = [0]
    for s in SIZES:
        bounds.append(bounds[-1] + s)
    for step in range(3):
        # tensor 2 unused by every rank; tensor 0 unused on rank 1 only (then it counts as used)
        used = [torch.tensor([r != 1, True, False, True, True]) for r in range(n)]
        results = run_lockstep([
            step_program(sp, _grad(r, step), sizes=SIZES, rank=r, world_size=n, used=used[r], keep_accumulated=True)
            for r, sp in enumerate(ranks)])
        lo, hi = bounds[2], bounds[3]
        for r, (sp, res) in enumerate(zip(ranks, results)):
            assert torch.equal(sp.residual[lo:hi], res.accumulated[lo:hi]), (step, r)
            assert not bool(res.out[lo:hi].any()), (step, r)
            sent = torch.zeros_like(res.accumulated, dtype=torch.bool)
            sent[res.sent] = True
            sent[lo:hi] = False
            # everywhere else: sent or kept, as in any step
            assert torch.equal(res.accumulated, sp.residual + torch.where(sent, res.accumulated, 0)), (step, r)
    assert any(bool(sp.residual[bounds[2]:bounds[3]].any()) for sp in ranks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["dense", "topk", "deft", "deft_leader"])
def test_every_average_is_the_fp32_sum_divided_by_n_rounded_once(name, dtype):
    n = 3
    ranks = _ranks(name, n, density=0.2)
    grads = [(_grad(r, 0) * 2e4).clamp(-6e4, 6e4).to(dtype) for r in range(n)]
    results = driver.simulate_step(ranks, grads, sizes=SIZES, keep_accumulated=True)
    accs = grads if name == "dense" else [res.accumulated for res in results]
    total = torch.stack([a.float() for a in accs]).sum(0)
    assert float(total.abs().max()) > 65504  # some sums do not fit in fp16
    expect = (total / n).to(dtype)
    for res in results:
        assert res.out.dtype == dtype and bool(torch.isfinite(res.out).all())
        where = slice(None) if name == "dense" else res.sent
        assert torch.equal(res.out[where], expect[where]), name


# ---- the asynchronous queue ----


class _SlowCollectives:
    """Fake collectives: each request completes later, on a timer thread (as gloo's worker thread
    completes a real one). Records the order requests are issued in and that at most one is
    outstanding at a time."""

    def __init__(self) -> None:
        self.issued: list[tuple[int, int]] = []
        self.outstanding = 0
        self.most_outstanding = 0
        self.lock = threading.Lock()

    def start(self, request):
        fut = torch.futures.Future()
        with self.lock:
            self.issued.append(tuple(request.tensor.tolist()))
            self.outstanding += 1
            self.most_outstanding = max(self.most_outstanding, self.outstanding)

        def complete():
            with self.lock:
                self.outstanding -= 1
            fut.set_result(request.tensor * 10)

        threading.Timer(random.uniform(0.0, 0.01), complete).start()
        return fut


def _program(index: int, requests: int):
    total = 0
    for i in range(requests):
        total += int((yield AllReduce(torch.tensor([index, i])))[1])
    return index, total


def test_exchange_queue_runs_programs_one_at_a_time_in_submission_order():
    comm = _SlowCollectives()
    queue = ExchangeQueue(comm)
    futures = []
    for index in range(6):
        futures.append(queue.submit(_program(index, 3), torch.device("cpu")))
        time.sleep(random.uniform(0.0, 0.005))  # "backward" goes on between the buckets
    queue.wait_idle()
    assert [f.wait() for f in futures] == [(i, 30) for i in range(6)]
    assert comm.issued == [(i, r) for i in range(6) for r in range(3)]
    assert comm.most_outstanding == 1


def test_exchange_queue_stops_after_a_program_raises():
    comm = _SlowCollectives()
    queue = ExchangeQueue(comm)

    def failing():
        yield AllReduce(torch.tensor([7, 0]))
        raise ValueError("bad bucket")

    first = queue.submit(failing(), torch.device("cpu"))
    second = queue.submit(_program(8, 2), torch.device("cpu"))
    queue.wait_idle()
    third = queue.submit(_program(9, 1), torch.device("cpu"))
    with pytest.raises(ValueError, match="bad bucket"):
        first.wait()
    for later in (second, third):
        with pytest.raises(RuntimeError, match="earlier step in this exchange failed .*bad bucket"):
            later.wait()
    assert comm.issued == [(7, 0)]  # neither later program issued a collective


class _RecordingFuture:
    """A fake collective's future: records whether its result was taken with ``wait()`` (the stream
    rule: on NCCL only ``wait()`` orders the current stream after the collective) or ``value()``."""

    def __init__(self, result, done: bool) -> None:
        self.result, self._done, self.calls, self.callbacks = result, done, [], []

    def done(self) -> bool:
        return self._done

    def wait(self):
        self.calls.append("wait")
        return self.result

    def value(self):
        self.calls.append("value")
        return self.result

    def then(self, callback):
        self.callbacks.append(callback)

    def complete(self) -> None:
        self._done = True
        for callback in self.callbacks:
            callback(self)


@pytest.mark.parametrize("done", [True, False])  # done at once (NCCL: enqueued), or later (gloo's thread)
def test_exchange_queue_takes_every_result_with_wait(done):
    futures = []

    class Collectives:
        def start(self, request):
            futures.append(_RecordingFuture(request.tensor * 10, done))
            return futures[-1]

    queue = ExchangeQueue(Collectives())
    result = queue.submit(_program(3, 2), torch.device("cpu"))
    while not done and not result.done():
        futures[-1].complete()
    assert result.wait() == (3, 10)
    assert [f.calls for f in futures] == [["wait"], ["wait"]]


# ---- transfers ----


def test_to_host_counts_one_read_per_call_and_leaves_host_tensors_alone():
    a, b = torch.arange(3), torch.ones(2, dtype=torch.float16)
    before = HOST_READS.count
    out = to_host(a, b)
    assert HOST_READS.count == before + 1 and out[0] is a and out[1] is b


# ---- per-step work (issue 18) ----


def test_header_row_is_uploaded_in_one_piece(monkeypatch):
    from deft_kernels.driver import program

    uploads = []
    monkeypatch.setattr(program, "to_device", lambda t, device: (uploads.append(t), t)[1])
    row = program._header_row(3, 5, torch.tensor([True, False, True]), torch.device("cpu"))
    assert row.tolist() == [3, 5, 1, 0, 1] and len(uploads) == 1


def test_proposals_travel_as_int32_below_2_to_the_31_elements():
    n = 2
    ranks = _ranks("topk", n)
    _run(ranks, [_grad(r, 0) for r in range(n)])
    logs = [[] for _ in range(n)]
    results = _run(ranks, [_grad(r, 1) for r in range(n)], wrap=lambda r, p: watch(p, logs[r]))
    for log, res in zip(logs, results):
        (gather,) = [e for e in log if e[0] == "GatherProposals"]
        assert gather[1] == torch.int32
        assert res.sent.dtype == torch.int64 and res.stats.bytes_sent == 4 * res.stats.selected + 4 * res.stats.sent


@pytest.mark.parametrize("name", ["deft", "deft_leader", "topk", "cltk", "dense"])
def test_step_writes_its_output_into_the_given_buffer(name):
    sp = _build(name)
    step_program_run = lambda g, out: run_lockstep([step_program(sp, g, sizes=SIZES, out=out)])[0]
    step_program_run(_grad(0, 0), None)
    driver.settle(sp)
    buffer = _grad(0, 1)
    expect = _build(name)
    expect.load_state_dict(sp.state_dict())
    reference_out = run_lockstep([step_program(expect, _grad(0, 1), sizes=SIZES)])[0].out
    result = step_program_run(buffer, buffer)  # the DDP hook passes the bucket as grad and out
    assert result.out is buffer and torch.equal(buffer, reference_out)


@pytest.mark.parametrize("dtype, in_place", [(torch.float32, True), (torch.bfloat16, False)])
def test_warm_up_mean_all_reduces_fp32_in_place(dtype, in_place):
    tensors = [_grad(r, 0).to(dtype) for r in range(3)]
    expect = (torch.stack([t.float() for t in tensors]).sum(0) / 3).to(dtype)
    results = run_lockstep([driver.mean_program(t, rank=r, world_size=3, in_place=True)
                            for r, t in enumerate(tensors)])
    for t, res in zip(tensors, results):
        assert torch.equal(res.out, expect) and res.out is t  # 16-bit: through an fp32 copy, back into t
    allreduced = []

    def record(program):
        request = next(program)
        allreduced.append(request.tensor)
        try:
            program.send(request.tensor * 2)
        except StopIteration:
            pass

    t = tensors[0].clone()
    record(driver.mean_program(t, world_size=2, in_place=True))
    assert (allreduced[0] is t) == in_place


def test_unused_tensor_bounds_are_computed_once():
    from deft_kernels.sparsifiers.base import Layout

    layout = Layout(2, (3, 0, 5), torch.float32, torch.device("cpu"))
    assert layout.bounds == [0, 3, 3, 8] and layout.bounds is layout.bounds


def test_deft_decode_plan_makes_no_nonzero_call_per_bin(monkeypatch):
    n = 8
    ranks = _ranks("deft_leader", n, density=0.3)
    _run(ranks, [_grad(r, 0) for r in range(n)])
    sp = ranks[0]
    acc = _grad(0, 5)
    plan = sp.plan(acc, reference.accumulate_norms(torch.zeros_like(acc), acc.clone(), sp.offsets), sp.offsets, n, 1)
    calls = []
    real = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    back = sp.decode_plan(sp.encode_plan(plan), sp.offsets, n)
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(back.bins, plan.bins)) and torch.equal(back.common, plan.common)


def test_broadcast_names_its_source_without_group_src(monkeypatch):
    """``dist.broadcast(group_src=...)`` needs torch >= 2.6; pyproject allows 2.5, whose broadcast
    takes the global rank ``src``: the group rank is mapped to it."""
    from deft_kernels.driver import collectives

    calls = []

    class Work:
        def get_future(self):
            fut = torch.futures.Future()
            fut.set_result(None)
            return fut

    def broadcast_2_5(tensor, src, group=None, async_op=False):  # torch 2.5's signature
        calls.append((src, group))
        return Work()

    group = object()
    monkeypatch.setattr(collectives.dist, "broadcast", broadcast_2_5)
    monkeypatch.setattr(collectives.dist, "get_global_rank", lambda g, r: 10 + r)
    comm = object.__new__(collectives.TorchCollectives)
    comm.group, comm.rank, comm.world_size = group, 0, 2
    t = torch.zeros(3)
    assert comm.start(Broadcast(t, 1)).wait() is t
    assert calls == [(11, group)]
