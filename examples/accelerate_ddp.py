"""DEFT with Hugging Face Accelerate: the hook registered on the model that ``prepare`` wrapped.

    torchrun --nproc_per_node=2 examples/accelerate_ddp.py    # or: python examples/accelerate_ddp.py (spawns 2)
    accelerate launch --num_processes 2 examples/accelerate_ddp.py   # on GPUs

Same task as examples/ddp_hook.py. ``DistributedDataParallelKwargs(comm_hook=...)`` takes only
Accelerate's built-in hooks (fp16, bf16, PowerSGD), so DEFT's is registered on the
``DistributedDataParallel`` module that ``accelerator.prepare`` returns, before the first backward.
"""

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel as DDP

from _common import launch, report, task
from deft_kernels import DeftState, deft_hook


def train() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank = accelerator.process_index
    model, batches = task(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)

    # README snippet: DEFT in Accelerate.
    state = DeftState(sparsifier="deft", density=0.01)
    if isinstance(model, DDP):  # one process: nothing to communicate
        model.register_comm_hook(state, deft_hook)

    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x.to(accelerator.device)), y.to(accelerator.device))
        accelerator.backward(loss)
        optimizer.step()
        report(rank, step, loss)
    accelerator.wait_for_everyone()
    if rank == 0:
        print(f"sparse steps {state.compression_stats()['steps']}, density sent {state.compression_stats()['density']:.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    launch(train)
