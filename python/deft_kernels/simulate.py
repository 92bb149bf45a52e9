"""Single-process simulation of ``n`` workers on the reference ops: the oracle of the multi-process
tests.

:func:`simulate` runs the step driver's one step program (:mod:`deft_kernels.driver`) for every rank
in one process, in lockstep (:func:`deft_kernels.driver.simulate_step`), with
:mod:`deft_kernels.reference` in place of the C++/CUDA ops: each collective's result is computed in
the process (the leader's plan handed to everyone, the proposals' union, the values summed in rank
order). Each rank has its own sparsifier instance, so per-rank state (residuals, MiCRO's
thresholds) evolves as it would on separate workers.

The step's logic is shared with the real step; what a comparison with a real run checks
independently is the kernels (against the reference ops) and the collectives (torch.distributed
against the in-process ones).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import reference
from .driver import simulate_step
from .sparsifiers import Sparsifier, build


@dataclass
class SimStep:
    """One simulated step: per-rank results (index ``r`` is rank ``r``) and what all ranks share."""

    outputs: list[torch.Tensor]  # what step() returns on each rank
    residuals: list[torch.Tensor]  # each rank's residual after the step (None for Dense)
    accumulated: list[torch.Tensor]  # each rank's a = g + r before the exchange (the grad for Dense)
    selected: list[torch.Tensor]  # each rank's proposal (select()), before the union
    sent: torch.Tensor  # the global index set, sorted
    plan: Any  # the leader's plan (None when the algorithm has none)


def simulate(sparsifier: str | Sparsifier, density: float | None = None,
             grads: Sequence[Sequence[torch.Tensor]] | None = None, *, sizes: Sequence[int] | None = None,
             **kwargs) -> list[SimStep]:
    """Run a sparsifier for ``n = len(grads)`` workers, one step per entry of ``grads[rank]`` (every
    rank the same number of steps; flat 1-D float tensors of one length and dtype).

    ``sparsifier`` is a registry name (then ``density`` and ``kwargs`` go to ``build``) or a fresh
    :class:`Sparsifier` instance (never stepped; then ``density`` is ``None`` or the instance's and
    no ``kwargs``), copied once per rank. ``sizes`` is as for ``step``. The given instance is left
    untouched. Returns one :class:`SimStep` per step."""
    if isinstance(sparsifier, Sparsifier):
        if density is not None and density != sparsifier.density:
            raise ValueError(f"density must be None or the instance's ({sparsifier.density}), got {density!r}")
        if kwargs:
            raise TypeError(f"kwargs go to build() with a registry name, not with an instance: {sorted(kwargs)}")
        if sparsifier.residual is not None or sparsifier.step_count:
            raise ValueError("sparsifier must be a fresh instance (never stepped); call reset() first")
        make = lambda: copy.deepcopy(sparsifier)  # noqa: E731
    elif isinstance(sparsifier, str):
        if density is None:
            raise TypeError("density must be given with a registry name")
        make = lambda: build(sparsifier, density, **kwargs)  # noqa: E731
    else:
        raise TypeError(f"sparsifier must be a registry name or a Sparsifier instance, got {type(sparsifier).__name__}")
    if not isinstance(grads, Sequence) or len(grads) == 0:
        raise ValueError("grads must be a non-empty sequence with one list of step gradients per rank")
    steps = {len(g) for g in grads}
    if len(steps) != 1:
        raise ValueError(f"grads must hold the same number of steps for every rank, got {sorted(steps)}")
    n = len(grads)
    workers = [make() for _ in range(n)]
    for w in workers:
        w.kernels = reference
    return [_one_step(workers, [g[t] for g in grads], sizes) for t in range(steps.pop())]


def _one_step(workers, grads: list[torch.Tensor], sizes) -> SimStep:
    leader = workers[0].step_count % len(workers)
    results = simulate_step(workers, grads, sizes=sizes, keep_accumulated=True)
    residuals = [None if w.residual is None else w.residual.clone() for w in workers]
    if workers[0].dense:
        everything = torch.arange(grads[0].numel(), dtype=torch.int64)
        return SimStep([r.out for r in results], residuals, list(grads), [everything] * len(grads), everything, None)
    return SimStep([r.out for r in results], residuals, [r.accumulated for r in results],
                   [r.selected for r in results], results[0].sent, results[leader].plan)
