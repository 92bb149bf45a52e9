"""MiCRO: exclusive partitions and a steered threshold, no top-k at all (Yoon and Oh, HiPC 2023).

The exact rule implemented here:

- **Partitions.** The flat vector is cut into ``n`` contiguous, nearly equal partitions
  (:func:`deft_kernels.planning.partition_offsets`, ignoring parameter boundaries). Worker ``rank``
  takes partition ``p = (step + rank) % n`` and proposes the indices there with
  ``|a| >= threshold[p]``. Partitions are exclusive, so the union has no duplicates.
- **One threshold per partition**, held identically by every worker. The leader's plan carries them
  to everyone (so all workers agree even after a restore). A partition whose threshold is not yet
  positive (the first step, or a partition that was all zeros) starts at the exponential-model
  quantile of the leader's own data there: ``mean(|a_p|) * ln(1 / d)``.
- **Steering.** After the exchange every worker counts, in the global index set, the ``c_p`` indices
  of each partition and moves its threshold toward the partition's share of the budget,
  ``t_p = k * size_p / N``, by the factor ``1 + gain * ln(c_p / t_p) / ln(size_p / t_p)``, clamped
  to ``[1 / max_scale, max_scale]`` (``1 / max_scale`` when ``c_p`` is 0). With ``gain = 1`` that
  factor is the Newton step for an exponential tail (there ``c = size * exp(-threshold / beta)`` and
  ``threshold ~= beta * ln(size / t)``, so it would land on ``t`` in one step); the default
  ``gain = 0.5`` takes half of it, because error feedback piles the unsent magnitudes up just below
  the threshold and the full step oscillates (measured: counts swinging 40..1800 around a target of
  200 on Laplace gradients, against 160..270 at 0.5). The global set is the same on every worker,
  so the thresholds stay in agreement without extra communication.

The target ``k`` is :meth:`~deft_kernels.sparsifiers.base.Sparsifier.budget` (at least 1). At
``d = 1`` every worker proposes its whole partition, zeros included, so everything is sent, as
Dense sends it (a threshold of 0 would leave out the zeros of the partition's owner, whose
index other workers may need).
"""

from __future__ import annotations

import math

import torch

from .. import planning
from ..transfer import to_host
from .base import Sparsifier, indices_at_least


class MiCRO(Sparsifier):
    """Partitioned threshold selection with a per-partition threshold steered toward ``k / n``
    (see the module docstring for the exact rule). ``max_scale`` (> 1) bounds the change of a
    threshold in one step; ``gain`` in ``(0, 1]`` is the fraction of the Newton step taken."""

    name = "micro"
    disjoint_proposals = True

    def __init__(self, density: float, max_scale: float = 2.0, gain: float = 0.5, *,
                 residual_dtype: torch.dtype | None = None) -> None:
        super().__init__(density, residual_dtype)
        if isinstance(max_scale, bool) or not isinstance(max_scale, (int, float)) or not max_scale > 1:
            raise ValueError(f"max_scale must be a number greater than 1, got {max_scale!r}")
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain <= 1:
            raise ValueError(f"gain must lie in (0, 1], got {gain!r}")
        self.max_scale = float(max_scale)
        self.gain = float(gain)

    def reset(self) -> None:
        """Forget the residual, the step counter, the layout and the thresholds."""
        super().reset()
        self.thresholds: list[float] | None = None

    def plan(self, acc, norms, offsets, world_size, step) -> torch.Tensor:
        bounds = planning.partition_offsets(acc.numel(), world_size).tolist()
        current = list(self.thresholds or [0.0] * world_size)
        fresh = [p for p, th in enumerate(current) if not th > 0]  # also NaN
        if fresh:  # the exponential-model start, from the leader's own data: one host read
            means = []
            for p in fresh:
                part = acc[bounds[p]:bounds[p + 1]].float().abs()
                finite = torch.isfinite(part)  # a mask, not boolean indexing: no size read back on CUDA
                means.append(torch.where(finite, part, 0).sum() / finite.sum().clamp(min=1))
            for p, mean in zip(fresh, to_host(torch.stack(means))[0].tolist()):
                current[p] = mean * math.log(1.0 / self.density)
        return torch.tensor(current, dtype=torch.float64)

    def plan_wire(self, numel, offsets, world_size) -> tuple[int, torch.dtype]:
        return world_size, torch.float64

    def encode_plan(self, plan: torch.Tensor) -> torch.Tensor:
        return plan

    def decode_plan(self, wire, offsets, world_size) -> torch.Tensor:
        return wire

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        bounds = planning.partition_offsets(acc.numel(), world_size)
        p = planning.bin_of(rank, step, world_size)
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        if self.budget(acc.numel()) >= acc.numel():  # d = 1: the whole partition, zeros included
            return torch.arange(lo, hi, dtype=torch.int64, device=acc.device)
        return indices_at_least(acc, float(plan[p]), lo, hi, kernels=self.kernels)

    def observe(self, plan, sent, numel, world_size) -> None:
        bounds = planning.partition_offsets(numel, world_size)
        counts = torch.diff(torch.searchsorted(to_host(sent)[0], bounds)).tolist()
        sizes = torch.diff(bounds).tolist()
        k = self.budget(numel)
        new = []
        for th, c, size in zip(plan.tolist(), counts, sizes):
            target = k * size / numel if numel else 0.0
            if th > 0 and 0 < target < size:
                factor = 1.0 + self.gain * math.log(c / target) / math.log(size / target) if c > 0 else 0.0
                th *= min(self.max_scale, max(1.0 / self.max_scale, factor))
            new.append(th)
        self.thresholds = new

    def extra_state(self) -> dict:
        return {"thresholds": None if self.thresholds is None else list(self.thresholds),
                "max_scale": self.max_scale, "gain": self.gain}

    def load_extra_state(self, state: dict) -> None:
        th = state.get("thresholds")
        n = None if self.layout is None else self.layout.world_size
        if th is not None and (not isinstance(th, list) or len(th) != n or not all(isinstance(x, float) for x in th)):
            raise ValueError(f"state['extra']['thresholds'] must be None or {n} floats, got {th!r}")
        if (state.get("max_scale"), state.get("gain")) != (self.max_scale, self.gain):
            raise ValueError(f"state is for max_scale={state.get('max_scale')!r}, gain={state.get('gain')!r}; "
                             f"this is max_scale={self.max_scale}, gain={self.gain}")
        self.thresholds = th
