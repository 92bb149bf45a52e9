"""DEFT in a custom training loop without DDP: ``GradientSparsifier.step()`` between ``backward()``
and ``optimizer.step()``.

    torchrun --nproc_per_node=2 examples/plain_loop.py   # or: python examples/plain_loop.py (spawns 2)

Same task as examples/ddp_hook.py; every rank builds the same initial model from the same seed.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import deft_kernels


def train(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial model on every rank: nothing broadcasts it here
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    teacher = torch.randn(32, 4)
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    # README snippet: the plain loop.
    sparsifier = deft_kernels.GradientSparsifier(model, sparsifier="deft", density=0.01, warmup_steps=10)
    for step in range(60):
        x = torch.randn(64, 32, generator=data)
        y = (x @ teacher).argmax(dim=1)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        sparsifier.step()  # p.grad <- mean over workers of the sparsified gradient
        optimizer.step()
        if rank == 0 and step in (0, 59):
            print(f"step {step} loss {loss.item():.4f}")
    if rank == 0:
        print(f"density sent {sparsifier.compression_stats()['density']:.4f}")


def main(rank: int, world_size: int, port: int | None) -> None:
    if port is None:
        dist.init_process_group("gloo")  # torchrun sets the rendezvous variables
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        train(rank, world_size)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        mp.spawn(main, args=(2, free_port), nprocs=2)
