"""CLT-k, cyclic local top-k (ScaleCom, Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from .topk import TopK


class CLTK(TopK):
    """The leader (``step % n``) selects the top ``k`` of its own accumulated gradient and broadcasts
    the indices; every worker sends its values there. No build-up (exactly ``k`` indices), but the
    leader scans all ``N`` elements while the others wait: the selection cost does not fall with ``n``.
    """

    name = "cltk"
    gathers_selection = False  # the plan carries every index

    def plan(self, acc, norms, offsets, world_size, step) -> torch.Tensor:
        return super().select(acc, norms, offsets, None, 0, world_size, step).cpu()

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=acc.device)

    def always_sent(self, plan, device) -> torch.Tensor:
        return plan.to(device)
