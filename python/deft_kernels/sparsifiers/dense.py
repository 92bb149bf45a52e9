"""Dense: plain all-reduce of the gradient, averaged; no selection and no residual."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .base import Sparsifier, StepStats, _Clock, _rank_and_size


class Dense(Sparsifier):
    """The baseline every sparsifier is compared with: ``mean over workers of g``."""

    name = "dense"

    def __init__(self, density: float = 1.0) -> None:
        super().__init__(density)

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return torch.arange(acc.numel(), dtype=torch.int64, device=acc.device)

    def step(self, grad: torch.Tensor, *, sizes: Sequence[int] | None = None,
             group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, StepStats]:
        """All-reduce of ``grad`` divided by the world size; the residual stays ``None``."""
        rank, world_size = _rank_and_size(group, grad)
        self._check_step_input(grad, sizes, world_size)
        clock = _Clock(grad.device)
        clock.mark()
        out = grad.to(torch.float32, copy=True)  # fp32 sum, one rounding back; never reduce into grad
        if world_size > 1:
            dist.all_reduce(out, group=group)
        clock.mark()
        out = (out / world_size).to(grad.dtype)
        self.step_count += 1
        clock.mark()
        t_comm, t_other = clock.intervals()
        n = grad.numel()
        return out, StepStats(selected=n, sent=n, numel=n, bytes_sent=4 * n, t_select=0.0, t_comm=t_comm,
                              t_other=t_other)
