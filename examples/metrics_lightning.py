"""The hook's figures through Lightning's ``self.log``, to whatever logger the Trainer has.

    python examples/metrics_lightning.py [LOG_DIR]    # Lightning starts the 2 CPU processes; LOG_DIR: lightning_logs

Same task and hook registration as examples/lightning_ddp.py, with ``Metrics.hook`` in place of
``deft_hook``; the module logs the latest figures after each batch (a CSVLogger here; TensorBoard's
logger or any other takes the same calls).
"""

import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from _common import end_process_group, report, task
from deft_kernels import DeftState
from deft_kernels.metrics import Metrics


class ToyTask(L.LightningModule):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.model, _ = task(0)
        self.metrics = metrics

    def train_dataloader(self):
        return DataLoader(task(self.global_rank)[1], batch_size=None)

    def training_step(self, batch, step):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        report(self.global_rank, step, loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # README snippet: the figures through self.log (the hook records them during backward).
        if self.metrics.latest is not None:
            self.log_dict(self.metrics.latest.scalars(), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class CommHookOnCPU(L.Callback):
    """Registers the hook where Lightning does not (any device but CUDA; see examples/lightning_ddp.py)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type != "cuda":
            trainer.strategy.model.register_comm_hook(self.metrics.state, self.metrics.hook)


def main(log_dir: str) -> None:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    state = DeftState(sparsifier="deft", density=0.01)
    metrics = Metrics(state)
    strategy = DDPStrategy(ddp_comm_hook=metrics.hook, ddp_comm_state=state)
    trainer = L.Trainer(accelerator=accelerator, devices=2, strategy=strategy, callbacks=[CommHookOnCPU(metrics)],
                        max_epochs=1, use_distributed_sampler=False, logger=CSVLogger(log_dir), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ToyTask(metrics))
    del trainer, strategy
    end_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1] if len(sys.argv) > 1 else "lightning_logs")
