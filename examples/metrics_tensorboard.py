"""The hook's figures in TensorBoard, through ``torch.utils.tensorboard.SummaryWriter``.

    pip install tensorboard
    python examples/metrics_tensorboard.py [LOG_DIR]     # spawns 2 CPU processes; LOG_DIR: runs/deft
    tensorboard --logdir LOG_DIR                          # one run per rank

Same task as examples/ddp_hook.py; every figure is a scalar under ``deft/`` (totals) and
``deft/bucket<i>/`` (per bucket), at the hook's iteration.
"""

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter

from _common import gloo_process_group, launch, report, task
from deft_kernels import DeftState
from deft_kernels.metrics import Metrics, TensorBoardSink


def train(log_dir: Path) -> None:
    with gloo_process_group() as rank:
        model, batches = task(rank)
        model = DDP(model)
        state = DeftState(sparsifier="deft", density=0.01)
        metrics = Metrics(state, sinks=[TensorBoardSink(SummaryWriter(log_dir=str(log_dir / f"rank{rank}")))])
        model.register_comm_hook(state, metrics.hook)

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with metrics:  # closes the writer
            for step, (x, y) in enumerate(batches):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                report(rank, step, loss)


if __name__ == "__main__":
    launch(functools.partial(train, Path(sys.argv[1] if len(sys.argv) > 1 else "runs/deft")))
