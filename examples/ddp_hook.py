"""DEFT as a DDP communication hook: one line turns it on.

    torchrun --nproc_per_node=2 examples/ddp_hook.py     # or: python examples/ddp_hook.py (spawns 2)

Trains a small MLP (75k parameters) on a synthetic classification task with 2 CPU processes (gloo),
sending 1% of the gradient per step after 10 dense warm-up steps; prints the first and last loss.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook


def train(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial model on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    teacher = torch.randn(32, 4)
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches

    # README snippet: the one line that turns DEFT on (after wrapping in DDP, before training).
    model = DDP(model)
    model.register_comm_hook(DeftState(sparsifier="deft", density=0.01), deft_hook)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(60):
        x = torch.randn(64, 32, generator=data)
        y = (x @ teacher).argmax(dim=1)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0 and step in (0, 59):
            print(f"step {step} loss {loss.item():.4f}")


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
