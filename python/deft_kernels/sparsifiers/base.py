"""The interface every sparsifier implements (Dense, TopK, CLTK, HardThreshold, SIDCo, DEFT, MiCRO).

One instance lives on each worker and owns that worker's error-feedback residual and step counter.
A step is split into phases so that the same code serves the real distributed step and the
single-process simulation of ``n`` workers used by the worker-count benchmark:

1. ``accumulate``: ``a = g + r`` and the fragment norms (``ops.accumulate_norms``), local.
2. ``plan``: work the leader (``step % world_size``) does alone and broadcasts, so that all workers
   agree (DEFT: local k and bin packing from the leader's norms; CLT-k: the leader's top-k indices;
   MiCRO: the per-partition thresholds). Returns ``None`` for algorithms that need no agreement.
3. ``select``: this worker's own selection given the agreed plan, local, no communication
   (DEFT: top-k over the fragments of its bin; Top-k: over the whole vector).
4. ``exchange``: all-gather indices, all-reduce values, unpack; the only phase that communicates.

The phases ``fragment_offsets``, ``plan`` and ``select`` never communicate and never change the
instance's state, so one process can simulate ``n`` workers by calling ``plan`` once (as the leader)
and ``select`` for every rank on one instance (the worker-count benchmark does). State that evolves
from step to step (MiCRO's thresholds) changes only in ``observe``, which runs after the exchange
with what every worker knows. ``step`` runs the four phases for real over ``torch.distributed``;
:func:`deft_kernels.simulate.simulate` runs them for ``n`` workers in one process on the reference
ops, the oracle of the multi-process tests.

``kernels`` is where ``plan`` and ``select`` take their top-k from: the C++/CUDA ops without
re-validation by default; the simulation swaps in :mod:`deft_kernels.reference`.

Plans cross the wire with ``dist.broadcast_object_list``: a plan holds CPU tensors and Python
objects only (a pickled CUDA tensor would land on the sender's device index).

Selection cost of one step as the benchmark reports it (the critical path of the step's local
work): ``max over ranks of (t_plan if rank is the leader else 0) + t_select(rank)``.
"""

from __future__ import annotations

import functools
import hashlib
import time
import types
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import ops, planning
from ..planning import offsets_of

#: The ops that ``plan`` and ``select`` call, validation off: their inputs come from the planner,
#: valid by construction. Same signatures as :mod:`deft_kernels.reference`.
FAST_KERNELS = types.SimpleNamespace(segmented_topk=functools.partial(ops.segmented_topk, validate=False))


@dataclass
class StepStats:
    """What one step on one worker reports. Times are seconds, measured with the device's clock
    (CUDA events on GPU, ``time.perf_counter`` on CPU)."""

    selected: int  # indices this worker proposed in select()
    sent: int  # size of the global index set (after union)
    numel: int  # N, length of the flat gradient
    bytes_sent: int  # bytes this worker put on the wire: its int64 indices + fp32 values
    t_select: float  # plan (if leader) + select
    t_comm: float  # exchange
    t_other: float  # accumulate, unpack and the rest

    @property
    def density(self) -> float:
        return self.sent / self.numel if self.numel else 0.0


