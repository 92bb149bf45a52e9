"""Faults of the exchange over real processes (gloo on 127.0.0.1), each a defect the step driver fixes:

- fp16 averages must not overflow: the sum travels in fp32 and is divided by ``n`` before it is
  rounded to fp16 (4 ranks holding 40000 average to 40000, not ``inf``), on every sparsifier, in the
  plain API and in the DDP hook;
- a rank whose input turns bad after the first step (a longer gradient, another dtype), or whose
  own plan, selection or packing raises, makes every rank raise at once, naming the rank and the
  cause, and the ranks stay in step afterwards (in the DDP hook, the queue starts no further bucket);
  for DEFT's default step, which reads its status one step later, "at once" is at the next step's
  start (``driver.settle``; in the hook the next iteration's first bucket);
- with DDP's ``find_unused_parameters=True``, nothing of a residual is lost on parameters that no
  rank used in an iteration (DDP discards the hook's output there).

Each test is one spawn with a hard timeout; the ranks write what they saw to a file and the parent
asserts.
"""

from __future__ import annotations

import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, GradientSparsifier, deft_hook, driver
from deft_kernels.sparsifiers import DEFT, SPARSIFIERS, build

from multiproc import gloo_rank, run

KWARGS = {"threshold": {"threshold": 0.5}}


def _sparsifier(name: str, density: float):
    return build(name, 1.0 if name == "dense" else density, **KWARGS.get(name, {}))


# ---- fp16: the average of 4 x 40000 is 40000 ----

BIG = 40000.0  # fp16 holds it (max 65504); 4 of them summed do not fit


def _spiky_fp16(numel: int) -> torch.Tensor:
    """1.0 everywhere and BIG at every 20th element, the same on every rank."""
    g = torch.ones(numel)
    g[::20] = BIG
    return g.half()


@gloo_rank
def _fp16_worker(rank, world_size, out_dir):
    seen = {}
    for name in sorted(SPARSIFIERS):  # one step: the residual starts at zero, nothing piles up
        seen[name] = driver.step(_sparsifier(name, 0.1), _spiky_fp16(400), sizes=[100, 300])[0]
    # The plain API and the hook on an fp16 model whose weight gradient is the spiky vector.
    for api in ("plain", "hook"):
        model = nn.Linear(64, 1, bias=False).half()
        nn.init.zeros_(model.weight)
        x = _spiky_fp16(64)[None]
        if api == "hook":
            net = DDP(model)
            net.register_comm_hook(DeftState(sparsifier="topk", density=0.25, warmup_steps=1), deft_hook)
        else:
            net = model
            gs = GradientSparsifier(model, sparsifier="topk", density=0.25, warmup_steps=1)
        for t in range(3):  # warm-up, then two sparse steps
            model.zero_grad()
            net(x).sum().backward()
            if api == "plain":
                gs.step()
            seen[f"{api} step {t}"] = model.weight.grad.flatten().clone()
    return seen


@pytest.mark.slow
def test_fp16_mean_of_large_values_does_not_overflow(tmp_path):
    for rank, seen in enumerate(run(_fp16_worker, 4, tmp_path, timeout=180)):
        for what, out in seen.items():
            assert out.dtype == torch.float16, (rank, what, out.dtype)
            assert bool(torch.isfinite(out).all()), (rank, what, int((~torch.isfinite(out)).sum()))
            if what in SPARSIFIERS:  # the step's output: the mean of identical gradients, where sent
                assert set(out.unique().tolist()) <= {0.0, 1.0, BIG} and bool((out == BIG).any()), (rank, what)
            else:  # the largest magnitudes are sent at every step
                assert bool((out[::20] == BIG).all()), (rank, what)


# ---- a rank whose input turns bad after the first step ----

SIZES = [300, 40, 500, 7]
# (bad rank, how its gradient is bad, words its peers' error must contain). Step 1 of 3 ranks: rank
# 1 is the leader, rank 2 is not.
BAD_INPUTS = [(1, "longer", ("rank 1", "length")), (2, "fp16", ("rank 2", "dtype"))]


