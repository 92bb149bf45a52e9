"""What the DDP hook learns about the ``DistributedDataParallel`` model it is registered on.

torch offers no public way for a communication hook to reach its DDP model: ``register_comm_hook``
keeps ``(hook, state)`` pairs in the model's private ``_comm_hooks`` list and hands the hook only
the state and a ``GradBucket``. :func:`registered_on` finds the model through the garbage
collector's referrers of the state (one look per model: 70 ms in a process holding GPT-2 small's
DDP model, about 300,000 tracked objects, on a 2-core CPU VM, torch 2.13, by
``python bench/ddp_lookup_cost.py``). Where that finds nothing (a torch that renamed the list, a
wrapper that keeps the state elsewhere, a hook called by hand), the hook does not guess: it tracks
which parameters were used (the safe side of ``find_unused_parameters``) and communicates on the
group it was given, and says so once (:mod:`deft_kernels.hook`).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["registered_on", "DdpModel"]


def _holders(obj: Any):
    """The objects that hold ``obj`` as an attribute: directly (an instance whose attributes live
    inline) or through their ``__dict__``."""
    for holder in gc.get_referrers(obj):
        yield from gc.get_referrers(holder) if isinstance(holder, dict) else (holder,)


def registered_on(state: Any) -> Optional[DistributedDataParallel]:
    """The ``DistributedDataParallel`` model whose comm hooks include ``state`` (DDP keeps them as
    ``(hook, state)`` pairs in a list), found through the garbage collector's referrers; ``None``
    where there is none. When several models hold the state, the first one found."""
    pairs = [p for p in gc.get_referrers(state) if isinstance(p, tuple) and len(p) == 2 and p[1] is state]
    for hooks in (h for pair in pairs for h in gc.get_referrers(pair) if isinstance(h, list)):
        for ddp in _holders(hooks):
            if isinstance(ddp, DistributedDataParallel) and getattr(ddp, "_comm_hooks", None) is hooks:
                return ddp
    return None


@dataclass
class DdpModel:
    """What the hook takes from the DDP model it serves (``None`` fields: not found)."""

    model: Optional[weakref.ref]  # the DDP model, weakly (None: not found)
    process_group: Optional[dist.ProcessGroup]  # the group DDP reduces in (None: not found)
    find_unused_parameters: Optional[bool]  # DDP's setting (None: not found)
    names: dict[int, str]  # id(parameter) -> its name in the module (empty: not found)

    @classmethod
    def of(cls, state: Any) -> DdpModel:
        ddp = registered_on(state)
        if ddp is None:
            return cls(None, None, None, {})
        names = {id(p): name for name, p in ddp.module.named_parameters()}
        return cls(weakref.ref(ddp), ddp.process_group, bool(ddp.find_unused_parameters), names)

    @property
    def found(self) -> bool:
        return self.model is not None

    def alive(self) -> bool:
        """Whether the DDP model still exists (``False`` where it was never found)."""
        return self.model is not None and self.model() is not None

    def name_of(self, param: torch.Tensor) -> Optional[str]:
        return self.names.get(id(param))
