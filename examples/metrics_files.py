"""The hook's figures to a callback, a CSV file and a JSONL file: standard library only.

    python examples/metrics_files.py [OUT_DIR]      # spawns 2 CPU processes; OUT_DIR: deft_metrics
    torchrun --nproc_per_node=2 examples/metrics_files.py [OUT_DIR]

Same task as examples/ddp_hook.py. Each rank writes OUT_DIR/rank<r>.csv (a row per bucket and a
row of totals per step) and OUT_DIR/rank<r>.jsonl (a line per step); rank 0's callback prints the
figures every 10 steps. docs/operations.md says what each figure means.
"""

import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from _common import gloo_process_group, launch, report, task
from deft_kernels import DeftState
from deft_kernels.metrics import CsvSink, JsonlSink, Metrics, StepMetrics


def watch(m: StepMetrics) -> None:
    """A callback: any callable taking a StepMetrics."""
    if m.rank == 0 and m.step % 10 == 9:
        ratio = "" if math.isnan(m.residual_ratio) else f", residual/gradient {m.residual_ratio:.2f}"
        print(f"step {m.step} {m.phase}: density sent {m.density_sent:.4f}, {m.bytes_sent} B sent, "
              f"{m.bytes_received} B received, exposed {1e3 * m.exposed:.1f} ms{ratio}", flush=True)


def train(out_dir: Path) -> None:
    with gloo_process_group() as rank:
        model, batches = task(rank)
        model = DDP(model)
        # README snippet: the figures an operator watches.
        state = DeftState(sparsifier="deft", density=0.01)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = Metrics(state, sinks=[watch, CsvSink(out_dir / f"rank{rank}.csv"),
                                        JsonlSink(out_dir / f"rank{rank}.jsonl")])
        model.register_comm_hook(state, metrics.hook)  # in place of deft_hook

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with metrics:  # closes the files
            for step, (x, y) in enumerate(batches):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                report(rank, step, loss)


if __name__ == "__main__":
    launch(functools.partial(train, Path(sys.argv[1] if len(sys.argv) > 1 else "deft_metrics")))
