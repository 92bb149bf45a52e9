"""The DDP hook in production setups (issue "Production on GPU clusters"; docs/exchange.md): DDP's
process group and settings, one state per model, bounded waits, and the sync-free bucket step.

- The hook over a bucket on ``meta`` tensors (no data: any host read raises), DEFT's default step:
  two collectives per bucket, nothing read; the paper's protocol fails there (it reads the header,
  the plan and the status block).
- The exchange runs on DDP's own process group: 4 gloo ranks, DDP on the data-parallel groups {0, 1}
  and {2, 3}, ``DeftState()`` at its defaults (before: the exchange spanned all 4 ranks and the two
  groups held the same gradient).
- A second DDP model on one state is refused while the first is alive; compiled DDP's per-parameter
  call is refused saying what to do.
- ``ExchangeQueue.wait_idle`` is bounded by the group's timeout; an exception in the callback path
  reaches the bucket's future.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook, driver
from deft_kernels.driver import AllGather, AllReduce, Broadcast, ExchangeQueue, GatherProposals
from deft_kernels.hook import run_bucket
from deft_kernels.transfer import HOST_READS

from multiproc import gloo_rank, run

SIZES = [(64, 20), (64,), (10, 64), (10,)]


class _Bucket:
    """A DDP bucket's methods over given tensors (``dist.GradBucket`` has no Python constructor)."""

    def __init__(self, index: int, params, grads, last: bool) -> None:
        self._index, self._params, self._last = index, params, last
        self._buffer = torch.cat([g.reshape(-1) for g in grads])

    def index(self):
        return self._index

    def buffer(self):
        return self._buffer

    def gradients(self):
        return list(self._buffer.split([p.numel() for p in self._params]))

    def parameters(self):
        return self._params

    def is_last(self):
        return self._last


class _OneRank:
    """Collectives of a world of one, answered at once (any device): recorded per request."""

    group, rank, world_size = None, 0, 1

    def __init__(self) -> None:
        self.issued: list[str] = []

    def start(self, request):
        self.issued.append(type(request).__name__)
        if isinstance(request, GatherProposals):
            value = [request.mine[:c] for c in request.counts]
        elif isinstance(request, AllGather):
            value = [request.tensor]
        else:
            value = request.tensor
        fut = torch.futures.Future()
        fut.set_result(value)
        return fut


def _iterate(state, params, device: str, index_order=(0, 1)) -> list:
    """One DDP iteration of two buckets (parameters 0-1 and 2-3) through the hook's engine."""
    gen = torch.Generator().manual_seed(state.iter)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    buckets = [_Bucket(0, params[:2], grads[:2], False), _Bucket(1, params[2:], grads[2:], True)]
    futures = [run_bucket(state, buckets[i]) for i in index_order]  # as DDP: every bucket, then the waits
    return [f.wait() for f in futures]


@pytest.mark.parametrize("plan", ["ahead", "leader"])
def test_the_hooks_bucket_step_reads_nothing_on_the_host_one_step_ahead(plan):
    params = [nn.Parameter(torch.zeros(s)) for s in SIZES]
    state = DeftState(density=0.05, warmup_steps=1, find_unused_parameters=False, process_group=None, plan=plan)
    comm = _OneRank()
    with pytest.warns(UserWarning, match="could not find"):
        engine = state._engine_for(_Bucket(0, params[:2], [torch.zeros(s) for s in SIZES[:2]], False))
    engine.queue = ExchangeQueue(comm)
    for _ in range(3):  # warm-up, the first sparse step (it agrees on the setup and sums its norms), one more
        _iterate(state, params, "cpu")
    comm.issued.clear()
    before = HOST_READS.count
    if plan == "leader":
        with pytest.raises((NotImplementedError, RuntimeError), match="(?i)meta"):
            _iterate(state, params, "meta")
        return
    outs = _iterate(state, params, "meta")
    assert HOST_READS.count == before
    assert comm.issued == ["GatherProposals", "AllReduce"] * 2  # two collectives per bucket
    assert all(o.device.type == "meta" for o in outs)
    assert all(sp.residual.device.type == "meta" for sp in state.sparsifiers.values())


# ---- DDP's process group ----


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


