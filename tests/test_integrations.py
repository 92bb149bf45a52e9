"""The DDP hook under DDP's options and next to FSDP, on 2 gloo ranks in one spawn: with
gradient_as_bucket_view or static_graph it sends exactly what it sends under plain DDP;
find_unused_parameters with an unused parameter and no_sync gradient accumulation train with the
ranks in agreement; FSDP gets a TypeError that names it (FSDP's register_comm_hook passes tensors,
not a GradBucket)."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook
from multiproc import spawn

STEPS, WARMUP, DENSITY = 6, 2, 0.05
BUCKET_CAP_MB = 0.01  # about 10 kB: the model's 6,154 parameters fill 3 buckets


class _WithUnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        self.unused = nn.Linear(20, 10)

    def forward(self, x):
        return self.body(x)


def _train(ddp_kwargs, batches, model=None, micro_batches=1):
    """DDP + deft_hook from the same initial model; ``micro_batches`` > 1 accumulates that many
    backward passes per step, all but the last under ``no_sync``. Returns (parameters, state)."""
    model = model if model is not None else _WithUnusedHead().body
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB, **ddp_kwargs)
    state = DeftState(sparsifier="deft", density=DENSITY, warmup_steps=WARMUP,
                      find_unused_parameters=ddp_kwargs.get("find_unused_parameters", False))
    ddp.register_comm_hook(state, deft_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        for i, (xs, ys) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
            if i < micro_batches - 1:
                with ddp.no_sync():
                    F.cross_entropy(ddp(xs), ys).backward()
            else:
                F.cross_entropy(ddp(xs), ys).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], state


def _same_on_every_rank(params):
    flat = torch.cat([p.flatten() for p in params])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def _worker(rank, world_size, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(100 + rank)
        batches = [(torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(STEPS)]
        plain, _ = _train({}, batches)
        for option in ("gradient_as_bucket_view", "static_graph"):
            params, state = _train({option: True}, batches)
            for p, q in zip(params, plain):
                torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m: f"{option}: {m}")
            assert state.compression_stats()["steps"] == STEPS - WARMUP, option

        # find_unused_parameters: DDP keeps its first bucket layout (it rebuilds buckets only without
        # this option), so DEFT's fragments, and what it sends, differ from plain DDP's run.
        model = _WithUnusedHead()
        unused_before = [p.detach().clone() for p in model.unused.parameters()]
        params, state = _train({"find_unused_parameters": True}, batches, model=model)
        assert state.compression_stats()["steps"] == STEPS - WARMUP and _same_on_every_rank(params)
        for p, q in zip(model.unused.parameters(), unused_before):
            assert torch.equal(p, q), "a parameter without gradient moved"

        params, state = _train({}, batches, micro_batches=2)
        assert state.iter == STEPS and state.compression_stats()["steps"] == STEPS - WARMUP
        assert _same_on_every_rank(params) and not any(torch.equal(p, q) for p, q in zip(params, plain))

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

        # NO_SHARD calls hook(state, grad); the sharded strategies hook(state, grad, sharded_grad).
        for strategy in (ShardingStrategy.NO_SHARD, ShardingStrategy.FULL_SHARD):
            fsdp = FSDP(_WithUnusedHead().body, sharding_strategy=strategy, device_id=torch.device("cpu"))
            fsdp.register_comm_hook(DeftState(), deft_hook)
            x, y = batches[0]
            with pytest.raises(TypeError, match="FSDP's register_comm_hook passes gradient tensors"):
                F.cross_entropy(fsdp(x), y).backward()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_hook_under_ddp_options_and_fsdp():
    spawn(_worker, 2)


def test_fsdp_call_forms_raise_naming_fsdp():
    state = DeftState()
    with pytest.raises(TypeError, match="does not support FSDP"):
        deft_hook(state, torch.zeros(8))
    with pytest.raises(TypeError, match="does not support FSDP"):
        deft_hook(state, torch.zeros(8), torch.zeros(4))
