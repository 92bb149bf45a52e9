"""Hard threshold: every worker sends the indices whose magnitude reaches a fixed threshold."""

from __future__ import annotations

import math

import torch

from .base import Sparsifier, indices_at_least


class HardThreshold(Sparsifier):
    """Every worker proposes the indices with ``|a| >= threshold``; union, all-reduce. The density
    sent depends on the gradients alone and is unpredictable: ``density`` is recorded (it names the
    run in ``state_dict``) but plays no part in the selection.

    ``threshold`` must be a positive finite number.
    """

    name = "threshold"

    def __init__(self, threshold: float, density: float = 1.0, *,
                 residual_dtype: torch.dtype | None = None) -> None:
        if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                or not math.isfinite(threshold) or threshold <= 0):
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
        super().__init__(density, residual_dtype)
        self.threshold = float(threshold)

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return indices_at_least(acc, self.threshold, kernels=self.kernels)

    def extra_state(self) -> dict:
        return {"threshold": self.threshold}

    def load_extra_state(self, state: dict) -> None:
        if state.get("threshold") != self.threshold:
            raise ValueError(f"state is for threshold {state.get('threshold')!r}, this is {self.threshold}")
