"""CLT-k, cyclic local top-k (ScaleCom, Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from .topk import TopK


class CLTK(TopK):
    """The leader ``(step + rotation) % n`` selects the top ``k`` of its own accumulated gradient and broadcasts
    the indices in the plan; every worker all-reduces its values there. No all-gather and no
    build-up (exactly ``k`` indices are sent), but the leader scans all ``N`` elements while the
    others wait. Nobody proposes anything (``gathers_selection = False``): the header rides on the
    value all-reduce, and the plan never leaves the device."""

    name = "cltk"
    gathers_selection = False

    def plan(self, acc, norms, offsets, world_size, step) -> torch.Tensor:
        return self.top_k_of_all(acc)

    def plan_wire(self, numel, offsets, world_size) -> tuple[int, torch.dtype]:
        return self.budget(numel), torch.int64

    def encode_plan(self, plan: torch.Tensor) -> torch.Tensor:
        return plan

    def decode_plan(self, wire, offsets, world_size) -> torch.Tensor:
        return wire

    def select(self, acc, norms, offsets, plan, rank, world_size, step) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=acc.device)

    def always_sent(self, plan, device) -> torch.Tensor | None:
        return plan
