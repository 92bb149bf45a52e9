"""Top-k: every worker selects the ``k`` largest magnitudes of its whole accumulated gradient."""

from __future__ import annotations

import torch

from .base import Sparsifier


class TopK(Sparsifier):
    """Global top-k per worker; the union of the workers' sets grows with ``n`` (build-up: up to
    ``n * k`` indices), and every worker scans all ``N`` elements whatever ``n`` is."""

    name = "topk"

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return self.top_k_of_all(acc)

    def top_k_of_all(self, acc: torch.Tensor) -> torch.Tensor:
        """Indices of the ``budget(N)`` largest magnitudes of the whole vector, ascending."""
        whole = torch.tensor([0, acc.numel()], dtype=torch.int64)  # host metadata next to the values
        k = torch.tensor([self.budget(acc.numel())], dtype=torch.int64)
        return self.kernels.segmented_topk(acc, whole, k)
