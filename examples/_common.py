"""What the examples share: the toy task, and starting 2 CPU processes when no launcher did.

``python examples/<file>.py`` spawns 2 processes with the variables torchrun sets (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); under
``torchrun --nproc_per_node=2 examples/<file>.py`` each process runs the example once.
"""

import gc
import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 60


def task(rank: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A small MLP (75k parameters), the same on every rank, and this rank's own ``STEPS`` batches of
    a synthetic 4-class problem (labels from a fixed linear teacher)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    teacher = torch.randn(32, 4)
    data = torch.Generator().manual_seed(1 + rank)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(64, 32, generator=data)
        batches.append((x, (x @ teacher).argmax(dim=1)))
    return model, batches


def report(rank: int, step: int, loss: torch.Tensor) -> None:
    """The first and last loss, from rank 0 (the tests read these lines)."""
    if rank == 0 and step in (0, STEPS - 1):
        print(f"step {step} loss {loss.item():.4f}", flush=True)


@contextmanager
def gloo_process_group():
    """The default process group from the launcher's variables; yields this process's rank."""
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def end_process_group() -> None:
    """After ``Trainer.fit``, which leaves the process group up: the caller has dropped its trainer
    (and with it the DDP model); collect it, then barrier and destroy the group while the interpreter
    is whole. Left to interpreter shutdown, gloo's and DDP's teardown aborted a process now and then
    (docs/operations.md, "End cleanly")."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(train, nprocs: int = 2) -> None:
    """Run ``train()`` in this process under a launcher, else in ``nprocs`` new local processes."""
    if "RANK" in os.environ:
        train()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_as_rank, args=(train, nprocs, port), nprocs=nprocs)


def _as_rank(rank: int, train, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train()
