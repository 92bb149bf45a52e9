"""Hard threshold: every worker sends the elements with ``|a| >= lambda``."""

from __future__ import annotations

import math

import torch

from .topk import TopK


def above(acc: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of ``|acc| >= threshold`` in ascending order; NaN counts as above every threshold (the
    package's NaN policy: a NaN gradient is always sent, where the user's check sees it)."""
    mag = acc.abs()
    return torch.nonzero((mag >= threshold) | torch.isnan(mag)).flatten()


class HardThreshold(TopK):
    """Fixed threshold ``lambda`` (``threshold``): each worker proposes ``|a| >= lambda``; the union
    is sent. The density sent is whatever the data makes it: ``density`` is only recorded (it is not
    used to select), so compare ``StepStats.density`` with it."""

    name = "threshold"

    def __init__(self, density: float, threshold: float | None = None) -> None:
        super().__init__(density)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number (lambda > 0), got {threshold!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {threshold!r}")
        self.threshold = float(threshold)

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return above(acc, self.threshold)
