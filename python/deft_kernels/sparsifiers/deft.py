"""DEFT: fragmented top-k, each worker selecting only in its bin (Yoon and Oh, ICPP 2023)."""

from __future__ import annotations

import torch

from .. import planning
from .base import Sparsifier


class DEFT(Sparsifier):
    """DEFT as ``docs/algorithm.md`` defines it.

    The leader (``step % n``) computes the local k of every fragment from its own norms, the common
    part and the LPT bins (:func:`deft_kernels.planning.make_plan`) and broadcasts them; every worker
    then selects, with the leader's k, in bin ``(step + rank) % n`` only, and everyone sends the
    common part whole. The bins are disjoint, so the global index set has no duplicates and its size
    is exactly ``sum(k)``, whatever ``n`` is. (The paper has each worker use its own k; using the
    leader's keeps the sent count exact and every worker's view of the plan identical.)

    ``cost_model`` names a :data:`deft_kernels.planning.COST_MODELS` entry or is a callable
    ``(sizes, k) -> cost`` used by the bin packing.
    """

    name = "deft"

    def __init__(self, density: float, cost_model=planning.DEFAULT_COST_MODEL) -> None:
        super().__init__(density)
        if not (callable(cost_model) or cost_model in planning.COST_MODELS):
            raise ValueError(f"cost_model must be one of {sorted(planning.COST_MODELS)} or a callable, "
                             f"got {cost_model!r}")
        self.cost_model = cost_model

    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        return planning.fragment_offsets(sizes, world_size)

    def plan(self, acc, norms, offsets, world_size, step) -> planning.DeftPlan:
        sizes = (offsets[1:] - offsets[:-1]).cpu()
        return planning.make_plan(norms.cpu(), sizes, self.budget(acc.numel()), world_size, self.cost_model)

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        frags = plan.fragments_of(rank, step).to(acc.device)
        if frags.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=acc.device)
        return self.kernels.segmented_topk(acc, offsets, plan.k.to(acc.device), frags)

    def always_sent(self, plan, device) -> torch.Tensor | None:
        return plan.common_indices().to(device) if plan.common.numel() else None
