"""Single-process simulation of ``n`` workers on the reference ops: the oracle of the multi-process
tests.

:func:`simulate` runs a sparsifier's phases for every rank in one process, exactly as
:meth:`Sparsifier.step <deft_kernels.sparsifiers.base.Sparsifier.step>` runs them over
``torch.distributed``, but with :mod:`deft_kernels.reference` in place of the C++/CUDA ops and
plain tensor operations in place of the collectives: the leader's plan is handed to everyone (the
broadcast), the proposals are concatenated (the all-gather), the packed values summed in rank order
(the all-reduce). Each rank has its own sparsifier instance, so per-rank state (residuals, MiCRO's
thresholds) evolves as it would on separate workers.

The algorithms' own planning and selection code (``plan``, ``select``, ``observe``) is shared with
the real step; what the simulation checks independently is everything around it: the kernels, the
error feedback, the agreement, the exchange and the averaging.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import reference
from .sparsifiers import Dense, Sparsifier, build


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
    n = len(workers)
    if isinstance(workers[0], Dense):
        for w, g in zip(workers, grads):
            w._check_step_input(g, sizes, n)
        total = torch.stack([g.float() for g in grads]).sum(0)
        out = (total / n).to(grads[0].dtype)
        for w in workers:
            w.step_count += 1
        everything = torch.arange(out.numel(), dtype=torch.int64)
        return SimStep([out.clone() for _ in range(n)], [None] * n, list(grads), [everything] * n, everything, None)

    offsets = [w._begin(g, sizes, n) for w, g in zip(workers, grads)]  # makes the residuals at step 0
    norms = [reference.accumulate_norms(g, w.residual, o) for w, g, o in zip(workers, grads, offsets)]
    step = workers[0].step_count
    accumulated = [w.residual.clone() for w in workers]
    leader = step % n
    plan = workers[leader].plan(workers[leader].residual, norms[leader], offsets[leader], n, step)
    selected = [w.select(w.residual, norms[r], offsets[r], plan, r, n, step) for r, w in enumerate(workers)]
    parts = list(selected) if workers[0].gathers_selection else []
    fixed = workers[0].always_sent(plan, grads[0].device)
    if fixed is not None:
        parts.append(fixed)
    sent = torch.unique(torch.cat(parts), sorted=True) if parts else torch.zeros(0, dtype=torch.int64)
    total = torch.zeros(sent.numel(), dtype=torch.float32)
    for w in workers:
        total += reference.sparse_pack(w.residual, sent).float()
    outputs = [reference.sparse_unpack(w.residual, sent, total.to(w.residual.dtype), 1.0 / n) for w in workers]
    for w in workers:
        w.observe(plan, sent, grads[0].numel(), n)
        w.step_count += 1
    return SimStep(outputs, [w.residual.clone() for w in workers], accumulated, selected, sent, plan)
