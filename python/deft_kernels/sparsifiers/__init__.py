"""Sparsifiers: DEFT and the baselines it is measured against, one class each, one interface
(:class:`~deft_kernels.sparsifiers.base.Sparsifier`), the same error feedback.

``build(name, density, **kwargs)`` makes one by its registry name (``SPARSIFIERS``):
``"dense"``, ``"topk"``, ``"cltk"``, ``"threshold"`` (needs ``threshold=``), ``"sidco"``, ``"deft"``,
``"micro"``.
"""

from __future__ import annotations

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
    return SPARSIFIERS[name.lower()](density=density, **kwargs)


__all__ = ["Sparsifier", "StepStats", "SPARSIFIERS", "build", *(cls.__name__ for cls in SPARSIFIERS.values())]
