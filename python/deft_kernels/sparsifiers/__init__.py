"""Sparsifiers: DEFT and the baselines it is measured against, one class each, one interface
(:class:`~deft_kernels.sparsifiers.base.Sparsifier`), the same error feedback.

``build(name, density, **kwargs)`` makes one by its registry name (``SPARSIFIERS``):
``"dense"``, ``"topk"``, ``"cltk"``, ``"threshold"`` (needs ``threshold=``), ``"sidco"``, ``"deft"``,
``"micro"``.
"""

from __future__ import annotations

import inspect

from .base import Sparsifier, StepStats
from .cltk import CLTK
from .deft import DEFT
from .dense import Dense
from .micro import MiCRO
from .sidco import SIDCo
from .threshold import HardThreshold
from .topk import TopK

SPARSIFIERS: dict[str, type[Sparsifier]] = {cls.name: cls for cls in (Dense, TopK, CLTK, HardThreshold, SIDCo, DEFT,
                                                                      MiCRO)}


def build(name: str, density: float, **kwargs) -> Sparsifier:
    """The sparsifier registered as ``name`` (see ``SPARSIFIERS``; case-insensitive) at the given
    density; ``kwargs`` go to its constructor (``threshold=`` for ``"threshold"``)."""
    if not isinstance(name, str) or name.lower() not in SPARSIFIERS:
        raise ValueError(f"name must be one of {sorted(SPARSIFIERS)}, got {name!r}")
    cls = SPARSIFIERS[name.lower()]
    _check_options(cls, kwargs)
    return cls(density=density, **kwargs)


def _check_options(cls: type[Sparsifier], kwargs: dict) -> None:
    """Raise a ``TypeError`` naming the sparsifier and the keyword when ``kwargs`` lack one that
    ``cls``'s constructor requires or hold one it does not take (instead of the constructor's own
    ``TypeError``, which names neither the registry name nor the options there are)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    options = [p for p in params if p.name != "density" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    listed = ", ".join(f"{p.name}=" for p in options) or "none"
    for key in kwargs:
        if key not in {p.name for p in options}:
            raise TypeError(f"sparsifier {cls.name!r} takes no keyword argument {key!r}; its options: {listed}")
    for p in options:
        if p.default is p.empty and p.name not in kwargs:
            raise TypeError(f"sparsifier {cls.name!r} needs the keyword argument {p.name}= (its options: {listed}); "
                            "pass it to sparsifiers.build, DeftState or GradientSparsifier with the sparsifier's name")


__all__ = ["Sparsifier", "StepStats", "SPARSIFIERS", "build", *(cls.__name__ for cls in SPARSIFIERS.values())]
