"""DEFT: fragmented top-k, each worker selecting only in its bin (Yoon and Oh, ICPP 2023)."""

from __future__ import annotations

import torch

from .. import planning
from ..transfer import to_device
from .base import Sparsifier


#: The two ways DEFT's workers agree on a step's plan (docs/algorithm.md, "The plan one step ahead").
PLAN_PROTOCOLS = ("ahead", "leader")


class DEFT(Sparsifier):
    """DEFT as ``docs/algorithm.md`` defines it.

    A plan (:func:`deft_kernels.planning.make_plan`) gives every fragment its local k from fragment
    norms, forms the common part and packs the other fragments into ``n`` LPT bins; every worker then
    selects, with the plan's k, in bin ``(turn + rank) % n`` only (``turn = step + rotation``), and
    everyone sends the common part whole. The bins are disjoint, so the global index set has no
    duplicates and its size is exactly ``sum(k)``, whatever ``n`` is; every worker's proposal count
    follows from the plan (``counts_from_plan``). Where the plan comes from, ``plan``:

    - ``"ahead"`` (default): every worker makes the plan itself, alike, from the fragment norms
      summed over the workers in the previous step (they ride in that step's value all-reduce). No
      leader, no broadcast, no header: two collectives per step, and no host read of device data
      inside the step. The first step has no previous norms: it sums the current ones first (one
      all-reduce more, read on the host once).
    - ``"leader"``: the paper's protocol. The leader (``turn % n``) makes the plan from its own
      current norms and broadcasts it; a header travels before the plan (the leader reads it with its
      norms, the others with the plan). Four collectives per step and host reads in the step.

    (The paper has each worker use its own k; using the plan's keeps the sent count exact and every
    worker's view of the plan identical.) ``cost_model`` names a
    :data:`deft_kernels.planning.COST_MODELS` entry or is a callable ``(sizes, k) -> cost`` used by
    the bin packing.
    """

    name = "deft"
    disjoint_proposals = True
    counts_from_plan = True

    #: Bin code of a fragment in the plan's wire format: not selected at all, or sent whole.
    NO_BIN, COMMON = -1, -2

    def __init__(self, density: float, cost_model=planning.DEFAULT_COST_MODEL, *, plan: str = "ahead",
                 residual_dtype: torch.dtype | None = None) -> None:
        super().__init__(density, residual_dtype)
        if not (callable(cost_model) or cost_model in planning.COST_MODELS):
            raise ValueError(f"cost_model must be one of {sorted(planning.COST_MODELS)} or a callable, "
                             f"got {cost_model!r}")
        if plan not in PLAN_PROTOCOLS:
            raise ValueError(f"plan must be one of {PLAN_PROTOCOLS} (\"leader\": the paper's protocol), got {plan!r}")
        self.cost_model = cost_model
        self.plan_protocol = plan

    @property
    def plans_ahead(self) -> bool:
        return self.plan_protocol == "ahead"

    def options(self) -> dict:
        cost = self.cost_model if isinstance(self.cost_model, str) else \
            f"{getattr(self.cost_model, '__module__', '')}.{getattr(self.cost_model, '__qualname__', repr(self.cost_model))}"
        return {**super().options(), "cost_model": cost, "plan": self.plan_protocol}

    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        return planning.fragment_offsets(sizes, world_size)

    def plan(self, acc, norms, offsets, world_size, step) -> planning.DeftPlan:
        """The plan from ``norms`` (host, one per fragment): the leader's own (``plan="leader"``) or
        the norms summed over the workers in the previous step (``plan="ahead"``; ``acc`` unused)."""
        return planning.make_plan(norms, offsets.diff(), self.budget(int(offsets[-1])), world_size, self.cost_model)

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
