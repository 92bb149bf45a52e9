"""DEFT as a DDP communication hook: one line turns it on.

    torchrun --nproc_per_node=2 examples/ddp_hook.py     # or: python examples/ddp_hook.py (spawns 2)

Trains a small MLP (75k parameters) on a synthetic classification task with 2 CPU processes (gloo),
sending 1% of the gradient per step after 10 dense warm-up steps; prints the first and last loss.
"""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _common import gloo_process_group, launch, report, task
from deft_kernels import DeftState, deft_hook


def train() -> None:
    with gloo_process_group() as rank:
        model, batches = task(rank)

        # README snippet: the one line that turns DEFT on (after wrapping in DDP, before training).
        model = DDP(model)
        model.register_comm_hook(DeftState(sparsifier="deft", density=0.01), deft_hook)

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step, (x, y) in enumerate(batches):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            report(rank, step, loss)


if __name__ == "__main__":
    launch(train)
