"""DEFT in PyTorch Lightning: the DDP strategy's communication-hook arguments.

    python examples/lightning_ddp.py    # Lightning starts the 2 CPU processes itself

Same task as examples/ddp_hook.py. Lightning's ``DDPStrategy`` registers ``ddp_comm_hook`` only
when the device is CUDA (lightning 2.6: ``DDPStrategy._register_ddp_hooks``); on CPU it would
silently train with plain all-reduce, so ``CommHookOnCPU`` registers the hook there.
"""

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from _common import end_process_group, report, task
from deft_kernels import DeftState, deft_hook


class ToyTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model, _ = task(0)  # the same initial model on every rank

    def train_dataloader(self):
        # This rank's own batches, as they are (batch_size=None: no re-batching).
        return DataLoader(task(self.global_rank)[1], batch_size=None)

    def training_step(self, batch, step):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        report(self.global_rank, step, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class CommHookOnCPU(L.Callback):
    """Registers the hook on the DDP-wrapped model where Lightning does not (any device but CUDA)."""

    def __init__(self, state: DeftState) -> None:
        self.state = state

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type != "cuda":
            trainer.strategy.model.register_comm_hook(self.state, deft_hook)


def main() -> None:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    # README snippet: DEFT in Lightning.
    state = DeftState(sparsifier="deft", density=0.01)
    strategy = DDPStrategy(ddp_comm_hook=deft_hook, ddp_comm_state=state)
    trainer = L.Trainer(accelerator=accelerator, devices=2, strategy=strategy, callbacks=[CommHookOnCPU(state)],
                        max_epochs=1, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ToyTask())
    if trainer.global_rank == 0:
        print(f"sparse steps {state.compression_stats()['steps']}, density sent {state.compression_stats()['density']:.4f}")
    del trainer, strategy
    end_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
