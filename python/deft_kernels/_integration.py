"""Pieces shared by the two integrations (the DDP hook in ``deft_kernels.hook`` and the plain API in
``deft_kernels.training``): argument checks, building a sparsifier from a name or a factory, and the
running compression statistics. Both run their steps with :mod:`deft_kernels.driver`.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import warnings
from dataclasses import asdict, fields
from typing import Any, Callable, Mapping, Union

import torch
import torch.distributed as dist

from . import driver
from .sparsifiers.base import Sparsifier, StepStats

SparsifierSpec = Union[str, Callable[..., Sparsifier]]


def check_density(density: Any, sparsifier: SparsifierSpec | None = None, *, stacklevel: int = 3) -> float:
    """``density`` as a float in (0, 1], or a ``ValueError``/``TypeError`` naming the argument.

    ``density=1`` with a sparsifier other than ``"dense"`` is allowed but warns (once per call site,
    Python's default for a ``UserWarning``): it sends every element at every step, as ``"dense"``
    does, with the selection work on top; a user who meant 1% wrote 1 for 0.01. ``stacklevel`` 3
    points the warning at the line that called the caller (``DeftState(...)``)."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    if float(density) == 1.0 and sparsifier != "dense":
        warnings.warn("density=1 sends every element at every step, as sparsifier='dense' does (with the selection "
                      "work on top); density is a fraction: for 1% pass density=0.01", UserWarning,
                      stacklevel=stacklevel)
    return float(density)


def _keywords(func: Callable[..., Any]) -> tuple[list[str], bool]:
    """The names ``func`` takes as keywords, in order, and whether it takes any other (``**kwargs``,
    or no signature to read)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return [], True
    return ([p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)],
            any(p.kind is p.VAR_KEYWORD for p in params))


def _closest(word: str, names: list[str]) -> str | None:
    """The name ``word`` was most likely meant to be: the same but for case, a name that holds it
    or that it holds (4 letters or more: ``warmup`` in ``warmup_steps``), else the nearest by
    ``difflib`` (ratio 0.6 or more); ``None`` when none is near."""
    low = word.lower()
    folded = {n.lower(): n for n in names}
    if low in folded:
        return folded[low]
    holding = [n for n in names if min(len(low), len(n)) >= 4 and (low in n.lower() or n.lower() in low)]
    if holding:
        return max(holding, key=lambda n: difflib.SequenceMatcher(None, low, n.lower()).ratio())
    near = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return near[0] if near else None


def check_options(spec: SparsifierSpec, kwargs: Mapping[str, Any], caller: Callable[..., Any]) -> None:
    """Refuse, with a ``TypeError``, a keyword in ``kwargs`` (the ``**sparsifier_kwargs`` of
    ``caller``, e.g. ``DeftState``) that the sparsifier ``spec`` does not take, naming the argument of
    ``caller`` or the option of the sparsifier it resembles: ``DeftState(warmup=5)`` points to
    ``warmup_steps=``. ``caller``'s own arguments are read from its signature. A factory whose
    signature takes ``**kwargs`` (or has none to read) is left to refuse for itself."""
    from . import sparsifiers

    if isinstance(spec, str):
        what, (options, any_other) = f"sparsifier {spec!r}", _keywords(sparsifiers.SPARSIFIERS[spec])
    else:
        what = f"sparsifier factory {getattr(spec, '__name__', type(spec).__name__)!r}"
        options, any_other = _keywords(spec)
    if any_other:
        return
    options = [o for o in options if o != "density"]
    mine = [a for a in _keywords(caller)[0] if a != "self"]
    name = getattr(caller, "__name__", "the caller")
    for key in kwargs:
        if key in options:
            continue
        hint = _closest(key, mine + options)
        others = [n for n, cls in sorted(sparsifiers.SPARSIFIERS.items()) if key in _keywords(cls)[0]]
        advice = (f"; did you mean {name}'s {hint}=?" if hint in mine else
                  f"; did you mean {hint}=?" if hint else
                  f"; {key}= is an option of sparsifier {', '.join(map(repr, others))}" if others else "")
        raise TypeError(f"{what} takes no keyword argument {key!r}{advice} (its options: "
                        f"{', '.join(o + '=' for o in options) or 'none'}; {name} takes "
                        f"{', '.join(a + '=' for a in mine)})")


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


#: What ``compression_stats()`` returns (``DeftState``, ``GradientSparsifier``): totals over this
#: rank's sparse steps, every bucket or dtype group summed (warm-up steps are not counted), by key
#: with its unit; docs/api.md lists them.
COMPRESSION_STATS = {
    "steps": "sparse steps (iterations) counted",
    "selected": "elements this rank proposed (StepStats.selected), summed",
    "sent": "elements in the global index sets (StepStats.sent), summed",
    "numel": "elements the steps covered: the gradient's length times the steps",
    "bytes_sent": "bytes this rank put on the wire (indices and fp32 values), summed",
    "bytes_received": "bytes it got back (the others' indices and the summed values), summed",
    "t_select": "seconds of plan and selection, summed (NaN once a step was not timed: CUDA tensors)",
    "t_comm": "seconds waiting for the collectives, summed (NaN likewise)",
    "t_other": "seconds of the rest of the steps (error feedback, union, output), summed (NaN likewise)",
    "density": "sent / numel: the fraction of the elements sent (0.01 = 1%; 0.0 before a sparse step)",
    "compress_rate": "numel / sent, PowerSGD's name for it (inf before anything was sent)",
}


class CompressionLog:
    """Running totals of the ``StepStats`` of the sparse steps (warm-up steps are not counted):
    :data:`COMPRESSION_STATS`."""

    def __init__(self) -> None:
        self.steps = 0
        self.totals = {f.name: 0.0 if f.type in (float, "float") else 0 for f in fields(StepStats)}

    def record(self, step_stats: list[StepStats]) -> None:
        """Add one sparse step: the stats of each of its sparsifiers (one per bucket or dtype group)."""
        self.steps += 1
        for stats in step_stats:
            for key, value in asdict(stats).items():
                self.totals[key] += value

    def summary(self) -> dict[str, float]:
        """Totals over every sparse step so far, plus ``density`` (sent / numel) and ``compress_rate``
        (numel / sent, PowerSGD's name; ``inf`` when nothing was sent): :data:`COMPRESSION_STATS`."""
        out: dict[str, float] = dict(self.totals, steps=self.steps)
        out["density"] = out["sent"] / out["numel"] if out["numel"] else 0.0
        out["compress_rate"] = out["numel"] / out["sent"] if out["sent"] else float("inf")
        return out