class Sparsifier(ABC):
    """Base class. Subclasses implement ``select`` and, where they need them, ``fragment_offsets``
    (default: one fragment per tensor), ``plan``, ``always_sent`` and ``observe``; the distributed
    ``step`` and the error feedback are shared."""

    name: str = "base"
    kernels: Any = FAST_KERNELS

    def __init__(self, density: float) -> None:
        if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density!r}")
        self.density = float(density)
        self.reset()

    def reset(self) -> None:
        """Forget the residual, the step counter and the layout (the next step starts afresh)."""
        self.residual: torch.Tensor | None = None
        self.step_count = 0
        self._world_size: int | None = None
        self._sizes: list[int] | None = None
        self._dtype_device: tuple[torch.dtype, torch.device] | None = None
        self._offsets: torch.Tensor | None = None

    def budget(self, numel: int) -> int:
        """k, the number of elements the step should send in total: ``int(d * N)``, at least 1 for
        a non-empty vector (:func:`deft_kernels.planning.budget`)."""
        return planning.budget(self.density, numel)

    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        """int64 offsets (length F + 1) of the fragments over the flat vector of tensors of the
        given sizes: one fragment per tensor (DEFT overrides this with its fragments, docs/algorithm.md)."""
        return torch.tensor(offsets_of(sizes), dtype=torch.int64)

    def plan(self, acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, world_size: int,
             step: int) -> Any:
        """Leader-only work whose result every worker must share. Default: none."""
        return None

    @abstractmethod
    def select(self, acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, plan: Any, rank: int,
               world_size: int, step: int) -> torch.Tensor:
        """This worker's proposed indices (int64, into the flat vector ``acc``), no communication."""

    # ----------------------------------------------------------------------------------------------
    # Hooks with defaults, overridden by the algorithms that need them.

    #: True when ``select`` proposals are all-gathered; False when the plan carries every index
    #: (CLT-k), so workers propose nothing.
    gathers_selection: bool = True

    def always_sent(self, plan: Any, device: torch.device) -> torch.Tensor | None:
        """Indices every worker sends whatever it selected (DEFT's common part, CLT-k's leader
        indices), int64 on ``device``; ``None`` when there are none."""
        return None

    def observe(self, plan: Any, sent: torch.Tensor, numel: int, world_size: int) -> None:
        """Called on every worker after the exchange with the agreed plan, the global index set
        (sorted) and the vector's length (the same on all workers, so state updated from them stays in agreement). The one
        place where per-step algorithm state may change. Default: nothing."""

    def extra_state(self) -> dict:
        """Algorithm state beyond the residual and the step counter, for ``state_dict``."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` returned."""

    # ----------------------------------------------------------------------------------------------
    # The distributed step, shared by every sparsifier.

    def step(self, grad: torch.Tensor, *, sizes: Sequence[int] | None = None,
             group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, StepStats]:
        """One step on this worker: error feedback, plan, selection and exchange.

        ``grad`` is this worker's local flat 1-D gradient (fp32/bf16/fp16), not divided by the world
        size; ``sizes`` are the sizes of the parameter tensors laid end to end in it (default: one
        tensor), from which fragments are cut at the first step. ``group`` is the process group
        (default: the default group when ``torch.distributed`` is initialised, else a world of one
        with no communication). Returns a new tensor like ``grad``, zero except at the global index
        set, where it holds the mean over workers of their accumulated gradient ``a``, and the step's
        :class:`StepStats`. The residual keeps ``a`` minus what was sent.
        """
        rank, world_size = _rank_and_size(group, grad)
        if self.residual is None and world_size > 1:
            self._agree_on_setup(grad, sizes, group, world_size)
        offsets = self._begin(grad, sizes, world_size)
        clock = _Clock(grad.device)
        step = self.step_count

        clock.mark()
        norms = ops.accumulate_norms(grad, self.residual, offsets, validate=False)
        acc = self.residual  # a = g + r, in place
        clock.mark()
        leader = step % world_size
        plan = self.plan(acc, norms, offsets, world_size, step) if rank == leader else None
        clock.mark()
        if world_size > 1 and type(self).plan is not Sparsifier.plan:
            box = [plan]
            dist.broadcast_object_list(box, group=group, group_src=leader)
            plan = box[0]
        clock.mark()
        mine = self.select(acc, norms, offsets, plan, rank, world_size, step)
        clock.mark()
        sent = _union(mine, self.always_sent(plan, acc.device), self.gathers_selection, group, world_size)
        values = ops.sparse_pack(acc, sent, validate=False).float()
        if world_size > 1 and sent.numel() > 0:
            dist.all_reduce(values, group=group)
        clock.mark()
        out = ops.sparse_unpack(self.residual, sent, values.to(acc.dtype), 1.0 / world_size, validate=False)
        self.observe(plan, sent, grad.numel(), world_size)
        self.step_count += 1
        clock.mark()

        t_accumulate, t_plan, t_broadcast, t_select, t_exchange, t_unpack = clock.intervals()
        own = mine.numel() if self.gathers_selection else 0
        return out, StepStats(
            selected=int(mine.numel()), sent=int(sent.numel()), numel=grad.numel(),
            bytes_sent=8 * own + 4 * int(sent.numel()), t_select=t_plan + t_select,
            t_comm=t_broadcast + t_exchange, t_other=t_accumulate + t_unpack)

    def _begin(self, grad, sizes, world_size: int) -> torch.Tensor:
        """Check a step's input against the earlier steps; at the first step make the residual and
        cut the fragments. Returns the fragment offsets."""
        self._check_step_input(grad, sizes, world_size)
        if self.residual is None:
            self.residual = torch.zeros_like(grad, memory_format=torch.contiguous_format)
            self._offsets = self.fragment_offsets(self._sizes, world_size).to(grad.device)
        return self._offsets

    def _agree_on_setup(self, grad, sizes, group, world_size: int) -> None:
        """First step only, before anything else communicates: every rank checks its own input,
        then all-gather (input valid, grad length, digest of name, density, sizes and dtype); if any
        rank rejected its input or the ranks disagree, every rank raises (and the instance resets,
        so a corrected call starts afresh). Without it, a rank whose input is rejected leaves the
        others waiting in the next collective until the process group's timeout, ranks whose
        layouts differ but whose lengths agree exchange values of different parameters silently
        (the leader's plan names fragments by id), and differing lengths fail later with an index
        error on one rank. One all-gather of three int64 per rank, once."""
        try:
            self._check_step_input(grad, sizes, world_size)
            error = None
            setup = repr((self.name, self.density, list(self._sizes), str(grad.dtype)))
            key = int.from_bytes(hashlib.sha256(setup.encode()).digest()[:7], "little")
            mine = [1, grad.numel(), key]
        except (TypeError, ValueError) as e:
            error, mine = e, [0, -1, 0]
        device = grad.device if isinstance(grad, torch.Tensor) else torch.device("cpu")
        mine = torch.tensor(mine, dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(every, mine, group=group)
        every = [tuple(int(v) for v in t.tolist()) for t in every]
        rejected = [r for r, e in enumerate(every) if e[0] == 0]
        if error is not None or rejected or any(e != every[0] for e in every):
            self.reset()
        if error is not None:
            raise error
        if rejected:
            raise ValueError(f"rank(s) {rejected} rejected their input at the first step (see their error); "
                             "every rank stops")
        if any(e != every[0] for e in every):
            lengths = [e[1] for e in every]
            raise ValueError("ranks disagree on the step's setup (sparsifier, density, parameter sizes or grad "
                             f"dtype) at the first step: grad lengths per rank {lengths}, setup digests "
                             f"{[hex(e[2]) for e in every]}; every rank must pass the same layout")

    def _check_step_input(self, grad, sizes, world_size: int) -> None:
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"grad must be a torch.Tensor, got {type(grad).__name__}")
        if grad.dtype not in ops.SUPPORTED_DTYPES:
            raise TypeError(f"grad must be a float tensor (float32, bfloat16 or float16), got {grad.dtype}")
        if grad.dim() != 1:
            raise ValueError(f"grad must be a flat 1-D tensor, got shape {tuple(grad.shape)}")
        sizes = [grad.numel()] if sizes is None else [int(s) for s in sizes]
        if any(s < 0 for s in sizes) or sum(sizes) != grad.numel():
            raise ValueError(f"sizes must be non-negative and sum to grad.numel() = {grad.numel()}, "
                             f"got {len(sizes)} sizes summing to {sum(sizes)}")
        if self._world_size is None:
            self._world_size, self._sizes = world_size, sizes
            self._dtype_device = (grad.dtype, grad.device)
            return
        if world_size != self._world_size:
            raise ValueError(f"world size changed between steps ({self._world_size} -> {world_size}); "
                             "call reset() to start afresh")
        if grad.numel() != sum(self._sizes):
            raise ValueError(f"grad length changed between steps ({sum(self._sizes)} -> {grad.numel()}); "
                             "call reset() to start afresh")
        if sizes != self._sizes:
            raise ValueError("the parameter layout (sizes) changed between steps; call reset() to start afresh")
        if self._dtype_device not in (None, (grad.dtype, grad.device)):
            dtype, device = self._dtype_device
            raise ValueError(f"grad is {grad.dtype} on {grad.device} but earlier steps were {dtype} on {device}; "
                             "call reset() to start afresh")

    def state_dict(self) -> dict:
        """This worker's state: residual, step counter, world size and layout, algorithm state.
        Every rank saves its own (residuals differ between workers)."""
        return {"name": self.name, "density": self.density, "residual": self.residual,
                "step_count": self.step_count, "world_size": self._world_size,
                "sizes": None if self._sizes is None else list(self._sizes), "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the next ``step`` continues exactly."""
        missing = {"name", "density", "residual", "step_count", "world_size", "sizes", "extra"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        if state["name"] != self.name or state["density"] != self.density:
            raise ValueError(f"state is for {state['name']} at density {state['density']}, "
                             f"this is {self.name} at density {self.density}")
        self.reset()
        residual = state["residual"]
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.dim() != 1:
                raise ValueError("state['residual'] must be a flat tensor or None")
            if state["sizes"] is None or sum(state["sizes"]) != residual.numel():
                raise ValueError("state['sizes'] does not match the residual's length")
            self.residual = residual.clone().contiguous()
            self._dtype_device = (residual.dtype, residual.device)
        if state["sizes"] is not None:
            self._world_size, self._sizes = int(state["world_size"]), list(state["sizes"])
        if residual is not None:
            self._offsets = self.fragment_offsets(self._sizes, self._world_size).to(residual.device)
        self.step_count = int(state["step_count"])
        self.load_extra_state(state["extra"])


def indices_at_least(acc: torch.Tensor, threshold: float, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Sorted int64 indices ``i`` in ``[lo, hi)`` with ``|acc[i]| >= threshold``, the threshold
    selection of HardThreshold, SIDCo and MiCRO. Zeros are never selected (sending them changes
    nothing) and NaNs always are (the package's NaN policy: a NaN reaches the averaged gradient)."""
    part = acc[lo:hi]
    mag = part.abs()
    keep = ((mag >= threshold) & (mag > 0)) | torch.isnan(part)
    return torch.nonzero(keep).flatten() + lo


def _rank_and_size(group, grad) -> tuple[int, int]:
    """This worker's rank and the world size (0 and 1 without torch.distributed), after checking
    that ``grad`` can travel on ``group``'s backend."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    world_size = dist.get_world_size(group)
    if world_size > 1 and isinstance(grad, torch.Tensor) and grad.device.type != "cuda" \
            and dist.get_backend(group) == "nccl":
        raise ValueError(f"grad is on {grad.device} but the process group's backend is nccl, which "
                         "needs CUDA tensors; use a gloo group for CPU gradients")
    return dist.get_rank(group), world_size


def _union(mine: torch.Tensor, fixed: torch.Tensor | None, gather: bool, group, world_size: int) -> torch.Tensor:
    """Sorted global index set: every worker's proposal plus ``fixed``. Counts are all-gathered first
    and indices padded to the largest count; nothing is gathered when every count is zero (gloo
    hangs on zero-length collectives)."""
    parts = [] if fixed is None else [fixed]
    if gather and world_size == 1:
        parts.append(mine)
    elif gather:
        count = torch.tensor([mine.numel()], dtype=torch.int64, device=mine.device)
        counts = [torch.empty_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count, group=group)
        counts = [int(c) for c in counts]
        longest = max(counts)
        if longest > 0:
            padded = torch.zeros(longest, dtype=torch.int64, device=mine.device)
            padded[: mine.numel()] = mine
            gathered = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(gathered, padded, group=group)
            parts.extend(g[:c] for g, c in zip(gathered, counts))
    if not parts:
        return mine.new_zeros(0)
    return torch.unique(torch.cat(parts), sorted=True)


class _Clock:
    """Interval timer on the device's clock: CUDA events on GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
