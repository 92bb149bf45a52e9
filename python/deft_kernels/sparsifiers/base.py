"""The interface every sparsifier implements (Dense, TopK, CLTK, HardThreshold, SIDCo, DEFT, MiCRO).

A :class:`Sparsifier` is the algorithm and one worker's state, nothing else: no communication. One
instance lives on each worker and owns that worker's error-feedback residual, step counter and
layout. The step that runs it over ``torch.distributed`` (or over ``n`` ranks simulated in one
process) is written once, in :mod:`deft_kernels.driver`; its phases call these methods:

1. ``fragment_offsets`` (first step only): how the flat vector is cut into fragments.
2. ``plan``: work the leader (``(step + rotation) % world_size``) does alone and every worker must
   share (DEFT: local k and bin packing from the leader's norms; CLT-k: the leader's top-k indices; MiCRO: the
   per-partition thresholds). ``plan_wire``, ``encode_plan`` and ``decode_plan`` say how it travels:
   one tensor of a size every rank knows in advance.
3. ``select``: this worker's own proposal given the agreed plan, local.
4. ``always_sent``: indices every worker sends whatever it selected (DEFT's common part).
5. ``observe``: after the exchange, with what every worker knows; the one place where per-step
   algorithm state may change (MiCRO's thresholds).

``plan``, ``select`` and ``always_sent`` never communicate and never change the instance's state.
The ``step`` they (and ``proposal_counts``) receive is the step's turn, ``step_count + rotation``.

Class attributes tell the driver which shape the step takes (the driver's ``shape_of``: which
collectives, in which order, docs/exchange.md): ``dense`` (no selection at all: the dense
all-reduce), ``gathers_selection`` (the workers' proposals are all-gathered; False where the plan
carries every index: CLT-k), ``counts_from_plan`` (every worker's proposal count follows from the
plan: DEFT's bins), ``plans_ahead`` (the plan is made by every worker alike from the fragment norms
summed in the previous step, instead of by a leader: DEFT's ``plan="ahead"``) and
``disjoint_proposals`` (workers' proposals never overlap, so their union needs no deduplication).

``kernels`` is where the step takes its ops from: the C++/CUDA ops without re-validation by
default; :func:`deft_kernels.simulate.simulate` swaps in :mod:`deft_kernels.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .. import ops, planning
from ..planning import offsets_of

#: The ops the step calls, validation off: their inputs come from the planner and the driver,
#: valid by construction. Same names and signatures as :mod:`deft_kernels.reference`. (The step
#: writes its output with two index ops into a buffer it is given, so it does not call
#: ``sparse_unpack``, which returns a new N-element tensor.)
FAST_KERNELS = types.SimpleNamespace(**{
    name: functools.partial(getattr(ops, name), validate=False)
    for name in ("accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack")})

#: 16-bit gradient dtypes, whose residual is fp32 by default (``residual_dtype``).
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class StepStats:
    """What one sparse step on one worker reports (``DeftState.last_stats``, one per DDP bucket;
    ``GradientSparsifier.step()``, one per dtype group). Counts are elements, sizes bytes, times
    seconds of the host clock (NaN when the step was not timed: by default a step on CUDA tensors
    is not, since reading a timer there waits for the GPU; see :func:`deft_kernels.driver.step`)."""

    selected: int  # elements this worker proposed: its own selection (its bin for DEFT; 0 on CLT-k's
    # non-leaders, whose indices come with the plan)
    sent: int  # elements every worker sent values for: the global index set, the union of the proposals
    # (with DEFT's common part); sent / numel is the density actually sent
    numel: int  # elements in the flat gradient this step covered (one DDP bucket, or one dtype group)
    bytes_sent: int  # bytes this worker put on the wire: its indices (int32 below 2^31 elements, else
    # int64) and its fp32 values at the global index set
    bytes_received: int  # bytes it got back: the other workers' indices (same width) and the fp32 summed values
    t_select: float  # seconds: the plan (on the step's leader) and this worker's selection
    t_comm: float  # seconds waiting for the collectives
    t_other: float  # seconds of the rest: error feedback (accumulate), the union, writing the output

    @property
    def density(self) -> float:
        """``sent / numel``: the fraction of the elements sent this step (0.01 = 1%; 0.0 when
        ``numel`` is 0)."""
        return self.sent / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class Layout:
    """What a sparsifier's first step fixed; every later step must match it. ``dtype`` and
    ``device`` are ``None`` after restoring a state without a residual (Dense): the next step
    fixes them."""

    world_size: int
    sizes: tuple[int, ...]
    dtype: torch.dtype | None  # the gradient's (the residual's is Sparsifier.residual_dtype_for it)
    device: torch.device | None

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    @cached_property
    def bounds(self) -> list[int]:
        """Element offsets of the tensors, ``len(sizes) + 1`` of them (computed once)."""
        return offsets_of(self.sizes)


class Sparsifier:
    """Base class. Subclasses implement ``select`` and, where they need them, ``fragment_offsets``
    (default: one fragment per tensor), ``plan`` with its wire format, ``always_sent`` and
    ``observe``. :func:`deft_kernels.driver.step` runs one step.

    ``residual_dtype``: the dtype of the error-feedback residual. ``None`` (default): float32 for
    float16 and bfloat16 gradients, the gradient's dtype otherwise. A 16-bit residual rounds
    ``g + r`` to 8 (bf16) or 11 (fp16) mantissa bits, so small gradients vanish into a residual that
    has grown large; the fp32 residual costs 4 bytes per element, against 2 for a 16-bit one, both
    updated in place (the kernel adds a 16-bit gradient into an fp32 residual). A loss scale adds a
    work buffer of the residual's size: the step accumulates there and keeps the old residual until
    the iteration commits (docs/exchange.md, the memory table).

    ``rotation`` (an int, default 0, the same on every rank) shifts who leads and which bin each
    rank selects in: the step's turn is ``step_count + rotation`` (the DDP hook gives each bucket its
    index, so that one iteration's planning spreads over the ranks)."""

    name: str = "base"
    kernels: Any = FAST_KERNELS

    #: True when different workers' proposals never overlap (DEFT's bins, MiCRO's partitions).
    disjoint_proposals: bool = False
    #: True for the dense all-reduce (Dense): no selection, no residual.
    dense: bool = False
    #: False where the plan carries every index sent and nobody proposes anything (CLT-k).
    gathers_selection: bool = True
    #: True where every worker's proposal count follows from the plan (``proposal_counts``: DEFT).
    counts_from_plan: bool = False

    def __init__(self, density: float, residual_dtype: torch.dtype | None = None) -> None:
        if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density!r}")
        if residual_dtype is not None and residual_dtype not in ops.SUPPORTED_DTYPES:
            raise ValueError(f"residual_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                             f"got {residual_dtype!r}")
        self.density = float(density)
        self.residual_dtype = residual_dtype
        self.rotation = 0
        self.reset()

    def residual_dtype_for(self, grad_dtype: torch.dtype) -> torch.dtype:
        """The residual's dtype for gradients of ``grad_dtype`` (see the class docstring)."""
        if self.residual_dtype is not None:
            return self.residual_dtype
        return torch.float32 if grad_dtype in HALF_DTYPES else grad_dtype

    def reset(self) -> None:
        """Forget the residual, the step counter and the layout (the next step starts afresh)."""
        self.residual: torch.Tensor | None = None
        self.spare: torch.Tensor | None = None  # the step's work buffer, where it is not in place (driver)
        self.step_count = 0
        self.layout: Layout | None = None
        self.offsets: torch.Tensor | None = None  # host int64 fragment offsets
        #: Fragment norms summed over the workers in the latest step (host fp32), from which a
        #: sparsifier that ``plans_ahead`` makes its next plan; part of the state (``state_dict``).
        self.carried_norms: torch.Tensor | None = None
        self.pending: Any = None  # the driver's: what the latest step left to read one step later
        self.uncommitted = False  # the driver's: a loss-scaled step's update waits for commit()

    @property
    def plans_ahead(self) -> bool:
        """True when every worker makes the step's plan itself from the fragment norms summed over
        the workers in the previous step (``carried_norms``), instead of a leader making it from its
        own norms and broadcasting it (DEFT's ``plan="ahead"``). Default: False."""
        return False

    def options(self) -> dict[str, Any]:
        """The constructor's keyword options (besides ``density``) as they are in effect, for the
        step's setup agreement: ranks configured differently refuse to run together. Subclasses
        with options of their own add them."""
        return {"residual_dtype": None if self.residual_dtype is None else str(self.residual_dtype)}

    def budget(self, numel: int) -> int:
        """k, the number of elements the step should send in total: ``int(d * N)``, at least 1 for
        a non-empty vector (:func:`deft_kernels.planning.budget`)."""
        return planning.budget(self.density, numel)

    def start(self, layout: Layout) -> None:
        """First step, once the workers agreed on it: fix the layout, cut the fragments and make the
        (zero) residual."""
        self.layout = layout
        self.offsets = self.fragment_offsets(list(layout.sizes), layout.world_size)
        if not self.dense:
            self.residual = torch.zeros(layout.numel, dtype=self.residual_dtype_for(layout.dtype),
                                        device=layout.device)

    def fragment_offsets(self, sizes: list[int], world_size: int) -> torch.Tensor:
        """int64 host offsets (length F + 1) of the fragments over the flat vector of tensors of the
        given sizes: one fragment per tensor (DEFT overrides this with its fragments, docs/algorithm.md)."""
        return torch.tensor(offsets_of(sizes), dtype=torch.int64)

    # ---- the plan and how it travels --------------------------------------------------------------

    def plan(self, acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, world_size: int,
             step: int) -> Any:
        """Leader-only work whose result every worker must share. ``norms`` are on the host where the
        plan needs them there (``counts_from_plan``: read with the header), else on ``acc``'s device.
        Default: none."""
        return None

    def plan_wire(self, numel: int, offsets: torch.Tensor, world_size: int) -> tuple[int, torch.dtype] | None:
        """Length and dtype of the 1-D tensor the plan travels as, the same on every rank; ``None``
        when there is no plan."""
        return None

    def encode_plan(self, plan: Any) -> torch.Tensor:
        """The plan as the tensor ``plan_wire`` describes (any device)."""
        raise NotImplementedError(f"{type(self).__name__} has no plan to encode")

    def decode_plan(self, wire: torch.Tensor, offsets: torch.Tensor, world_size: int) -> Any:
        """What ``encode_plan`` encoded, on a worker that received ``wire``: on the host, except where
        the plan carries every index (``gathers_selection`` False: it stays on the device)."""
        raise NotImplementedError(f"{type(self).__name__} has no plan to decode")

    def proposal_counts(self, plan: Any, world_size: int, step: int) -> list[int]:
        """Each rank's proposal count, known from the plan (``counts_from_plan`` only)."""
        raise NotImplementedError(f"{type(self).__name__} does not know the proposal counts from its plan")

    # ---- selection --------------------------------------------------------------------------------

    def select(self, acc: torch.Tensor, norms: torch.Tensor, offsets: torch.Tensor, plan: Any, rank: int,
               world_size: int, step: int) -> torch.Tensor:
        """This worker's proposed indices (int64, on ``acc``'s device, into the flat vector ``acc``),
        no communication. Every sparsifier but Dense implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement select()")

    def always_sent(self, plan: Any, device: torch.device) -> torch.Tensor | None:
        """Indices every worker sends whatever it selected (DEFT's common part, CLT-k's leader
        indices), int64 on ``device`` (host data goes there with :func:`deft_kernels.transfer.to_device`,
        which does not block); ``None`` when there are none."""
        return None

    def observe(self, plan: Any, sent: torch.Tensor, numel: int, world_size: int) -> None:
        """Called on every worker after the exchange with the agreed plan, the global index set
        (sorted) and the vector's length (the same on all workers, so state updated from them stays
        in agreement). The one place where per-step algorithm state may change. Default: nothing."""

    # ---- state ------------------------------------------------------------------------------------

    def extra_state(self) -> dict:
        """Algorithm state beyond the residual and the step counter, for ``state_dict``."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` returned."""

    def state_dict(self) -> dict:
        """This worker's state: residual, step counter, world size and layout, the carried norms
        (``plans_ahead``), algorithm state. Every rank saves its own (residuals differ between
        workers). Reads first what the latest step left for later (``pending``: the driver's
        :func:`deft_kernels.driver.settle`, which raises if a rank stopped in that step)."""
        if self.pending is not None:
            self.pending.settle(self)
        if self.uncommitted:
            raise RuntimeError("the latest loss-scaled step is not committed: call deft_kernels.driver.commit "
                               "with the iteration's steps before state_dict()")
        layout = self.layout
        return {"name": self.name, "density": self.density, "residual": self.residual,
                "step_count": self.step_count, "world_size": None if layout is None else layout.world_size,
                "sizes": None if layout is None else list(layout.sizes), "extra": self.extra_state(),
                "grad_dtype": None if layout is None or layout.dtype is None else str(layout.dtype),
                "carried_norms": self.carried_norms}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the next ``step`` continues exactly. The residual
        stays on the device it was saved (or mapped) to; :meth:`to` moves it."""
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
        if state["sizes"] is not None:
            # The gradient's dtype (saved since residual_dtype: older states had it equal the residual's)
            saved = state.get("grad_dtype")
            dtype = getattr(torch, saved.removeprefix("torch.")) if saved else None
            dtype, device = (None, None) if residual is None else (dtype or residual.dtype, residual.device)
            self.layout = Layout(int(state["world_size"]), tuple(int(s) for s in state["sizes"]), dtype, device)
            self.offsets = self.fragment_offsets(list(self.layout.sizes), self.layout.world_size)
        if residual is not None:
            self.residual = residual.clone().contiguous()
        norms = state.get("carried_norms")  # absent in states saved before the plan one step ahead
        if norms is not None:
            fragments = None if self.offsets is None else self.offsets.numel() - 1
            if not isinstance(norms, torch.Tensor) or norms.dtype != torch.float32 or norms.shape != (fragments,):
                raise ValueError(f"state['carried_norms'] must be None or {fragments} float32 norms (one per fragment)")
            norms = norms.cpu().clone()
        self.carried_norms = norms
        self.step_count = int(state["step_count"])
        self.load_extra_state(state["extra"])

    def to(self, device: torch.device | str) -> Sparsifier:
        """Move the state that lives beside the gradient (the residual and the work buffer) to
        ``device``, where the gradients of the next steps are (a state loaded on the CPU and resumed
        on a GPU: the integrations call it). Returns ``self``."""
        device = torch.device(device)
        if self.residual is not None:
            self.residual = self.residual.to(device)
        if self.spare is not None:
            self.spare = self.spare.to(device)
        if self.layout is not None and self.layout.device is not None and self.layout.device != device:
            self.layout = dataclasses.replace(self.layout, device=device)
        return self


def indices_at_least(acc: torch.Tensor, threshold: float, lo: int = 0, hi: int | None = None, *,
                     kernels: Any = FAST_KERNELS) -> torch.Tensor:
    """Sorted int64 indices ``i`` in ``[lo, hi)`` with ``|acc[i]| >= threshold``, the threshold
    selection of HardThreshold, SIDCo and MiCRO. Zeros are never selected (sending them changes
    nothing) and NaNs always are (the package's NaN policy: a NaN reaches the averaged gradient).

    One pass of ``threshold_select`` from ``kernels`` (a sparsifier passes its own, so the simulation's
    reference ops serve here too) over ``acc[lo:hi]`` as one segment, compared in fp32 with
    ``threshold`` rounded to fp32 (a NaN threshold selects only the NaNs). The metadata is built on
    the CPU, so CUDA values cost no synchronisation beyond the output size."""
    part = acc[lo:hi]
    return kernels.threshold_select(part, torch.tensor([0, part.numel()]),
                                    torch.tensor([threshold], dtype=torch.float32), index_base=lo)
