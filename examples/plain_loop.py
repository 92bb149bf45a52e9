"""DEFT in a custom training loop without DDP: ``GradientSparsifier.step()`` between ``backward()``
and ``optimizer.step()``.

    torchrun --nproc_per_node=2 examples/plain_loop.py   # or: python examples/plain_loop.py (spawns 2)

Same task as examples/ddp_hook.py; every rank builds the same initial model from the same seed.
"""

import torch
import torch.nn.functional as F

import deft_kernels
from _common import gloo_process_group, launch, report, task


def train() -> None:
    with gloo_process_group() as rank:
        model, batches = task(rank)  # the same initial model on every rank: nothing broadcasts it here
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        # README snippet: the plain loop.
        sparsifier = deft_kernels.GradientSparsifier(model, sparsifier="deft", density=0.01, warmup_steps=10)
        for step, (x, y) in enumerate(batches):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            sparsifier.step()  # p.grad <- mean over workers of the sparsified gradient
            optimizer.step()
            report(rank, step, loss)
        if rank == 0:
            print(f"density sent {sparsifier.compression_stats()['density']:.4f}")


if __name__ == "__main__":
    launch(train)
