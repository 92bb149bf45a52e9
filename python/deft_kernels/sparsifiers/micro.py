"""MiCRO: exclusive partitions and a steered threshold, no top-k (Abdelmoniem et al., HiPC 2023)."""

from __future__ import annotations

import math

import torch

from .sidco import sidco_threshold
from .threshold import above
from .topk import TopK


def partition_bounds(numel: int, world_size: int, part: int) -> tuple[int, int]:
    """``[lo, hi)`` of partition ``part`` of ``world_size`` nearly equal contiguous partitions."""
    q, r = divmod(numel, world_size)
    lo = part * q + min(part, r)
    return lo, lo + q + (1 if part < r else 0)


class MiCRO(TopK):
    """The flat vector is cut into ``n`` exclusive contiguous partitions; worker ``rank`` takes
    partition ``(step + rank) % n`` and proposes ``|a| >= eta`` there only (no top-k, no sort), so
    the union has no duplicates and each worker scans ``N / n`` elements.

    One threshold ``eta`` is shared by all workers. At the first step the leader estimates it from
    its own ``|a|`` (SIDCo's two-stage exponential fit,
    :func:`~deft_kernels.sparsifiers.sidco.sidco_threshold`) and broadcasts it in the plan. After
    every step each worker scales it from the global sent count, the same on every worker, by the step an exponential tail would need:
    with ``r = clip(sent / k, 1/8, 8)``, ``eta *= max(1/2, 1 + gain * ln(r) / max(1, ln(1/d)))``.
    (Under an exponential tail the count is ``N exp(-eta / beta)`` and ``eta = beta ln(1/d)`` at the
    target, so ``ln(r) / ln(1/d)`` is the relative move that lands on ``k``; ``gain`` (default 1/2)
    damps it, which keeps Gaussian-like tails, steeper than exponential, from oscillating.)
    """

    name = "micro"

    def __init__(self, density: float, gain: float = 0.5) -> None:
        super().__init__(density)
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain <= 1:
            raise ValueError(f"gain must lie in (0, 1], got {gain!r}")
        self.gain = float(gain)
        self.threshold: float | None = None

    def reset(self) -> None:
        super().reset()
        self.threshold = None

    def plan(self, acc, norms, offsets, world_size, step) -> float:
        if self.threshold is not None:
            return self.threshold
        return sidco_threshold(acc, self.density, 2) if self.density < 1 else 0.0

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        self.threshold = plan
        self._k = max(1, self.budget(acc.numel()))
        lo, hi = partition_bounds(acc.numel(), world_size, (step + rank) % world_size)
        return above(acc[lo:hi], plan) + lo

    def observe(self, sent: int, world_size: int) -> None:
        ratio = min(8.0, max(0.125, sent / self._k))
        move = self.gain * math.log(ratio) / max(1.0, math.log(1.0 / self.density))
        self.threshold = self.threshold * max(0.5, 1.0 + move)
        if not math.isfinite(self.threshold):
            raise FloatingPointError(f"MiCRO threshold became {self.threshold}")

    def extra_state(self) -> dict:
        return {"threshold": self.threshold}

    def load_extra_state(self, state: dict) -> None:
        self.threshold = state["threshold"]
