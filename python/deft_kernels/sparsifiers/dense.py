"""Dense: plain all-reduce of the gradient, averaged; no selection and no residual."""

from __future__ import annotations

from .base import Sparsifier


class Dense(Sparsifier):
    """The baseline every sparsifier is compared with: ``mean over workers of g`` (the driver's dense
    path, the same as the warm-up steps of the integrations: fp32 sum, divided by ``n`` in fp32, one
    rounding to the gradient's dtype)."""

    name = "dense"
    dense = True

    def __init__(self, density: float = 1.0) -> None:
        super().__init__(density)
