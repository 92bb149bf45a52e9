"""Pieces shared by the two integrations (the DDP hook in ``deft_kernels.hook`` and the plain API in
``deft_kernels.training``): argument checks, building a sparsifier from a name or a factory, and the
running compression statistics. Both run their steps with :mod:`deft_kernels.driver`.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict
from typing import Any, Callable, Union

import torch
import torch.distributed as dist

from . import driver
from .sparsifiers.base import Sparsifier, StepStats

SparsifierSpec = Union[str, Callable[..., Sparsifier]]


def check_density(density: Any) -> float:
    """``density`` as a float in (0, 1], or a ``ValueError``/``TypeError`` naming the argument."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    return float(density)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_group(name: str, group: Any) -> None:
    """``group`` must be ``None`` (the default group) or a ``torch.distributed.ProcessGroup``."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be None or a torch.distributed.ProcessGroup, got {type(group).__name__}")


def check_sparsifier_spec(sparsifier: Any) -> SparsifierSpec:
    """A registered name (``deft_kernels.sparsifiers.SPARSIFIERS``) or a callable, else an error."""
    from . import sparsifiers

    if isinstance(sparsifier, str):
        if sparsifier.lower() not in sparsifiers.SPARSIFIERS:
            known = ", ".join(sorted(sparsifiers.SPARSIFIERS))
            raise ValueError(f"sparsifier must be one of ({known}) or a factory, got {sparsifier!r}")
        return sparsifier.lower()
    if callable(sparsifier):
        return sparsifier
    raise TypeError(f"sparsifier must be a name or a callable factory(density, **kwargs), "
                    f"got {type(sparsifier).__name__}")


def make_sparsifier(spec: SparsifierSpec, density: float, kwargs: dict[str, Any]) -> Sparsifier:
    """A new sparsifier: ``sparsifiers.build(name, density, **kwargs)`` for a name, else
    ``spec(density, **kwargs)`` (a ``Sparsifier`` subclass is such a factory)."""
    from . import sparsifiers

    sp = sparsifiers.build(spec, density, **kwargs) if isinstance(spec, str) else spec(density, **kwargs)
    if not isinstance(sp, Sparsifier):
        raise TypeError(f"sparsifier factory must return a deft_kernels Sparsifier, got {type(sp).__name__}")
    return sp


def check_grad_scaler(scaler: Any) -> torch.amp.GradScaler | None:
    """``scaler`` must be ``None`` or a ``torch.amp.GradScaler`` (``torch.cuda.amp.GradScaler`` is one)."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be None or a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler


def loss_scale(scaler: torch.amp.GradScaler | None) -> float | None:
    """The scale the gradients of this backward carry (``None``: none, or a disabled scaler). On CUDA
    ``get_scale()`` reads it on the host: once per iteration, where the scaler's own ``step`` reads
    its inf flag anyway."""
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


def world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_checkpoint(saved: dict[str, Any], group: dist.ProcessGroup | None, density: float) -> None:
    """A checkpoint holds one rank's residuals: refuse one saved by another rank or world size, or
    with another density."""
    rank, n = world(group)
    if (saved.get("rank"), saved.get("world_size")) != (rank, n):
        raise ValueError(f"state_dict was saved by rank {saved.get('rank')} of {saved.get('world_size')} but is "
                         f"loaded on rank {rank} of {n}: every rank must load the file it saved itself")
    if saved.get("density") != density:
        raise ValueError(f"state_dict was saved with density {saved.get('density')}, this one has {density}")


class CompressionLog:
    """Running totals of the ``StepStats`` of the sparse steps (warm-up steps are not counted)."""

    def __init__(self) -> None:
        self.steps = 0
        self.totals = {"selected": 0, "sent": 0, "numel": 0, "bytes_sent": 0, "bytes_received": 0,
                       "t_select": 0.0, "t_comm": 0.0, "t_other": 0.0}

    def record(self, step_stats: list[StepStats]) -> None:
        """Add one sparse step: the stats of each of its sparsifiers (one per bucket or dtype group)."""
        self.steps += 1
        for stats in step_stats:
            for key, value in asdict(stats).items():
                self.totals[key] += value

    def summary(self) -> dict[str, float]:
        """Totals over every sparse step so far, plus ``density`` (sent / numel) and ``compress_rate``
        (numel / sent, PowerSGD's name; ``inf`` when nothing was sent)."""
        out: dict[str, float] = dict(self.totals, steps=self.steps)
        out["density"] = out["sent"] / out["numel"] if out["numel"] else 0.0
        out["compress_rate"] = out["numel"] / out["sent"] if out["sent"] else float("inf")
        return out
