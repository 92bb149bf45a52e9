"""CLT-k, cyclic local top-k (ScaleCom, Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from .topk import TopK


class CLTK(TopK):
    """The leader ``step % n`` selects the top ``k`` of its own accumulated gradient and broadcasts
    the indices in the plan; every worker all-reduces its values there. No all-gather and no
    build-up (exactly ``k`` indices are sent), but the leader scans all ``N`` elements while the
    others wait."""

    name = "cltk"
    gathers_selection = False

    def plan(self, acc, norms, offsets, world_size, step) -> torch.Tensor:
        return self.top_k_of_all(acc).cpu()  # plans cross the wire pickled: CPU only

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=acc.device)

    def always_sent(self, plan, device) -> torch.Tensor | None:
        return plan.to(device)
