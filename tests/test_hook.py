"""The DDP hook and the plain API with real processes: gloo on 127.0.0.1, 2 and 4 ranks.

A spawn costs seconds, so one spawn per world size runs every multi-process check in sequence
(``_worker``): warm-up equals DDP without a hook, the hook equals the plain API, a checkpoint round
trip through a rebuilt DDP model equals not stopping, pickling, and the errors. Comparisons are exact
(both sides run the same sparsifier on the same bits, and gloo's sum is deterministic for a fixed
input), except hook vs plain API with more than 2 ranks (see there).
"""

import io
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, GradientSparsifier, deft_hook

from multiproc import gloo_rank, run

SPAWN_TIMEOUT_S = 240
WARMUP = 2
STEPS = 6
DENSITY = 0.05
SPARSIFIERS = ("deft", "topk", "cltk")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def _batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(steps)]


def _train(model, ddp, batches, opt, sparsifier=None):
    """Plain SGD loop; returns the losses and each step's gradients (after communication)."""
    losses, grads = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        if sparsifier is not None:
            sparsifier.step()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return losses, grads


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _hook_run(sparsifier, batches, bucket_cap_mb=25.0, order=None):
    """DDP + hook from the initial model; ``order`` (a dict) receives each bucket's parameter indices."""
    model = _model()
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = DeftState(sparsifier=sparsifier, density=DENSITY, warmup_steps=WARMUP)
    index = {p: i for i, p in enumerate(model.parameters())}

    def recording_hook(state, bucket):
        if order is not None:
            order[bucket.index()] = [index[p] for p in bucket.parameters()]
        return deft_hook(state, bucket)

    ddp.register_comm_hook(state, recording_hook if order is not None else deft_hook)
    opt = _sgd(model)
    losses, grads = _train(model, ddp, batches, opt)
    return model, ddp, state, opt, losses, grads


def _residuals(state):
    return {i: (sp.step_count, sp.residual) for i, sp in state.sparsifiers.items()}


def _exact(actual, expected, msg):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{msg}: {m}")


@gloo_rank
def _worker(rank, world_size, tmp):
    batches = _batches(rank, STEPS)

    # DDP without a hook: the reference for the warm-up steps.
    model = _model()
    dense_losses, dense_grads = _train(model, DDP(model), batches[:WARMUP], _sgd(model))

    for name in SPARSIFIERS:
        order: dict[int, list[int]] = {}
        model, _, state, _, losses, grads = _hook_run(name, batches, order=order)
        # Warm-up steps are DDP's own dense average.
        _exact(losses[:WARMUP], dense_losses, f"{name}: warm-up losses")
        _exact(grads[:WARMUP], dense_grads, f"{name}: warm-up gradients")
        # Sparse steps: the counters advanced once per iteration, every gradient is sparse.
        assert state.iter == STEPS and len(order) == 1, (state.iter, order)
        stats = state.compression_stats()
        # Top-k's union grows with the workers (build-up); DEFT and CLT-k send about k.
        max_density = world_size * DENSITY if name == "topk" else 1.1 * DENSITY
        assert stats["steps"] == STEPS - WARMUP and 0 < stats["density"] <= max_density, (name, stats)
        for step_grads in grads[WARMUP:]:
            nonzero = sum(int(g.count_nonzero()) for g in step_grads)
            assert 0 < nonzero <= state.last_stats[0].sent, (name, nonzero, state.last_stats[0])
        # The plain API over the same parameters in the bucket's order gives the same training.
        plain = _model()
        params = list(plain.parameters())
        gs = GradientSparsifier([params[i] for i in order[0]], sparsifier=name, density=DENSITY,
                                warmup_steps=WARMUP)
        plain_losses, plain_grads = _train(plain, plain, batches, _sgd(plain), sparsifier=gs)
        # Exact with 2 ranks. With more, DDP's first iteration all-reduces its provisional bucket (model
        # order) and the plain API its flat vector (rebuilt-bucket order): gloo's ring adds the ranks'
        # values in an order set by each element's position, so that step differs in the last bit.
        tol = {"rtol": 0, "atol": 0} if world_size == 2 else {"rtol": 1e-5, "atol": 1e-7}
        for what, a, b in (("losses", plain_losses, losses), ("gradients", plain_grads, grads),
                           ("parameters", list(plain.parameters()), list(model.parameters()))):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: plain API vs hook, {what}: {m}")

    # Checkpoint round trip through a rebuilt DDP model, several buckets (the resumed model's first
    # iteration has one provisional bucket: the state regroups it into the saved buckets).
    cap = 0.01  # MB: about 2.5k fp32 elements per bucket
    straight, _, straight_state, _, _, _ = _hook_run("deft", batches, bucket_cap_mb=cap)
    assert len(straight_state.state_dict()["buckets"]) > 1
    model, _, state, opt, _, _ = _hook_run("deft", batches[:3], bucket_cap_mb=cap)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
               tmp / f"ckpt_rank{rank}.pt")
    pickled = pickle.loads(pickle.dumps(state))
    del model, state, opt
    ckpt = torch.load(tmp / f"ckpt_rank{rank}.pt")
    model = _model()
    model.load_state_dict(ckpt["model"])
    opt = _sgd(model)
    opt.load_state_dict(ckpt["opt"])
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    state.load_state_dict(ckpt["hook"])
    ddp = DDP(model, bucket_cap_mb=cap)
    ddp.register_comm_hook(state, deft_hook)
    _train(model, ddp, batches[3:], opt)
    _exact(list(model.parameters()), list(straight.parameters()), "3 steps + checkpoint + 3 steps vs 6 steps")
    assert state.iter == straight_state.iter == STEPS
    _exact(_residuals(state), _residuals(straight_state), "residuals after resuming vs not stopping")

    # Pickling drops the process group and keeps the residuals and counter.
    assert pickled.process_group is None and pickled.iter == 3
    loaded = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    loaded.load_state_dict(ckpt["hook"])
    _exact(_residuals(pickled), _residuals(loaded), "pickled state vs saved state")

    # Every rank loads its own file: another rank's is refused.
    other = torch.load(tmp / f"ckpt_rank{(rank + 1) % world_size}.pt")["hook"]
    with pytest.raises(ValueError, match="every rank must load the file it saved"):
        DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP).load_state_dict(other)
    with pytest.raises(ValueError, match="density"):
        DeftState(sparsifier="deft", density=0.5, warmup_steps=WARMUP).load_state_dict(ckpt["hook"])
    gs = GradientSparsifier(_model(), density=DENSITY)
    saved = gs.state_dict()
    saved["rank"] = (rank + 1) % world_size
    with pytest.raises(ValueError, match="every rank must load the file it saved"):
        gs.load_state_dict(saved)

    # A loaded state registered on a different model: refused at its first iteration, on every rank
    # alike (before any collective of the sparse step).
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP)
    state.load_state_dict(ckpt["hook"])
    torch.manual_seed(1)
    other_model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    ddp = DDP(other_model)
    ddp.register_comm_hook(state, deft_hook)
    x, y = batches[0]
    with pytest.raises(RuntimeError, match="do not match the buckets of the loaded state"):
        F.cross_entropy(ddp(x), y).backward()
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_hook_with_processes(world_size, tmp_path):
    run(_worker, world_size, tmp_path, timeout=SPAWN_TIMEOUT_S)


