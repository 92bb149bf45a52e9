"""SIDCo: a threshold from a fitted statistical model of the gradient magnitudes (Abdelmoniem et
al., "An Efficient Statistical-based Gradient Compression Technique for Distributed Training
Systems", MLSys 2021).

What is implemented (``SIDCo.estimate_threshold``), with ``x = |a|`` over the finite elements and
the target ratio ``d`` split into ``M`` stages of ratio ``r = d ** (1 / M)`` each:

1. **Stage 1** fits a model to all of ``x`` and takes its upper ``r``-quantile as threshold ``eta``:

   - ``"exponential"`` (SIDCo-E): maximum likelihood, scale ``beta = mean(x)``;
     ``eta = beta * ln(1 / r)``.
   - ``"gamma"`` (SIDCo-P): method of moments, shape ``mu**2 / var``, scale ``var / mu``; the quantile
     by bisection on the regularised upper incomplete gamma function.
   - ``"gpareto"`` (SIDCo-GP): generalised Pareto by moments (below).

2. **Stages 2..M** fit the exceedances ``y = x[x > eta] - eta`` with a generalised Pareto
   distribution by the method of moments (``xi = (1 - mu**2 / var) / 2``,
   ``sigma = mu * (mu**2 / var + 1) / 2``; Hosking and Wallis 1987) and raise ``eta`` by its upper
   ``r``-quantile ``sigma / xi * (r ** -xi - 1)`` (``sigma * ln(1 / r)`` when ``xi`` is 0). The
   exceedances of a high threshold are close to generalised Pareto whatever the parent law
   (Pickands-Balkema-de Haan), which is why later stages switch to it. A stage with fewer than two
   exceedances, or with all exceedances equal, ends the fit early.

About ``d * N`` elements then pass ``|a| >= eta`` on each worker; where ``d * N < 1`` the target
is the budget's floor of one element (``d`` is replaced by ``K / N``, :meth:`Sparsifier.budget`).
At ``d = 1`` every element is proposed, zeros included, as Dense sends them. ``stages=None``
picks the fewest stages whose ratio is at least 0.1 (``d = 1%`` gives two stages of 10%), so no
single fit has to reach far into its tail. The paper also adapts the stage count online from the
achieved ratio; this implementation keeps it fixed. Selection is local (no plan); the union across
workers grows with ``n`` like Top-k's.
"""

from __future__ import annotations

import math

import torch

from ..transfer import to_host
from .base import Sparsifier, indices_at_least

FIRST_STAGE_FITS = ("exponential", "gamma", "gpareto")
_MIN_STAGE_RATIO = 0.1


class SIDCo(Sparsifier):
    """Multi-stage statistical threshold estimation (see the module docstring for the exact fit).

    ``first_stage`` is one of ``"exponential"``, ``"gamma"``, ``"gpareto"``; ``stages`` a positive
    int or ``None`` (automatic: the fewest stages of ratio at least 0.1).
    """

    name = "sidco"

    def __init__(self, density: float, first_stage: str = "exponential", stages: int | None = None, *,
                 residual_dtype: torch.dtype | None = None) -> None:
        super().__init__(density, residual_dtype)
        if first_stage not in FIRST_STAGE_FITS:
            raise ValueError(f"first_stage must be one of {list(FIRST_STAGE_FITS)}, got {first_stage!r}")
        if stages is not None and (not isinstance(stages, int) or isinstance(stages, bool) or stages < 1):
            raise ValueError(f"stages must be a positive int or None, got {stages!r}")
        self.first_stage = first_stage
        if stages is None:
            stages = 1 if self.density >= 1.0 else max(1, math.ceil(math.log(self.density) / math.log(_MIN_STAGE_RATIO) - 1e-9))
        self.stages = stages

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        if self.budget(acc.numel()) >= acc.numel():  # d = 1: everything, zeros included, as Dense
            return torch.arange(acc.numel(), dtype=torch.int64, device=acc.device)
        return indices_at_least(acc, self.estimate_threshold(acc), kernels=self.kernels)

    def estimate_threshold(self, values: torch.Tensor) -> float:
        """The threshold ``eta`` such that about ``density * len(values)`` of ``|values|`` reach it,
        and at least one (the budget's floor, :meth:`budget`), ``inf`` when every finite value is
        zero."""
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise TypeError("values must be a float tensor")
        x = values.detach().abs().float().flatten()
        finite = torch.isfinite(x)
        if not to_host(finite.all())[0].item():
            x = x[finite]
        numel = values.numel()
        target = max(self.density, self.budget(numel) / numel) if numel else self.density
        if target >= 1.0:
            return 0.0
        ratio = target ** (1.0 / self.stages)
        eta = _first_stage(x, ratio, self.first_stage)
        for _ in range(self.stages - 1):
            if not math.isfinite(eta):
                break
            excess = x[x > eta] - eta
            step_up = _gpareto_quantile(excess, ratio) if excess.numel() >= 2 else None
            if step_up is None:
                break
            eta += step_up
        return eta

    def extra_state(self) -> dict:
        return {"first_stage": self.first_stage, "stages": self.stages}

    def load_extra_state(self, state: dict) -> None:
        if (state.get("first_stage"), state.get("stages")) != (self.first_stage, self.stages):
            raise ValueError(f"state is for first_stage={state.get('first_stage')!r}, stages={state.get('stages')!r}; "
                             f"this is first_stage={self.first_stage!r}, stages={self.stages}")


def _moments(x: torch.Tensor) -> tuple[float, float]:
    var, mean = torch.var_mean(x, correction=0)
    mean, var = to_host(torch.stack([mean, var]))[0].tolist()
    return mean, var


def _first_stage(x: torch.Tensor, ratio: float, fit: str) -> float:
    if x.numel() == 0:
        return math.inf
    mu, var = _moments(x)
    if mu <= 0:
        return math.inf  # all zeros: nothing worth sending
    if fit == "exponential":
        return mu * math.log(1.0 / ratio)
    if var <= 0:
        return mu  # one magnitude only: no threshold tells the elements apart
    if fit == "gamma":
        return _gamma_upper_quantile(mu * mu / var, var / mu, ratio)
    return _gpareto_quantile(x, ratio)


def _gpareto_quantile(y: torch.Tensor, ratio: float) -> float | None:
    """Upper ``ratio``-quantile of a generalised Pareto fitted to ``y`` (>= 0) by moments; ``None``
    when the fit is degenerate (all equal)."""
    mu, var = _moments(y)
    if var <= 0 or mu <= 0:
        return None
    m2 = mu * mu / var
    xi = 0.5 * (1.0 - m2)
    sigma = 0.5 * mu * (m2 + 1.0)
    if abs(xi) < 1e-9:
        return sigma * math.log(1.0 / ratio)
    return sigma / xi * (ratio ** (-xi) - 1.0)


def _gamma_upper_quantile(shape: float, scale: float, ratio: float) -> float:
    """``x`` with ``P(X > x) = ratio`` for a gamma law, by bisection on ``gammaincc`` (float64)."""
    alpha = torch.tensor(shape, dtype=torch.float64)

    def tail(t: float) -> float:
        return float(torch.special.gammaincc(alpha, torch.tensor(t, dtype=torch.float64)))

    lo, hi = 0.0, max(1.0, shape)
    while tail(hi) > ratio:
        lo, hi = hi, 2.0 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) > ratio else (lo, mid)
    return scale * 0.5 * (lo + hi)