@gloo_rank
def _groups_worker(rank, world_size, out_dir):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    model = _mlp()
    ddp = DDP(model, process_group=mine)
    state = DeftState(density=0.1, warmup_steps=1)  # the defaults: the group is DDP's
    ddp.register_comm_hook(state, deft_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(10 * (rank // 2) + rank)  # the two groups see other data
    grads = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(ddp(torch.randn(16, 8, generator=gen)), torch.randint(0, 4, (16,), generator=gen)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.step()
    errors = []
    other = DDP(_mlp(), process_group=mine)
    other.register_comm_hook(DeftState(density=0.1, warmup_steps=1, process_group=dist.group.WORLD), deft_hook)
    try:
        other(torch.randn(2, 8)).sum().backward()
    except ValueError as e:
        errors.append(str(e))
    dist.barrier()
    return {"grads": grads, "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "group_ranks": dist.get_process_group_ranks(state._engine.group), "errors": errors}


@pytest.mark.slow
def test_the_exchange_runs_on_ddps_process_group(tmp_path):
    ranks = run(_groups_worker, 4, tmp_path, timeout=180)
    assert [r["group_ranks"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for a, b in ((0, 1), (2, 3)):  # in step within a group
        assert torch.equal(ranks[a]["params"], ranks[b]["params"])
        assert all(torch.equal(x, y) for x, y in zip(ranks[a]["grads"], ranks[b]["grads"]))
    # apart between the groups, warm-up included (before: all four held the same gradient)
    assert all(not torch.equal(x, y) for x, y in zip(ranks[0]["grads"], ranks[2]["grads"]))
    for r in ranks:
        (error,) = r["errors"]
        assert "process_group" in error and "reduces in ranks" in error, error


# ---- one state, one model ----


@gloo_rank
def _two_models_worker(rank, world_size, out_dir):
    seen = {}
    state = DeftState(density=0.1, warmup_steps=1)
    first, second = DDP(_mlp()), DDP(_mlp())
    first.register_comm_hook(state, deft_hook)
    second.register_comm_hook(state, deft_hook)
    x = torch.randn(4, 8)
    first(x).sum().backward()
    try:
        second(x).sum().backward()
        seen["second"] = "no error"
    except ValueError as e:
        seen["second"] = str(e)
    # The same module in a new DDP model (a second Trainer.fit): recognised by its buckets, it goes on.
    module = _mlp()
    state = DeftState(density=0.1, warmup_steps=1)
    ddp = DDP(module, bucket_cap_mb=0.001)
    ddp.register_comm_hook(state, deft_hook)
    for _ in range(3):
        ddp(x).sum().backward()
    saved = state.state_dict()["buckets"]
    del ddp
    again = DDP(module, bucket_cap_mb=0.001)
    again.register_comm_hook(state, deft_hook)
    for _ in range(3):
        again(x).sum().backward()
    seen["same module"] = (state.iter, {i: b.sparsifier.step_count for i, b in state._buckets.items()},
                           sorted(saved) == sorted(state._buckets))
    dist.barrier()
    return seen


@pytest.mark.slow
def test_one_state_serves_one_model(tmp_path):
    for seen in run(_two_models_worker, 2, tmp_path, timeout=120):
        assert "already serves another DDP model" in seen["second"], seen
        iters, steps, same_buckets = seen["same module"]
        assert iters == 6 and same_buckets and set(steps.values()) == {5}, seen  # 5 sparse steps, none lost


def test_compiled_ddps_per_parameter_call_is_refused():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="compiled DDP.*python_reducer.*not supported.*optimize_ddp=True"):
        deft_hook(DeftState(), (torch.zeros(3), p))


# ---- bounded waits, failures into the future ----


class _Never:
    """Collectives whose work never completes (a peer that went silent)."""

    group, rank, world_size = None, 0, 2

    def start(self, request):
        return torch.futures.Future()


def test_wait_idle_is_bounded_by_the_groups_timeout():
    queue = ExchangeQueue(_Never(), timeout=timedelta(seconds=0.3))

    def program():
        yield AllReduce(torch.zeros(2))

    fut = queue.submit(program(), torch.device("cpu"))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 0:00:00.3") as raised:
        queue.wait_idle()
    assert isinstance(raised.value, RuntimeError)  # as torch.distributed's own errors: naming_failures sees it
    assert time.monotonic() - start < 5 and not fut.done()
    later = queue.submit(program(), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="earlier step in this exchange failed"):
        later.wait()


def test_the_timeout_is_the_groups(world_of_one):
    group = dist.new_group([0], timeout=timedelta(seconds=7))
    assert driver.collectives.group_timeout(group) == timedelta(seconds=7)
    queue = ExchangeQueue(driver.TorchCollectives(group))
    assert queue.timeout == timedelta(seconds=7) + driver.collectives.GRACE  # its collectives' own errors first


class _FailingLater:
    """Collectives whose second request fails inside the first one's completion callback thread."""

    group, rank, world_size = None, 0, 1

    def __init__(self) -> None:
        self.calls = 0

    def start(self, request):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("the runner broke")  # thrown into the program, which does not catch it
        fut = torch.futures.Future()
        threading.Timer(0.05, lambda: fut.set_result(request.tensor)).start()
        return fut


def test_an_exception_in_the_callback_path_reaches_the_future():
    queue = ExchangeQueue(_FailingLater(), timeout=timedelta(seconds=5))

    def program():
        yield AllReduce(torch.zeros(2))
        yield Broadcast(torch.zeros(2), 0)

    fut = queue.submit(program(), torch.device("cpu"))
    queue.wait_idle()
    with pytest.raises(RuntimeError, match="the runner broke"):
        fut.wait()
    assert queue.failure is not None


def test_a_failing_future_callback_still_ends_the_program(monkeypatch):
    """Even where the runner itself raises (here: completing the program's future), the error ends
    in that program's future and the queue goes idle: no backward waits for good."""
    queue = ExchangeQueue(_OneRank(), timeout=timedelta(seconds=5))
    monkeypatch.setattr(queue, "_next", lambda real=queue._next: (_ for _ in ()).throw(RuntimeError("broken"))
                        if not getattr(queue, "_broke", False) and not setattr(queue, "_broke", True) else real())

    def program():
        yield AllReduce(torch.zeros(2))
        return 7

    fut = queue.submit(program(), torch.device("cpu"))
    queue.wait_idle()
    assert fut.done() and queue.failure is not None


def test_a_state_saved_on_one_device_resumes_on_another():
    """A checkpoint loaded with map_location="cpu" and resumed where the gradients live on another
    device (a GPU in production; ``meta`` here, the CPU stand-in): the residuals move to the
    gradients' device at the first step instead of failing its device check."""
    params = [nn.Parameter(torch.zeros(s)) for s in SIZES]
    state = DeftState(density=0.05, warmup_steps=1, find_unused_parameters=False)
    with pytest.warns(UserWarning, match="could not find"):
        engine = state._engine_for(_Bucket(0, params[:2], [torch.zeros(s) for s in SIZES[:2]], False))
    engine.queue = ExchangeQueue(_OneRank())
    for _ in range(3):
        _iterate(state, params, "cpu")
    saved = state.state_dict()
    assert all(b["sparsifier"]["residual"].device.type == "cpu" for b in saved["buckets"].values())
    resumed = DeftState(density=0.05, warmup_steps=1, find_unused_parameters=False)
    resumed.load_state_dict(saved)
    fresh = [nn.Parameter(torch.zeros(s)) for s in SIZES]
    with pytest.warns(UserWarning, match="could not find"):
        engine = resumed._engine_for(_Bucket(0, fresh[:2], [torch.zeros(s) for s in SIZES[:2]], False))
    comm = engine.queue = ExchangeQueue(_OneRank())
    _iterate(resumed, fresh, "cpu")  # the new model's first iteration regroups into the saved buckets
    _iterate(resumed, fresh, "meta")  # then sparse where the gradients now are: two collectives per bucket
    assert comm.collectives.issued[-4:] == ["GatherProposals", "AllReduce"] * 2
    assert all(sp.residual.device.type == "meta" for sp in resumed.sparsifiers.values())


class _FailingSelect:
    """A sparsifier factory whose selection raises at its step 1 (a stand-in for an out-of-memory error)."""

    def __call__(self, density):
        from deft_kernels.sparsifiers import DEFT

        sp = DEFT(density, plan="leader")
        real = sp.select

        def select(*args):
            if sp.step_count == 1:
                raise MemoryError("injected")
            return real(*args)

        sp.select = select
        return sp


def test_a_failed_iteration_reports_no_stale_statistics(world_of_one):
    torch.manual_seed(0)
    model = _mlp()
    ddp = DDP(model)
    state = DeftState(sparsifier=_FailingSelect(), density=0.1, warmup_steps=1)
    ddp.register_comm_hook(state, deft_hook)
    x = torch.randn(4, 8)
    for _ in range(2):
        ddp(x).sum().backward()
    assert state.last_stats  # the first sparse iteration's
    with pytest.raises(RuntimeError, match="MemoryError: injected"):  # DDP wraps the future's error
        ddp(x).sum().backward()
    assert state.last_stats == {}  # not the previous iteration's
    with pytest.raises(RuntimeError, match="failed"):
        ddp(x).sum().backward()


class _Renamed(nn.Module):
    """_mlp()'s sizes under other names, in another order: a different model with the same sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 32)
        self.tail = nn.Linear(32, 4)

    def forward(self, x):
        return self.tail(torch.tanh(self.head(x)))


def test_resume_matches_parameters_by_name_not_only_by_size(world_of_one):
    torch.manual_seed(0)
    ddp = DDP(_mlp())
    state = DeftState(density=0.1, warmup_steps=1)
    ddp.register_comm_hook(state, deft_hook)
    x = torch.randn(4, 8)
    for _ in range(3):
        ddp(x).sum().backward()
    saved = state.state_dict()
    assert any(name == "0.weight" for b in saved["buckets"].values() for name in b["names"])
    other = DDP(_Renamed())
    resumed = DeftState(density=0.1, warmup_steps=1)
    resumed.load_state_dict(saved)
    other.register_comm_hook(resumed, deft_hook)
    with pytest.raises(RuntimeError, match="sit where the state had others"):
        other(x).sum().backward()