def _grad(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(sum(SIZES), generator=gen)


@gloo_rank
def _bad_input_worker(rank, world_size, out_dir):
    seen = {}
    for name in sorted(SPARSIFIERS):
        for bad_rank, how, _ in BAD_INPUTS:
            sp = _sparsifier(name, 0.05)
            driver.step(sp, _grad(rank, 0), sizes=SIZES)
            g = _grad(rank, 1)
            sizes = SIZES
            if rank == bad_rank and how == "longer":
                g, sizes = torch.cat([g, g[:9]]), SIZES[:-1] + [SIZES[-1] + 9]
            elif rank == bad_rank:
                g = g.half()
            start = time.monotonic()
            try:
                driver.step(sp, g, sizes=sizes)
                driver.settle(sp)  # DEFT one step ahead reads its status here (one step later); others did
                error = "no error"
            except Exception as e:  # noqa: BLE001 -- the parent checks which
                error = f"{type(e).__name__}: {e}"
            seen[(name, bad_rank)] = (error, time.monotonic() - start)
            dist.barrier()  # the ranks are still in step: the next collective pairs up
    return seen


@pytest.mark.slow
def test_bad_input_after_the_first_step_stops_every_rank_at_once(tmp_path):
    # A hang would show as the group's 30 s timeout, well inside the spawn's.
    for rank, seen in enumerate(run(_bad_input_worker, 3, tmp_path, timeout=150, group_timeout=30)):
        for name in sorted(SPARSIFIERS):
            for bad_rank, how, words in BAD_INPUTS:
                error, seconds = seen[(name, bad_rank)]
                where = (name, bad_rank, rank, error)
                if rank == bad_rank:
                    expect = "grad length changed between steps" if how == "longer" else "earlier steps were"
                    assert expect in error, where
                else:
                    assert error.startswith("ValueError:") and all(w in error for w in words), where
                # Well under the 30 s process-group timeout: nobody waited for a peer that had stopped.
                assert seconds < 3.0, where


# ---- DDP with find_unused_parameters=True: nothing lost on unused parameters ----

STEPS = 6
RARE_STEPS = (0, 2, 3)  # iterations in which every rank uses the rare branch; unused by all in the others


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(8, 16)
        self.rare = nn.Linear(16, 16)
        self.local = nn.Linear(16, 16)  # used on rank 0 only: locally unused elsewhere, globally used
        self.head = nn.Linear(16, 4)

    def forward(self, x, use_rare: bool, use_local: bool):
        h = torch.tanh(self.trunk(x))
        if use_rare:
            h = h + torch.tanh(self.rare(h))
        if use_local:
            h = h + torch.tanh(self.local(h))
        return self.head(h)


def _adding_to(total: torch.Tensor):
    """A tensor hook adding the gradient to ``total``; it runs before DDP sees the gradient."""
    def hook(grad: torch.Tensor) -> None:
        total.add_(grad)
    return hook


def _own_gradients(params) -> list[torch.Tensor]:
    """One tensor per parameter that sums this rank's own gradients over iterations (a tensor hook,
    before DDP sees them)."""
    raw = [torch.zeros_like(p) for p in params]
    for p, acc in zip(params, raw):
        p.register_hook(_adding_to(acc))
    return raw


def _train_branchy(net, model, params, rank) -> list[torch.Tensor]:
    """STEPS iterations of ``_Branchy`` under DDP (the rare branch in RARE_STEPS, the local one on
    rank 0); returns what DDP left in p.grad, summed over them."""
    applied = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(rank)
    for t in range(STEPS):
        model.zero_grad(set_to_none=True)
        x, y = torch.randn(4, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        F.cross_entropy(net(x, t in RARE_STEPS, rank == 0), y).backward()
        for p, acc in zip(params, applied):
            if p.grad is not None:
                acc.add_(p.grad)
    return applied


@gloo_rank
def _unused_worker(rank, world_size, out_dir):
    results = {}
    for name in sorted(SPARSIFIERS):
        model = _Branchy()
        params = list(model.parameters())
        raw = _own_gradients(params)
        net = DDP(model, find_unused_parameters=True)
        extra = {"threshold": 0.02} if name == "threshold" else {}  # low enough to send part of the rare branch
        state = DeftState(sparsifier=name, density=0.2, warmup_steps=1, find_unused_parameters=True, **extra)
        order = {}

        def hook(state, bucket, order=order):
            order[bucket.index()] = [next(i for i, q in enumerate(params) if q is p) for p in bucket.parameters()]
            return deft_hook(state, bucket)

        net.register_comm_hook(state, hook)
        applied = _train_branchy(net, model, params, rank)
        residual = [torch.zeros_like(p) for p in params]
        for index, sp in state.sparsifiers.items():
            if sp.residual is not None:
                for i, r in zip(order[index], sp.residual.split([params[i].numel() for i in order[index]])):
                    residual[i] += r.view_as(params[i])
        results[name] = {"raw": raw, "applied": applied, "residual": residual}
    return results


@pytest.mark.slow
def test_ddp_unused_parameters_lose_no_residual(tmp_path):
    """Summed over iterations and ranks: every rank's gradient == n x what DDP applied + the residuals
    left (the applied gradient is the mean over ranks, so n copies of it account for the sent mass)."""
    n = 2
    ranks = run(_unused_worker, n, tmp_path, timeout=180)
    for name in sorted(SPARSIFIERS):
        lost = 0.0
        for i in range(len(ranks[0][name]["raw"])):
            given = sum(r[name]["raw"][i] for r in ranks)
            kept = n * ranks[0][name]["applied"][i] + sum(r[name]["residual"][i] for r in ranks)
            assert torch.equal(ranks[0][name]["applied"][i], ranks[1][name]["applied"][i]), (name, i)
            lost += float((given - kept).abs().sum())
        assert lost < 1e-4, (name, lost)


@gloo_rank
def _taken_from_ddp_worker(rank, world_size, out_dir):
    """DeftState's find_unused_parameters left at None: it takes DDP's True at the first hook call and
    loses nothing; a value that disagrees with DDP's raises at that call, naming both."""
    from deft_kernels.hook import registered_on

    model = _Branchy()
    params = list(model.parameters())
    raw = _own_gradients(params)
    net = DDP(model, find_unused_parameters=True)
    state = DeftState(sparsifier="deft", density=0.2, warmup_steps=1)
    net.register_comm_hook(state, deft_hook)
    found = registered_on(state) is net
    applied = _train_branchy(net, model, params, rank)
    residual = sum(float(sp.residual.double().sum()) for sp in state.sparsifiers.values() if sp.residual is not None)
    errors = []
    for ddp_flag, given in ((True, False), (False, True)):
        net2 = DDP(_Branchy(), find_unused_parameters=ddp_flag)
        net2.register_comm_hook(DeftState(density=0.2, warmup_steps=1, find_unused_parameters=given), deft_hook)
        try:
            net2(torch.randn(4, 8), True, True).sum().backward()
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    return {"found": found, "adopted": state.find_unused_parameters, "raw": float(sum(r.double().sum() for r in raw)),
            "applied": float(sum(a.double().sum() for a in applied)), "residual": residual, "errors": errors}


@pytest.mark.slow
def test_find_unused_parameters_is_taken_from_ddp(tmp_path):
    """Before, DeftState's flag defaulted to False whatever DDP said: with DDP's True, what the hook
    sent for a parameter no rank used was dropped by DDP and lost (this test's sum did not balance)."""
    n = 2
    ranks = run(_taken_from_ddp_worker, n, tmp_path, timeout=120)
    assert all(r["found"] and r["adopted"] for r in ranks), ranks
    given = sum(r["raw"] for r in ranks)
    kept = n * ranks[0]["applied"] + sum(r["residual"] for r in ranks)
    assert abs(given - kept) < 1e-4 * max(1.0, abs(given)), (given, kept)
    for r in ranks:
        wrong_off, wrong_on = r["errors"]
        assert "find_unused_parameters=False" in wrong_off and "find_unused_parameters=True" in wrong_off, wrong_off
        assert "would be lost" in wrong_off
        assert "find_unused_parameters=True" in wrong_on and "find_unused_parameters=False" in wrong_on, wrong_on


# ---- a rank whose own work fails (plan, select, pack) ----

#: (plan protocol, where it fails). The plan one step ahead is every rank's own, alike, from the same
#: summed norms: it has no failure of one rank to carry (docs/exchange.md), so it is not injected.
POINTS = (("leader", "plan"), ("leader", "select"), ("leader", "pack"), ("ahead", "select"), ("ahead", "pack"))
FAULTY_RANK, FAULTY_STEP = 1, 1  # at the sparsifier's step 1 rank 1 leads (bucket 0 in the hook)


class _Faulty(DEFT):
    """DEFT whose plan, selection or packing raises on rank 1 at its step 1: the stand-in for an
    out-of-memory error or a failed launch on one rank, whose process stays alive."""

    def __init__(self, density: float, protocol: str, point: str) -> None:
        super().__init__(density, plan=protocol)
        self.point = point
        self.kernels = types.SimpleNamespace(**{**vars(self.kernels), "sparse_pack": self._pack})

    def _fail(self, point: str) -> None:
        if self.point == point and dist.get_rank() == FAULTY_RANK and self.step_count == FAULTY_STEP:
            raise MemoryError(f"injected failure in {point}")

    def plan(self, *args):
        self._fail("plan")
        return super().plan(*args)

    def select(self, *args):
        self._fail("select")
        return super().select(*args)

    def _pack(self, acc, indices):
        self._fail("pack")
        return DEFT.kernels.sparse_pack(acc, indices)


ITERATIONS = 4  # the hook: iteration 0 dense, 1-3 sparse; the fault at the sparsifiers' step 1 (iteration 2)


@gloo_rank
def _failing_work_worker(rank, world_size, out_dir):
    seen = {}
    for protocol, point in POINTS:
        sp = _Faulty(0.05, protocol, point)  # the plain API
        driver.step(sp, _grad(rank, 0), sizes=SIZES)
        start = time.monotonic()
        try:
            driver.step(sp, _grad(rank, 1), sizes=SIZES)
            driver.settle(sp)  # the step one step ahead reads its status here
            error = "no error"
        except Exception as e:  # noqa: BLE001 -- the parent checks which
            error = f"{type(e).__name__}: {e}"
        seen[("plain", protocol, point)] = (error, time.monotonic() - start)
        dist.barrier()

        torch.manual_seed(0)  # the DDP hook: two buckets
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
        net = DDP(model, bucket_cap_mb=0.01)
        state = DeftState(sparsifier=lambda d, protocol=protocol, point=point: _Faulty(d, protocol, point),
                          density=0.05, warmup_steps=1)
        net.register_comm_hook(state, deft_hook)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
        for t in range(ITERATIONS):
            start = time.monotonic()
            try:
                net(x).square().sum().backward()
                error = "no error"
            except Exception as e:  # noqa: BLE001 -- the parent checks which
                error = f"{type(e).__name__}: {e}"
            seen[("hook", protocol, point, t)] = (error, time.monotonic() - start)
        seen[("hook", protocol, point, "steps")] = {i: sp.step_count for i, sp in state.sparsifiers.items()}
        dist.barrier()
    return seen


WORDS_OF = {"plan": "the leader's plan raised", "select": "its selection raised", "pack": "packing its values raised"}


@pytest.mark.slow
def test_a_failure_in_one_ranks_plan_select_or_pack_stops_every_rank_at_once(tmp_path):
    """Before the failure protocol covered them, the other ranks waited in the next collective until
    the group's timeout (20 s here): every rank must raise within seconds, naming rank 1 and the phase,
    in the step that failed (``plan="leader"``) or at the next one's start (the plan one step ahead:
    in the hook, the next iteration's first bucket); in the hook the state starts no further bucket,
    and every later iteration fails at once."""
    ranks = run(_failing_work_worker, 3, tmp_path, timeout=240, group_timeout=20)
    for rank, seen in enumerate(ranks):
        for protocol, point in POINTS:
            raised_at = 2 if protocol == "leader" else 3  # the iteration whose backward raises
            for key in (("plain", protocol, point), ("hook", protocol, point, raised_at)):
                error, seconds = seen[key]
                where = (key, rank, error)
                if rank == FAULTY_RANK:
                    assert "MemoryError: injected failure in " + point in error, where
                else:
                    assert f"another rank stopped at step 1 (rank {FAULTY_RANK}: {WORDS_OF[point]})" in error, where
                assert seconds < 5.0, where
            assert all(seen[("hook", protocol, point, t)][0] == "no error" for t in range(raised_at)), (rank, point)
            for t in range(raised_at + 1, ITERATIONS):  # later iterations fail at once
                assert "failed" in seen[("hook", protocol, point, t)][0], (rank, point, t)
            steps = seen[("hook", protocol, point, "steps")]
            if protocol == "leader":  # bucket 0 failed at its step 1; the buckets after it never ran theirs
                assert len(steps) >= 2 and set(steps.values()) == {1}, (rank, point, steps)
            else:  # every bucket finished its step 1; the next iteration stopped before any step
                assert len(steps) >= 2 and set(steps.values()) == {2}, (rank, point, steps)
