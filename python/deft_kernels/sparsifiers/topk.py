"""Top-k: every worker selects the ``k`` largest magnitudes of its whole accumulated gradient."""

from __future__ import annotations

import torch

from .. import ops
from ..layouts import offsets_of
from .base import Sparsifier


class TopK(Sparsifier):
    """Global top-k per worker; the union of the workers' sets grows with ``n`` (build-up: up to
    ``n * k`` indices), and every worker scans all ``N`` elements whatever ``n`` is."""

    name = "topk"

    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        return torch.tensor(offsets_of(sizes), dtype=torch.int64)

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        whole = torch.tensor([0, acc.numel()], dtype=torch.int64, device=acc.device)
        k = torch.tensor([self.budget(acc.numel())], dtype=torch.int64, device=acc.device)
        return ops.segmented_topk(acc, whole, k, validate=False)
