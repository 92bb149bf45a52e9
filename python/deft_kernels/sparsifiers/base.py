"""The interface every sparsifier implements (Dense, TopK, CLTK, HardThreshold, SIDCo, DEFT, MiCRO).

One instance lives on each worker and owns that worker's error-feedback residual and step counter.
A step is split into phases so that the same code serves the real distributed step and the
single-process simulation of ``n`` workers used by the worker-count benchmark:

1. ``accumulate``: ``a = g + r`` and the fragment norms (``ops.accumulate_norms``), local.
2. ``plan``: work the leader (``step % world_size``) does alone and broadcasts, so that all workers
   agree (DEFT: local k and bin packing from the leader's norms; CLT-k: the leader's top-k indices;
   MiCRO: partition and threshold). Returns ``None`` for algorithms that need no agreement.
3. ``select``: this worker's own selection given the agreed plan, local, no communication
   (DEFT: top-k over the fragments of its bin; Top-k: over the whole vector).
4. ``exchange``: all-gather indices, all-reduce values, unpack; the only phase that communicates.

Selection cost of one step as the benchmark reports it (the critical path of the step's local
work): ``max over ranks of (t_plan if rank is the leader else 0) + t_select(rank)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepStats:
    """What one step on one worker reports. Times are seconds, measured with the device's clock
    (CUDA events on GPU, ``time.perf_counter`` on CPU)."""

    selected: int  # indices this worker proposed in select()
    sent: int  # size of the global index set (after union)
    numel: int  # N, length of the flat gradient
    bytes_sent: int  # bytes this worker put on the wire (indices + values)
    t_select: float  # plan (if leader) + select
    t_comm: float  # exchange
    t_other: float  # accumulate, unpack and the rest

    @property
    def density(self) -> float:
        return self.sent / self.numel if self.numel else 0.0


class Sparsifier(ABC):
    """Base class. Subclasses implement ``fragment_offsets``, ``plan`` (optional) and ``select``;
    the distributed ``step`` and the error feedback are shared."""

    name: str = "base"

    def __init__(self, density: float) -> None:
        if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density!r}")
        self.density = float(density)

    def budget(self, numel: int) -> int:
        """k = int(d * N), the number of elements the step should send in total."""
        return int(self.density * numel)

    @abstractmethod
    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        """int64 offsets (length F + 1) of the fragments over the flat vector of tensors of the
        given sizes (DEFT: the spec's fragments; the others: one fragment per tensor)."""

    def plan(self, acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, world_size: int,
             step: int) -> Any:
        """Leader-only work whose result every worker must share. Default: none."""
        return None

    @abstractmethod
    def select(self, acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, plan: Any, rank: int,
               world_size: int, step: int) -> torch.Tensor:
        """This worker's proposed indices (int64, into the flat vector ``acc``), no communication."""
