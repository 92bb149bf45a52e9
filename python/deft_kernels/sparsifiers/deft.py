"""DEFT: fragmented top-k, each worker selecting only in its bin (Yoon and Oh, ICPP 2023)."""

from __future__ import annotations

import torch

from .. import planning
from ..transfer import to_device
from .base import Sparsifier


class DEFT(Sparsifier):
    """DEFT as ``docs/algorithm.md`` defines it.

    The leader (``turn % n``, ``turn = step + rotation``) computes the local k of every fragment from
    its own norms, the common part and the LPT bins (:func:`deft_kernels.planning.make_plan`) and broadcasts them; every worker
    then selects, with the leader's k, in bin ``(turn + rank) % n`` only, and everyone sends the
    common part whole. The bins are disjoint, so the global index set has no duplicates and its size
    is exactly ``sum(k)``, whatever ``n`` is. (The paper has each worker use its own k; using the
    leader's keeps the sent count exact and every worker's view of the plan identical.)

    The header travels before the plan (``header_at = "before_plan"``): the leader reads it with its
    norms, the others with the plan, so header and plan cost each rank one host read; every
    rank's proposal count follows from the plan, so no count needs exchanging.

    ``cost_model`` names a :data:`deft_kernels.planning.COST_MODELS` entry or is a callable
    ``(sizes, k) -> cost`` used by the bin packing.
    """

    name = "deft"
    header_at = "before_plan"
    disjoint_proposals = True

    #: Bin code of a fragment in the plan's wire format: not selected at all, or sent whole.
    NO_BIN, COMMON = -1, -2

    def __init__(self, density: float, cost_model=planning.DEFAULT_COST_MODEL, *,
                 residual_dtype: torch.dtype | None = None) -> None:
        super().__init__(density, residual_dtype)
        if not (callable(cost_model) or cost_model in planning.COST_MODELS):
            raise ValueError(f"cost_model must be one of {sorted(planning.COST_MODELS)} or a callable, "
                             f"got {cost_model!r}")
        self.cost_model = cost_model

    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        return planning.fragment_offsets(sizes, world_size)

    def plan(self, acc, norms, offsets, world_size, step) -> planning.DeftPlan:
        return planning.make_plan(norms, offsets.diff(), self.budget(acc.numel()), world_size, self.cost_model)

    def plan_wire(self, numel, offsets, world_size) -> tuple[int, torch.dtype]:
        return 3 * (offsets.numel() - 1), torch.int64  # k, bin code and cost (float64 bits) per fragment

    def encode_plan(self, plan: planning.DeftPlan) -> torch.Tensor:
        code = torch.full_like(plan.k, self.NO_BIN)
        for b, fragments in enumerate(plan.bins):
            code[fragments] = b
        code[plan.common] = self.COMMON
        return torch.cat([plan.k, code, plan.costs.view(torch.int64)])

    def decode_plan(self, wire, offsets, world_size) -> planning.DeftPlan:
        k, code, costs = wire.view(3, -1)
        # One stable sort groups the fragment ids by bin code (COMMON, NO_BIN, then bins 0..n-1),
        # ascending within each: a split per code instead of a nonzero per bin.
        order = torch.argsort(code, stable=True)
        counts = torch.bincount(code - self.COMMON, minlength=world_size + 2).tolist()
        common, _, *bins = order.split(counts)
        return planning.DeftPlan(sizes=offsets.diff(), k=k.clone(), bins=bins, common=common,
                                 costs=costs.view(torch.float64))

    def proposal_counts(self, plan, world_size, step) -> list[int]:
        return [int(plan.k[plan.fragments_of(rank, step)].sum()) for rank in range(world_size)]

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        frags = plan.fragments_of(rank, step)
        if frags.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=acc.device)
        return self.kernels.segmented_topk(acc, offsets, plan.k, frags)  # host metadata next to the values

    def always_sent(self, plan, device) -> torch.Tensor | None:
        return to_device(plan.common_indices(), device) if plan.common.numel() else None