# ---- single process: argument checks of the hook's state ----


def test_deft_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        DeftState(warmup_steps=0)
    with pytest.raises(TypeError, match="warmup_steps"):
        DeftState(warmup_steps=2.0)
    with pytest.raises(ValueError, match="density"):
        DeftState(density=0.0)
    with pytest.raises(ValueError, match="density"):
        DeftState(density=1.5)
    with pytest.raises(TypeError, match="density"):
        DeftState(density="0.01")
    with pytest.raises(ValueError, match="sparsifier"):
        DeftState(sparsifier="nope")
    with pytest.raises(TypeError, match="sparsifier"):
        DeftState(sparsifier=3)
    with pytest.raises(TypeError, match="sparsifier factory"):
        DeftState(sparsifier=lambda density: object())
    with pytest.raises(TypeError, match="process_group"):
        DeftState(process_group="gloo")
    with pytest.raises(TypeError, match="grad_scaler must be None or a torch.amp.GradScaler"):
        DeftState(grad_scaler="scaler")
    with pytest.raises(TypeError, match="find_unused_parameters must be None or a bool"):
        DeftState(find_unused_parameters=1)
    state = DeftState(warmup_steps=2)
    with pytest.raises(ValueError, match="state_dict"):
        state.load_state_dict({"iter": 3})
    with pytest.raises(ValueError, match="state_dict"):
        state.load_state_dict([1, 2])


def test_deft_hook_rejects_bad_arguments():
    with pytest.raises(TypeError, match="state must be a DeftState"):
        deft_hook(object(), None)
    with pytest.raises(TypeError, match="bucket must be"):
        deft_hook(DeftState(warmup_steps=2), object())  # a tensor is FSDP's call: tests/test_integrations.py


def test_deft_state_pickles_without_process(seed):
    state = DeftState(sparsifier="topk", density=0.1, warmup_steps=3)
    state.iter = 5
    restored = pickle.loads(pickle.dumps(state))
    assert restored.process_group is None and restored.iter == 5 and restored.warmup_steps == 3
    assert restored.state_dict() == state.state_dict()
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    fresh = DeftState(sparsifier="topk", density=0.1, warmup_steps=3)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.iter == 5


class _Bucket:
    """The parts of a GradBucket that the state's bookkeeping reads."""

    def __init__(self, params):
        self._params = params

    def parameters(self):
        return self._params


@pytest.mark.parametrize("find_unused", [False, True])
def test_tensor_hooks_only_with_find_unused_parameters(find_unused):
    """Without find_unused_parameters every parameter is used in every iteration (DDP's rule), so the
    state registers no tensor hook: nothing runs per parameter per step. (No DDP model holds this
    state, so the values given count, and it says so once.)"""
    params = [torch.zeros(3, requires_grad=True) for _ in range(4)]
    state = DeftState(warmup_steps=2, find_unused_parameters=find_unused)
    with pytest.warns(UserWarning, match="could not find the DistributedDataParallel model"):
        engine = state._engine_for(_Bucket(params))
    engine._number(_Bucket(params))
    assert len(engine._hooks) == (len(params) if find_unused else 0)
    assert state.find_unused_parameters == find_unused
    assert state._new_sparsifier(3).rotation == 3  # each bucket's bins (and leader) are offset by its index


def test_without_a_ddp_model_the_state_tracks_usage_and_warns_once():
    params = [torch.zeros(3, requires_grad=True) for _ in range(2)]
    state = DeftState(warmup_steps=2)
    with pytest.warns(UserWarning, match="tracks which parameters are used"):
        engine = state._engine_for(_Bucket(params))
    assert engine.track_used and state.find_unused_parameters
