"""SIDCo: a threshold from a fitted statistical model of ``|a|`` (Abdelmoniem et al., MLSys 2021)."""

from __future__ import annotations

import math

import torch

from .threshold import above
from .topk import TopK


def sidco_threshold(acc: torch.Tensor, ratio: float, stages: int) -> float:
    """Multi-stage exponential fit (SIDCo-E) of the threshold that about ``ratio * N`` of ``|acc|``
    exceed.

    Stage 1 fits an exponential to ``|a|`` by maximum likelihood (scale = mean) and takes the
    threshold ``eta_1 = -mean * ln(r)`` that a fraction ``r = ratio ** (1 / stages)`` exceeds. Each
    later stage fits an exponential to the exceedances ``|a| - eta`` over the previous threshold
    (peaks over threshold, again scale = their mean) and moves the threshold by ``-mean * ln(r)``, so
    the fractions multiply to ``ratio``. Fitting the tail in stages corrects the single exponential's
    error on heavier- or lighter-tailed gradients. Non-finite values are left out of the fit.
    """
    mag = acc.abs().float()
    mag = mag[torch.isfinite(mag)]
    r = ratio ** (1.0 / stages)
    eta = 0.0
    for _ in range(stages):  # mag holds the values above eta (all of them at the first stage)
        if mag.numel() == 0:
            break
        scale = float((mag - eta).mean())
        if scale <= 0:
            break
        eta -= scale * math.log(r)
        mag = mag[mag > eta]
    return eta


class SIDCo(TopK):
    """Each worker sends ``|a| >= eta``, where ``eta`` is estimated from its own ``|a|`` by
    :func:`sidco_threshold` so that about ``k = int(d * N)`` elements pass. Thresholds differ
    between workers; the union is sent (build-up is possible). Departures from the paper: only the
    exponential family (SIDCo-E; the paper also fits gamma and generalized Pareto) and a fixed
    number of stages (the paper adapts it from the observed ratio)."""

    name = "sidco"

    def __init__(self, density: float, stages: int = 2) -> None:
        super().__init__(density)
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive int, got {stages!r}")
        self.stages = stages

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        if self.density >= 1.0:
            return torch.arange(acc.numel(), dtype=torch.int64, device=acc.device)
        return above(acc, sidco_threshold(acc, self.density, self.stages))
