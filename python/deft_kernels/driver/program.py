"""One step of a sparsifier on one rank, written once: a generator that yields collective requests
(:mod:`deft_kernels.driver.collectives`) and receives their results. docs/exchange.md tells the
whole story; in short:

**Shapes.** Which collectives a step issues, in which order, follows from its algorithm
(:func:`shape_of`; the wire format of each: :func:`wire`):

- the plan one step ahead (DEFT's default): the proposals' all-gather, then the value all-reduce,
  which also carries every rank's fragment norms and status block; every rank makes the next
  step's plan itself from the summed norms. Two collectives, no host read of device data;
- a header, then the leader's plan (DEFT's ``plan="leader"``, the paper's protocol): the header
  (each rank's status, proposal count and used tensors) all-gathered, the plan broadcast by the
  leader ``(step + rotation) % n``, the proposals, the values;
- the selection, then a header with the counts (Top-k, the hard threshold, SIDCo; MiCRO after its
  leader's plan): the counts size the proposals' all-gather;
- the plan carrying every index (CLT-k): the plan broadcast, the values with the header;
- dense: one all-reduce with the header.

Every step: check the input; at the first step agree on the setup (one all-gather) and make the
residual; ``a = g + r`` with the fragment norms; the plan; this rank's selection; the union of the
proposals (int32 on the wire below 2^31 elements) and of what everyone sends anyway; the value
all-reduce with every rank's status block; the average written into ``out``, the residual update
and ``observe``.

**Failure protocol.** A rank that rejects its input (other than at the first step, which the setup
agreement covers) or whose own work raises (accumulate, the leader's plan, select, pack) does not
raise at once: it takes part, with zeros of the agreed shapes, in every collective up to the first
one that carries its cause code to every rank, then raises its own error; every other rank raises
there, naming the rank and the cause (:class:`_Step.attempt` and :func:`raise_stopped`, the one
place). A step that plans ahead reads its status block one step later (:func:`settle`): a failure
surfaces at the start of that sparsifier's next step (the DDP hook: the next iteration), on every
rank alike, after the failed step's average has been applied without the failed rank's values.

**Unused tensors.** A tensor that no rank used in the step (the DDP hook's ``find_unused_parameters``
case: DDP then discards the hook's output for it) keeps its residual and gets a zero output: on the
device, by a mask over the sent indices, so nothing sent there is lost. Where the header comes
before the plan, the leader also gives those fragments no budget.

**Numeric rule.** Every average, sparse values and dense gradients alike: the sum over ranks in
fp32, divided by ``n`` in fp32 (times the loss scale, if any), one rounding to the gradient's dtype
(:func:`mean_of_sum`).

**Loss scale.** A loss-scaled step accumulates ``g / scale`` in a work buffer and leaves its residual
update uncommitted: :func:`commit` takes the iteration's steps, reads whether any was skipped (one
host read per iteration) and commits them all or none.

**Sync contract.** Device data reaches the host only through :mod:`deft_kernels.transfer`: at once
with ``to_host`` (counted), or one step later with ``to_host_later``. A DEFT step one step ahead
makes no ``to_host`` read after its first step; ``plan="leader"`` reads twice per rank (the leader
its norms with the header, the others the header with the plan; then every rank the status block).
Every collective's result is taken with ``Future.wait()`` (the stream rule,
:mod:`deft_kernels.driver.collectives`). The CUDA side has not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import ops
from ..sparsifiers.base import HALF_DTYPES, Layout, Sparsifier, StepStats
from ..transfer import Later, to_device, to_host, to_host_later
from .collectives import AllGather, AllReduce, Broadcast, GatherProposals, Program, union

#: Why a rank stopped, by the code its header, its plan or its value all-reduce carries (0: went on):
#: codes 1-5 reject the input, 6-9 are a failure of the step's own work on that rank (an out-of-memory
#: error, a failed launch, a bug), with the phase it happened in.
CAUSES = {
    1: "grad is not a flat float32, bfloat16 or float16 tensor",
    2: "sizes do not sum to grad's length",
    3: "grad length changed between steps",
    4: "the parameter layout (sizes) changed between steps",
    5: "grad dtype or device changed between steps",
    6: "the error-feedback accumulation raised",
    7: "the leader's plan raised",
    8: "its selection raised",
    9: "packing its values raised",
}
ACCUMULATE, PLAN, SELECT, PACK = 6, 7, 8, 9


@dataclasses.dataclass
class StepResult:
    """What one step on one rank produced."""

    out: torch.Tensor  # the averaged gradient, zero outside the global index set
    stats: StepStats
    plan: Any = None  # the plan this rank used (None without one)
    selected: torch.Tensor | None = None  # this rank's proposal (None on the dense path)
    sent: torch.Tensor | None = None  # the global index set: sorted, or (plan one step ahead) the
    # bins' proposals and the common part concatenated (None on the dense path)
    accumulated: torch.Tensor | None = None  # a = g + r before the exchange, when asked for
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase (Laps)
    # A loss-scaled step whose output was not finite (the scaler skips it): True/False, or a device bool
    # tensor where the step read nothing on the host (plan one step ahead); :func:`commit` reads it.
    skipped: bool | torch.Tensor = False


class Laps:
    """Seconds one rank's step spends per phase: ``plan``, ``select``, ``comm`` (waiting for the
    collectives) and ``other``. ``clock`` is a host clock (``None``: not timed, every time NaN);
    ``sync_device`` a CUDA device to synchronise at each lap, so that a host clock sees the GPU's
    work; ``count_waits=False`` leaves waits out (a simulated rank "waits" while the others run)."""

    PHASES = ("plan", "select", "comm", "other")

    def __init__(self, clock: Callable[[], float] | None = time.perf_counter, *,
                 sync_device: torch.device | None = None, count_waits: bool = True) -> None:
        self.clock, self.sync_device, self.count_waits = clock, sync_device, count_waits
        self.times = dict.fromkeys(self.PHASES, 0.0 if clock is not None else math.nan)
        self._last = 0.0

    @classmethod
    def default_for(cls, device: torch.device) -> Laps:
        """Host clock on CPU tensors; untimed on CUDA, where reading a timer synchronises."""
        return cls() if device.type != "cuda" else cls(None)

    def _now(self) -> float:
        if self.sync_device is not None:
            torch.cuda.synchronize(self.sync_device)
        return self.clock()

    def start(self) -> None:
        """Time from now (a step calls it when it begins to run)."""
        if self.clock is not None:
            self._last = self._now()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        if self.clock is not None:
            now = self._now()
            self.times[phase] += now - self._last
            self._last = now

    def waited(self) -> None:
        """A collective's result arrived."""
        if self.count_waits:
            self.lap("comm")
        else:
            self.start()


def mean_of_sum(total: torch.Tensor, world_size: int, dtype: torch.dtype,
                loss_scale: float | None = None) -> torch.Tensor:
    """The one numeric rule of every average: the fp32 sum over the ranks divided by ``n`` in fp32
    (in place; times the loss scale, when the values were unscaled), one rounding to ``dtype``."""
    total.div_(world_size)
    if loss_scale is not None:
        total.mul_(loss_scale)
    return total.to(dtype)


def check_input(layout: Layout | None, grad: Any, sizes: Sequence[int] | None) -> tuple[int, Exception | None, list[int] | None]:
    """``(code, error, sizes)``: code 0 and the sizes as a list when ``grad`` (with ``sizes``) is a
    valid step input that matches ``layout`` (``None``: first step), else a :data:`CAUSES` code and
    the error this rank raises."""
    if not isinstance(grad, torch.Tensor):
        return 1, TypeError(f"grad must be a torch.Tensor, got {type(grad).__name__}"), None
    if grad.dtype not in ops.SUPPORTED_DTYPES:
        return 1, TypeError(f"grad must be a float tensor (float32, bfloat16 or float16), got {grad.dtype}"), None
    if grad.dim() != 1:
        return 1, ValueError(f"grad must be a flat 1-D tensor, got shape {tuple(grad.shape)}"), None
    try:
        sizes = [grad.numel()] if sizes is None else [int(s) for s in sizes]
    except (TypeError, ValueError):
        return 2, TypeError(f"sizes must be a sequence of ints, got {sizes!r}"), None
    if any(s < 0 for s in sizes) or sum(sizes) != grad.numel():
        return 2, ValueError(f"sizes must be non-negative and sum to grad.numel() = {grad.numel()}, "
                             f"got {len(sizes)} sizes summing to {sum(sizes)}"), None
    if layout is None:
        return 0, None, sizes
    if grad.numel() != layout.numel:
        return 3, ValueError(f"grad length changed between steps ({layout.numel} -> {grad.numel()}); "
                             "call reset() to start afresh"), None
    if tuple(sizes) != layout.sizes:
        return 4, ValueError("the parameter layout (sizes) changed between steps; call reset() to start afresh"), None
    if layout.dtype is not None and (grad.dtype, grad.device) != (layout.dtype, layout.device):
        return 5, ValueError(f"grad is {grad.dtype} on {grad.device} but earlier steps were {layout.dtype} on "
                             f"{layout.device}; call reset() to start afresh"), None
    return 0, None, sizes


# ---- the shape of a step -------------------------------------------------------------------------


class Shape(enum.Enum):
    """Which collectives a step issues, in which order (docs/exchange.md): the algorithm's, by
    :func:`shape_of`."""

    #: DEFT, ``plan="ahead"``: proposals, values (with norms and status); the first step sums the norms first.
    AHEAD = "proposals, values"
    #: DEFT, ``plan="leader"``: header, the leader's plan, proposals, values.
    HEADER_THEN_PLAN = "header, plan, proposals, values"
    #: Top-k, hard threshold, SIDCo; MiCRO with its leader's plan first: the counts known after the selection.
    SELECT_THEN_HEADER = "[plan], header, proposals, values"
    #: CLT-k: the plan carries every index sent; the header rides with the values.
    PLAN_CARRIES_ALL = "plan, values"
    #: Dense: one all-reduce with the header.
    DENSE = "values"


def shape_of(sp: Sparsifier) -> Shape:
    """The step's shape, from the algorithm's own traits (``dense``, ``plans_ahead``,
    ``gathers_selection``, ``counts_from_plan``: :class:`~deft_kernels.sparsifiers.base.Sparsifier`)."""
    if sp.dense:
        return Shape.DENSE
    if sp.plans_ahead:
        return Shape.AHEAD
    if not sp.gathers_selection:
        return Shape.PLAN_CARRIES_ALL
    return Shape.HEADER_THEN_PLAN if sp.counts_from_plan else Shape.SELECT_THEN_HEADER


# ---- the wire format ------------------------------------------------------------------------------
# What a step's collectives carry (docs/exchange.md, the wire format), written once: the step builds
# its tensors from these, and deft-bench project sizes its model of the step by :func:`wire`.

#: The header row: these fields, then one used flag per tensor.
HEADER_FIELDS = ("code", "count")
HEADER_DTYPE = torch.int64
#: Slots after the encoded plan in the plan's broadcast: the leader's status (0, or its cause code).
PLAN_STATUS_SLOTS = 1
#: Vectors shorter than this send their indices as int32, longer ones as int64.
INT32_INDEX_LIMIT = 2**31
#: The setup agreement's row: input valid, grad length, a digest of the setup.
SETUP_ELEMENTS = 3


def header_elements(tensors: int) -> int:
    """Elements of one rank's header row for a layout of ``tensors`` tensors."""
    return len(HEADER_FIELDS) + tensors


def plan_wire_elements(plan_length: int) -> int:
    """Elements of the plan's broadcast: the encoded plan (``plan_wire``'s length) and the status slot."""
    return plan_length + PLAN_STATUS_SLOTS


def index_dtype(numel: int) -> torch.dtype:
    """The dtype the proposals travel in for a vector of ``numel`` elements."""
    return torch.int32 if numel < INT32_INDEX_LIMIT else torch.int64


def tail_elements(shape: Shape, world_size: int, tensors: int, fragments: int, loss_scaled: bool = False) -> int:
    """fp32 slots after the values in the value all-reduce: the fragment norms where the plan is
    made one step ahead, each rank's code, one user count per tensor where no header traveled
    before (the plan one step ahead, CLT-k), and with a loss scale one slot more: the count of ranks
    whose ``a`` is not finite. Dense: the codes only."""
    if shape is Shape.DENSE:
        return world_size
    slots = world_size + int(loss_scaled)
    if shape is Shape.AHEAD:
        return fragments + slots + tensors
    return slots + (tensors if shape is Shape.PLAN_CARRIES_ALL else 0)


@dataclasses.dataclass(frozen=True)
class Wire:
    """One collective of a step as it travels: the request, what it carries, its elements per rank
    (all-gathers: each rank's part) and dtype."""

    request: str  # "AllGather", "Broadcast", "GatherProposals" or "AllReduce"
    role: str  # "setup", "header", "plan", "norms", "indices" or "values"
    elements: float
    dtype: torch.dtype


def wire(shape: Shape, *, world_size: int, numel: int, tensors: int, fragments: int, union_size: float,
         max_count: float, plan: tuple[int, torch.dtype] | None = None, loss_scaled: bool = False,
         first: bool = False) -> list[Wire]:
    """The collectives of one step in the order the step issues them, for a layout of ``numel``
    elements in ``tensors`` tensors and ``fragments`` fragments at ``world_size`` ranks, a union of
    ``union_size`` indices, the largest proposal count ``max_count`` (the proposals' all-gather is
    left out when it is 0: every rank knows the counts) and the sparsifier's ``plan_wire`` (``plan``).
    ``first``: the sparsifier's first step (the setup agreement; the plan one step ahead sums the
    current norms first, as it has none from a previous step)."""
    n = world_size
    seq = [Wire("AllGather", "setup", SETUP_ELEMENTS, torch.int64)] if first else []
    values = Wire("AllReduce", "values", union_size + tail_elements(shape, n, tensors, fragments, loss_scaled),
                  torch.float32)
    if shape is Shape.DENSE:
        return seq + [Wire("AllReduce", "values", numel + tail_elements(shape, n, tensors, fragments), torch.float32)]
    header = Wire("AllGather", "header", header_elements(tensors), HEADER_DTYPE)
    broadcast = [] if plan is None else [Wire("Broadcast", "plan", plan_wire_elements(plan[0]), plan[1])]
    proposals = [Wire("GatherProposals", "indices", max_count, index_dtype(numel))] if max_count else []
    if shape is Shape.AHEAD:
        norms = [Wire("AllReduce", "norms", fragments + n, torch.float32)] if first else []
        return seq + norms + proposals + [values]
    if shape is Shape.HEADER_THEN_PLAN:
        return seq + [header, *broadcast, *proposals, values]
    if shape is Shape.SELECT_THEN_HEADER:
        return seq + [*broadcast, header, *proposals, values]
    return seq + [*broadcast, values]  # PLAN_CARRIES_ALL


# ---- the header -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Header:
    codes: list[int]  # per rank: 0, or why it rejected its input
    counts: list[int]  # per rank: proposal count (only where the header travels after the selection)
    used: list[bool]  # per tensor: some rank used it

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> _Header:
        """From the all-gathered int64 rows ``[code, count, used per tensor]``, on the host."""
        fields = len(HEADER_FIELDS)
        return cls(rows[:, 0].tolist(), rows[:, 1].tolist(), (rows[:, fields:] != 0).any(0).tolist())

    @property
    def accepted(self) -> bool:
        return not any(self.codes)

    def unused_ranges(self, layout: Layout) -> list[tuple[int, int]]:
        """Element ranges of the non-empty tensors no rank used."""
        if all(self.used):
            return []
        bounds, sizes = layout.bounds, layout.sizes
        return [(bounds[i], bounds[i + 1]) for i, u in enumerate(self.used) if not u and sizes[i]]


def raise_stopped(codes: Sequence[int], code: int, error: Exception | None, step: int) -> None:
    """The failure protocol's end, on every rank after the same collective: this rank's own error
    first; else, when another rank stopped (``codes``: one per rank), an error naming it and why."""
    if code:
        raise error
    bad = [(r, int(c)) for r, c in enumerate(codes) if c]
    if bad:
        causes = "; ".join(f"rank {r}: {CAUSES.get(c, f'cause {c}')}" for r, c in bad)
        raise ValueError(f"another rank stopped at step {step} ({causes}); every rank stops. This rank's "
                         "residual keeps this step's gradient; reset() every rank to start afresh")


def _header_row(code: int, count: int, used: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[code, count, used per tensor]`` built on the host and uploaded in one piece."""
    row = torch.empty(header_elements(used.numel()), dtype=HEADER_DTYPE)
    row[0], row[1] = code, count
    row[len(HEADER_FIELDS):] = used
    return to_device(row, device)


def _used_flags(used: torch.Tensor | None, layout: Layout) -> torch.Tensor | None:
    """This rank's host flag per tensor (the tensors it used), or ``None``: usage not tracked."""
    if used is None:
        return None
    if not isinstance(used, torch.Tensor) or used.dim() != 1 or used.numel() != len(layout.sizes) \
            or used.device.type != "cpu":
        raise ValueError(f"used must be a 1-D CPU tensor with one flag per tensor ({len(layout.sizes)})")
    return used


def _within(ranges: list[tuple[int, int]], offsets: torch.Tensor) -> torch.Tensor:
    """Mask of the fragments lying inside one of ``ranges``."""
    starts, ends = offsets[:-1], offsets[1:]
    mask = torch.zeros(starts.numel(), dtype=torch.bool)
    for lo, hi in ranges:
        mask |= (starts >= lo) & (ends <= hi)
    return mask


# ---- reading one step later, committing once per iteration ---------------------------------------


@dataclasses.dataclass
class _Pending:
    """What a step that plans ahead leaves to read one step later: its value all-reduce's tail
    (``[summed norms | codes | users per tensor (| non-finite count)]``) on its way to the host."""

    tail: Later
    fragments: int
    world_size: int
    step: int
    code: int  # this rank's own cause in that step (0: none)
    error: Exception | None

    def settle(self, sp: Sparsifier) -> None:
        """:func:`settle` (the sparsifier calls it too, before ``state_dict``: it imports no driver)."""
        sp.pending = None
        tail = self.tail.get()
        f, n = self.fragments, self.world_size
        raise_stopped([int(c) for c in tail[f:f + n].tolist()], self.code, self.error, self.step)
        sp.carried_norms = tail[:f].float().clone()


def settle(sp: Sparsifier) -> None:
    """Read what ``sp``'s latest step left for later (a step that plans ahead: the status block and
    the summed fragment norms; nothing otherwise), at most waiting for its own copy: raise, on every
    rank alike, when a rank stopped in that step (the failure protocol, one step late); else keep
    the summed norms for the next plan (``carried_norms``). A step calls it first; the DDP hook calls
    it for every bucket at the start of an iteration; ``Sparsifier.state_dict`` before it saves."""
    if sp.pending is not None:
        sp.pending.settle(sp)


def commit(steps: Sequence[tuple[Sparsifier, StepResult]]) -> bool:
    """Commit the residual updates of one iteration's loss-scaled steps (one per bucket or dtype
    group), all or none: when any step was skipped (its output is not finite, so the scaler skips
    the optimizer step, discarding every output), every residual stays as before the iteration.
    Reads the steps' skip flags that are still on the device in one host read. Returns whether the
    iteration was skipped; each result's ``skipped`` becomes a bool. Steps without a loss scale
    have committed already (nothing to do)."""
    flags = [r.skipped for _, r in steps]
    on_device = [f.reshape(1) for f in flags if isinstance(f, torch.Tensor)]
    read = iter(to_host(torch.cat(on_device))[0].tolist() if on_device else [])
    flags = [bool(next(read)) if isinstance(f, torch.Tensor) else bool(f) for f in flags]
    skipped = any(flags)
    for (sp, result), flag in zip(steps, flags):
        result.skipped = flag
        if sp.uncommitted:
            sp.uncommitted = False
            if not skipped:
                sp.residual, sp.spare = sp.spare, sp.residual
    return skipped


# ---- the step -------------------------------------------------------------------------------------


def step_program(sp: Sparsifier, grad: torch.Tensor, *, sizes: Sequence[int] | None = None, rank: int = 0,
                 world_size: int = 1, used: torch.Tensor | None = None, laps: Laps | None = None,
                 keep_accumulated: bool = False, out: torch.Tensor | None = None,
                 loss_scale: float | None = None) -> Program:
    """One step of ``sp`` on rank ``rank`` of ``world_size`` (see the module docstring); returns a
    :class:`StepResult`. ``used``: one CPU flag per tensor of ``sizes``, the tensors this rank used in
    the step (``None``: usage not tracked, every tensor counts as used; every rank tracks or none, which
    the setup agreement checks). ``keep_accumulated``: also return ``a = g + r``. ``out``: a tensor
    like ``grad`` that the step overwrites with its result and returns (the DDP hook passes the
    bucket's own buffer, as PowerSGD's hook does; it may be ``grad`` itself, which the step has read by
    then); default: a new tensor. ``loss_scale``: the factor ``grad`` carries (a ``GradScaler``'s
    scale): the residual then holds unscaled values (``grad / loss_scale`` is what it accumulates),
    the output is scaled back, and the residual update waits for :func:`commit` (which leaves the
    residual as it was when the iteration is skipped). Reads what the previous step left for later
    first (:func:`settle`)."""
    settle(sp)
    if sp.uncommitted:
        raise RuntimeError("the previous loss-scaled step of this sparsifier is not committed: call "
                           "deft_kernels.driver.commit with the iteration's steps first")
    layout = sp.layout
    if layout is not None and world_size != layout.world_size:  # another group: no peers to tell
        raise ValueError(f"world size changed between steps ({layout.world_size} -> {world_size}); "
                         "call reset() to start afresh")
    if out is not None and not (isinstance(out, torch.Tensor) and isinstance(grad, torch.Tensor)
                                and (out.shape, out.dtype, out.device) == (grad.shape, grad.dtype, grad.device)):
        raise ValueError("out must be a tensor of grad's shape, dtype and device")
    if loss_scale is not None and not (isinstance(loss_scale, (int, float)) and 0 < loss_scale < math.inf):
        raise ValueError(f"loss_scale must be a positive finite number or None, got {loss_scale!r}")
    laps = laps or Laps.default_for(grad.device if isinstance(grad, torch.Tensor) else torch.device("cpu"))
    laps.start()
    code, error, sizes = check_input(layout, grad, sizes)
    if code and world_size == 1:  # no peers to keep in step
        raise error
    if layout is None:
        yield from _agree_on_setup(sp, grad, sizes, code, error, world_size, tracked=used is not None)
        sp.start(Layout(world_size, tuple(sizes), grad.dtype, grad.device))
    elif layout.dtype is None and not code:
        sp.layout = dataclasses.replace(layout, dtype=grad.dtype, device=grad.device)
    if sp.dense:
        result = yield from _dense(grad, code, error, rank, world_size, laps, layout=sp.layout, header=True,
                                   step=sp.step_count, out=out)
        sp.step_count += 1
        return result
    step = _Step(sp, grad, rank, world_size, laps, code, error, _used_flags(used, sp.layout), loss_scale)
    try:
        return (yield from step.run(keep_accumulated, out))
    except Exception:
        step.keep_gradient()
        raise


class _Step:
    """One sparse step on one rank, in its sparsifier's shape (:func:`shape_of`).

    The failure protocol in one place: :meth:`attempt` runs a phase of this rank's own work; when
    the rank has stopped already (rejected input, an earlier phase raised) or the phase raises, the
    cause is recorded and the phase's fallback (zeros of the agreed shape) stands in for its result,
    so the rank takes part in every collective up to the next one that carries its code to every
    rank; :meth:`stop_if_any` then raises on every rank alike (:func:`raise_stopped`)."""

    def __init__(self, sp: Sparsifier, grad, rank: int, n: int, laps: Laps, code: int, error: Exception | None,
                 used: torch.Tensor | None, loss_scale: float | None) -> None:
        self.sp, self.grad, self.rank, self.n, self.laps = sp, grad, rank, n, laps
        self.code, self.error = code, error
        self.used, self.loss_scale = used, loss_scale
        self.step = sp.step_count
        self.turn = sp.step_count + sp.rotation  # who leads, and the bins' rotation (docs/exchange.md)
        self.shape = shape_of(sp)
        self.layout = sp.layout
        self.device = sp.layout.device
        self.fragments = sp.offsets.numel() - 1
        self.acc: torch.Tensor | None = None

    def attempt(self, cause: int, work: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        if not self.code:
            try:
                return work()
            except Exception as e:  # noqa: BLE001 -- the failure protocol carries it
                self.code, self.error = cause, e
        return fallback()

    def stop_if_any(self, codes: Sequence[int]) -> None:
        raise_stopped(codes, self.code, self.error, self.step)

    def keep_gradient(self) -> None:
        """On a raise: the residual keeps this step's gradient (as the in-place accumulation does)."""
        if self.acc is not None:
            _commit(self.sp, self.acc)

    def _zeros(self, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(count, dtype=dtype, device=self.device)

    def run(self, keep: bool, out: torch.Tensor | None) -> Program:
        sp, laps, layout = self.sp, self.laps, self.layout
        self.acc, norms = self.attempt(ACCUMULATE, lambda: _accumulate(sp, self.grad, self.loss_scale),
                                       lambda: (None, self._zeros(self.fragments)))
        accumulated = self.acc.clone() if keep and self.acc is not None else None
        laps.lap("other")
        plan, counts, users = yield from self._agree(norms)
        laps.lap("other")
        selected = self.attempt(SELECT, lambda: sp.select(self.acc, norms, sp.offsets, plan, self.rank, self.n,
                                                          self.turn),
                                lambda: self._zeros(0 if counts is None else counts[self.rank], torch.int64))
        laps.lap("select")
        if counts is None:  # known only now: they travel in the header and size the proposals' all-gather
            counts, users = yield from self._header(selected.numel())
        sent, index_bytes, others_bytes = yield from self._gather(selected, counts, plan)
        values = self.attempt(PACK, lambda: sp.kernels.sparse_pack(self.acc, sent).float(),
                              lambda: self._zeros(sent.numel()))
        laps.lap("other")
        vals, users, skipped = yield from self._values(values, norms, users)
        out = self._apply(out, sent, vals, users, skipped)
        sp.observe(plan, sent, layout.numel, self.n)
        sp.step_count += 1
        laps.lap("other")
        times = laps.times
        carried = 4 * self.fragments if self.shape is Shape.AHEAD else 0  # the norms beside the values
        stats = StepStats(selected=selected.numel(), sent=sent.numel(), numel=layout.numel,
                          bytes_sent=index_bytes + 4 * sent.numel() + carried,
                          bytes_received=others_bytes + 4 * sent.numel() + carried,
                          t_select=times["plan"] + times["select"], t_comm=times["comm"], t_other=times["other"])
        return StepResult(out, stats, plan, selected, sent, accumulated, dict(times), skipped)

    # ---- agreeing on the plan: the shape's own part ----

    def _agree(self, norms: torch.Tensor) -> Program:
        """The plan, every rank's proposal count (``None`` where only the selection knows it) and the
        users per tensor where a header told them (``None`` otherwise)."""
        sp, n = self.sp, self.n
        if self.shape is Shape.AHEAD:
            plan = yield from self._plan_ahead(norms)
            return plan, sp.proposal_counts(plan, n, self.turn), None
        if self.shape is Shape.HEADER_THEN_PLAN:
            header, plan = yield from self._header_then_plan(norms)
            return plan, sp.proposal_counts(plan, n, self.turn), header.used
        plan = None
        if sp.plan_wire(self.layout.numel, sp.offsets, n) is not None:
            plan = yield from self._leader_plan(norms)
        counts = [0] * n if self.shape is Shape.PLAN_CARRIES_ALL else None
        return plan, counts, None

    def _plan_ahead(self, norms: torch.Tensor) -> Program:
        """Every rank makes the plan itself, alike, from the fragment norms summed over the ranks:
        the previous step's (``carried_norms``), or, at the first step, the current ones summed in one
        all-reduce first (with every rank's code) and read on the host once. The plan is a
        deterministic host computation from identical inputs: it raises on every rank alike or on
        none, so it needs no status of its own."""
        sp, n, laps = self.sp, self.n, self.laps
        summed = sp.carried_norms
        if summed is None:
            codes = torch.zeros(n, dtype=torch.float32)
            codes[self.rank] = self.code
            total = yield AllReduce(torch.cat([norms.float(), to_device(codes, self.device)]))
            laps.waited()
            (total,) = to_host(total)
            self.stop_if_any([int(c) for c in total[self.fragments:].tolist()])
            summed = total[:self.fragments]
        laps.lap("other")
        plan = sp.plan(None, summed, sp.offsets, n, self.turn)
        laps.lap("plan")
        return plan

    def _header_then_plan(self, norms: torch.Tensor) -> Program:
        """The header all-gathered first; the leader reads it with its norms and plans (giving tensors no
        rank used no budget), the others read it with the plan it broadcasts: one transfer each. A
        leader whose plan raises broadcasts the sentinel plan, and every rank raises after it."""
        sp, rank, n, laps, layout = self.sp, self.rank, self.n, self.laps, self.layout
        offsets = sp.offsets
        length, dtype = sp.plan_wire(layout.numel, offsets, n)
        leader = self.turn % n
        rows = yield AllGather(_header_row(self.code, 0, self._flags(), self.device))
        laps.waited()
        rows = torch.stack(rows)
        plan, status = None, 0
        if rank == leader:
            norms, rows = to_host(norms, rows)
            header = _Header.from_rows(rows)
            wire_ = None
            if header.accepted:
                def make():
                    masked = norms.masked_fill(_within(header.unused_ranges(layout), offsets), 0)
                    laps.lap("other")
                    made = sp.plan(self.acc, masked, offsets, n, self.turn)
                    laps.lap("plan")
                    return made, _plan_wire(sp.encode_plan(made), 0, dtype, self.device)
                plan, wire_ = self.attempt(PLAN, make, lambda: (None, None))
                status = self.code
            if wire_ is None:  # somebody stops: only the plan's shape must agree
                wire_ = _failed_wire(length, status, dtype, self.device)
            laps.lap("other")
            yield Broadcast(wire_, leader)
        else:
            wire_ = yield Broadcast(torch.empty(plan_wire_elements(length), dtype=dtype, device=self.device), leader)
            rows, wire_ = to_host(rows, wire_)
            header = _Header.from_rows(rows)
            status = int(wire_[-1])
            if header.accepted and not status:
                plan = sp.decode_plan(wire_[:-1], offsets, n)
        laps.waited()
        codes = list(header.codes)
        codes[leader] = codes[leader] or status
        self.stop_if_any(codes)
        return header, plan

    def _leader_plan(self, norms: torch.Tensor) -> Program:
        """The leader plans alone and broadcasts; the header comes later. The selection reads the plan
        on the host, and so does the status slot: a leader that stopped (bad input or a failed plan)
        makes every rank raise right after the broadcast. Where the plan carries every index (CLT-k),
        it stays on the device, every rank decodes the wire (a stopped leader's zeros included, so the
        shapes agree) and the leader's code reaches the others with the values."""
        sp, rank, n, laps, layout = self.sp, self.rank, self.n, self.laps, self.layout
        offsets = sp.offsets
        length, dtype = sp.plan_wire(layout.numel, offsets, n)
        on_device = self.shape is Shape.PLAN_CARRIES_ALL
        leader = self.turn % n
        if rank == leader:
            def make():
                made = sp.plan(self.acc, norms, offsets, n, self.turn)
                laps.lap("plan")
                return made, _plan_wire(sp.encode_plan(made), 0, dtype, self.device)
            plan, wire_ = self.attempt(PLAN, make, lambda: (None, None))
            if wire_ is None:
                wire_ = _failed_wire(length, self.code, dtype, self.device)
                plan = sp.decode_plan(wire_[:-1], offsets, n) if on_device else None
            laps.lap("other")
            yield Broadcast(wire_, leader)
            status = self.code
        else:
            wire_ = yield Broadcast(torch.empty(plan_wire_elements(length), dtype=dtype, device=self.device), leader)
            if on_device:
                plan, status = sp.decode_plan(wire_[:-1], offsets, n), 0
            else:
                (wire_,) = to_host(wire_)
                status = int(wire_[-1])
                plan = None if status else sp.decode_plan(wire_[:-1], offsets, n)
        laps.waited()
        if status and not on_device:
            codes = [0] * n
            codes[leader] = status
            self.stop_if_any(codes)
        return plan

    def _header(self, count: int) -> Program:
        """The header after the selection: every rank's code, proposal count and used tensors."""
        rows = yield AllGather(_header_row(self.code, count, self._flags(), self.device))
        self.laps.waited()
        header = _Header.from_rows(to_host(torch.stack(rows))[0])
        self.stop_if_any(header.codes)
        return header.counts, header.used

    def _flags(self) -> torch.Tensor:
        """This rank's used flag per tensor (all set where usage is not tracked)."""
        return self.used if self.used is not None else torch.ones(len(self.layout.sizes), dtype=torch.bool)

    # ---- the exchange ----

    def _gather(self, selected: torch.Tensor, counts: list[int], plan: Any) -> Program:
        """The union of every rank's proposal and of what everyone sends anyway: the bins' proposals
        and the common part concatenated where the plan is made ahead (disjoint by construction,
        each rank's count known: no sort, no deduplication), sorted where proposals are disjoint,
        deduplicated otherwise. Returns it and the index bytes this rank sent and received."""
        sp = self.sp
        fixed = sp.always_sent(plan, self.device)
        if not sp.gathers_selection:
            return (fixed if fixed is not None else self._zeros(0, torch.int64)), 0, 0
        wire_dtype = index_dtype(self.layout.numel)  # int32 where every index fits: half the bytes
        parts = []
        if max(counts):  # every rank knows the counts: none gathers when all are empty
            self.laps.lap("other")
            parts = yield GatherProposals(selected.to(wire_dtype), counts)
            self.laps.waited()
        every = parts if fixed is None else [*parts, fixed]
        if self.shape is Shape.AHEAD:
            sent = torch.cat([p.long() for p in every]) if every else self._zeros(0, torch.int64)
        else:
            sent = union(every, sp.disjoint_proposals, self.device)
        mine = selected.numel() * wire_dtype.itemsize
        return sent, mine, (sum(counts) * wire_dtype.itemsize - mine) if parts else 0

    def _values(self, values: torch.Tensor, norms: torch.Tensor, users: list[bool] | None) -> Program:
        """The value all-reduce with its tail (:func:`tail_elements`): the fragment norms where the plan
        is made ahead, each rank's code in its own slot, each rank's used flags where no header told
        them (the sums: users per tensor), and with a loss scale the count of ranks whose ``a`` is not
        finite. Returns the values to write (the mean, scaled back by the loss scale), the users per
        tensor and whether the scaler skips the step. The tail is read at once on the host, and every
        rank raises when some rank stopped; where the plan is made ahead it goes to the host one step
        later (:func:`settle`) and users and skip stay on the device."""
        n, rank, sp = self.n, self.rank, self.sp
        tensors = len(self.layout.sizes)
        with_users = users is None
        block = torch.zeros(n + (tensors if with_users else 0), dtype=torch.float32)
        block[rank] = self.code
        if with_users:
            block[n:] = self._flags()
        parts = [values]
        if self.shape is Shape.AHEAD:
            parts.append(norms.float())
        parts.append(to_device(block, self.device))
        if self.loss_scale is not None:  # an inf the plan does not send must stop every rank's step too
            # from the fragment norms (a non-finite element makes its fragment's norm so): no N-element
            # temporaries (torch.isfinite over a took 7 bytes per element); a finite element whose square
            # overflows fp32 (|a| > 1.8e19) counts as non-finite too, and the step is skipped
            parts.append((~torch.isfinite(norms).all()).float().reshape(1) if self.acc is not None
                         else self._zeros(1))
        total = yield AllReduce(torch.cat(parts))
        self.laps.waited()
        m = values.numel()
        vals = mean_of_sum(total[:m], n, self.layout.dtype, self.loss_scale)
        tail = total[m:]
        if self.shape is Shape.AHEAD:
            sp.pending = _Pending(to_host_later(tail), self.fragments, n, self.step, self.code, self.error)
            start = self.fragments + n
            users = tail[start:start + tensors] if self.used is not None else None
            skipped = False if self.loss_scale is None else (tail[-1] > 0) | ~torch.isfinite(vals).all()
            return vals, users, skipped
        reads = [tail] if self.loss_scale is None else [tail, torch.isfinite(vals).all()]
        status, *finite = to_host(*reads)
        self.stop_if_any([int(c) for c in status[:n].tolist()])
        if with_users:
            users = (status[n:n + tensors] > 0).tolist()
        skipped = self.loss_scale is not None and not (bool(finite[0]) and not status[-1] > 0)
        return vals, users, skipped

    def _kept(self, sent: torch.Tensor, users: list[bool] | torch.Tensor | None) -> torch.Tensor | None:
        """Per sent index, whether some rank used its tensor (a device mask), or ``None`` when every
        tensor counts as used."""
        if users is None:
            return None
        if isinstance(users, list):
            if all(users):
                return None
            flags = to_device(torch.tensor(users), self.device)
        else:
            flags = users > 0
        ends = to_device(torch.tensor(self.layout.bounds[1:], dtype=torch.int64), self.device)
        return flags[torch.bucketize(sent, ends, right=True)]

    def _apply(self, out, sent, vals, users, skipped) -> torch.Tensor:
        """The average into ``out`` (zero elsewhere; zero too where no rank used the tensor, whose
        residual keeps its values), the residual update (committed now, or by :func:`commit` after a
        loss-scaled step), an inf in ``out[0]`` where the scaler skips the step. A rank that stopped
        in a step read one step later keeps its whole ``a``: its values were not sent."""
        layout, acc = self.layout, self.acc
        kept = self._kept(sent, users)
        if kept is not None:
            vals = torch.where(kept, vals, 0)
        if out is None:
            out = torch.zeros(layout.numel, dtype=layout.dtype, device=self.device)
        else:
            out.zero_()
        out.index_copy_(0, sent, vals)
        if isinstance(skipped, torch.Tensor) and out.numel():
            out[:1] = torch.where(skipped, math.inf, out[:1])
        elif skipped and out.numel():  # a non-finite gradient not sent: the scaler must skip this step too
            out[0] = math.inf
        if acc is None:
            return out
        if not self.code:
            if kept is None:
                acc.index_fill_(0, sent, 0)
            else:  # nobody used these tensors: DDP discards their output, their residual keeps them
                acc.index_copy_(0, sent, torch.where(kept, 0, acc.index_select(0, sent)))
        if self.loss_scale is None:
            _commit(self.sp, acc)
        else:
            self.sp.uncommitted = True
        self.acc = None  # nothing left for keep_gradient to do
        return out


def _plan_wire(encoded: torch.Tensor, status: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The plan as it travels: the encoded plan and one status slot (0, or the leader's cause code)."""
    return torch.cat([to_device(encoded, device), torch.full((PLAN_STATUS_SLOTS,), status, dtype=dtype, device=device)])


def _failed_wire(length: int, status: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The sentinel plan of a leader that stopped: zeros of the agreed shape, its cause in the slot."""
    wire_ = torch.zeros(plan_wire_elements(length), dtype=dtype, device=device)
    wire_[-1] = status
    return wire_


def _accumulate(sp: Sparsifier, grad: torch.Tensor, loss_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = g + r`` and its fragment norms. In place in the residual wherever the kernel can add the
    gradient into it (the same dtype, or a 16-bit gradient into an fp32 residual, the default for
    bf16 and fp16 gradients): no other buffer. With a loss scale (or a pair the kernel does not
    take, a 16-bit residual for fp32 gradients), in the sparsifier's spare buffer (``g / loss_scale
    + r`` in the residual's dtype), which becomes the residual when the step commits, the old
    residual becoming the spare: the residual stays as it was until then (a skipped step)."""
    residual = sp.residual
    if loss_scale is None and (residual.dtype == grad.dtype or
                               (grad.dtype in HALF_DTYPES and residual.dtype == torch.float32)):
        return residual, sp.kernels.accumulate_norms(grad, residual, sp.offsets)
    work = sp.spare
    if work is None:
        work = sp.spare = torch.empty_like(residual)
    work.copy_(grad)
    if loss_scale is not None:
        work.div_(loss_scale)
    return work, sp.kernels.accumulate_norms(residual, work, sp.offsets)


def _commit(sp: Sparsifier, acc: torch.Tensor) -> None:
    if acc is not sp.residual:
        sp.residual, sp.spare = acc, sp.residual


# ---- the first step's agreement and the dense path ------------------------------------------------


def mean_program(tensor: torch.Tensor, *, rank: int = 0, world_size: int = 1, laps: Laps | None = None,
                 in_place: bool = False) -> Program:
    """The dense path without a sparsifier (the warm-up steps of the integrations): the mean over
    the ranks of ``tensor`` by :func:`mean_of_sum`, in a new tensor; with ``in_place`` (the DDP hook's
    warm-up) an fp32 ``tensor`` is all-reduced and divided in place and returned, as DDP does (16-bit
    tensors still go through an fp32 copy: the numeric rule). No header: the caller builds ``tensor``
    itself, so it is valid on every rank."""
    laps = laps or Laps.default_for(tensor.device)
    laps.start()
    if in_place and tensor.dtype == torch.float32 and tensor.is_contiguous():
        total = yield AllReduce(tensor)
        laps.waited()
        out = (total if total is tensor else tensor.copy_(total)).div_(world_size)  # the simulation: a copy
        laps.lap("other")
        numel = out.numel()
        stats = StepStats(selected=numel, sent=numel, numel=numel, bytes_sent=4 * numel, bytes_received=4 * numel,
                          t_select=0.0, t_comm=laps.times["comm"], t_other=laps.times["other"])
        return StepResult(out, stats, times=dict(laps.times))
    layout = Layout(world_size, (tensor.numel(),), tensor.dtype, tensor.device)
    return (yield from _dense(tensor, 0, None, rank, world_size, laps, layout=layout, header=False, step=0,
                              out=tensor if in_place else None))


def _agree_on_setup(sp, grad, sizes, code, error, world_size, *, tracked: bool) -> Program:
    """First step only, before anything else communicates: all-gather (input valid, grad length,
    digest of name, density, options, sizes, dtype, rotation and whether usage is tracked); if any
    rank rejected its input or the ranks disagree, every rank raises (and the instance stays fresh,
    so a corrected call starts afresh). Without it, ranks whose layouts differ but whose lengths
    agree would exchange values of different parameters silently (the plan names fragments by id),
    ranks configured differently (another cost model, the other plan protocol) would make different
    plans, and the later steps' fixed-size collectives would not line up."""
    if not code:
        setup = repr((sp.name, sp.density, sorted(sp.options().items()), list(sizes), str(grad.dtype), sp.rotation,
                      tracked))
        mine = [1, grad.numel(), int.from_bytes(hashlib.sha256(setup.encode()).digest()[:7], "little")]
    else:
        mine = [0, -1, 0]
    device = grad.device if isinstance(grad, torch.Tensor) else torch.device("cpu")
    rows = yield AllGather(to_device(torch.tensor(mine, dtype=torch.int64), device))
    (rows,) = to_host(torch.stack(rows))
    every = [tuple(row) for row in rows.tolist()]
    if code:
        raise error
    rejected = [r for r, e in enumerate(every) if e[0] == 0]
    if rejected:
        raise ValueError(f"rank(s) {rejected} rejected their input at the first step (see their error); "
                         "every rank stops")
    if any(e != every[0] for e in every):
        raise ValueError("ranks disagree on the step's setup (sparsifier, density, its options, parameter sizes, "
                         "grad dtype, rotation or whether used tensors are tracked) at the first step: grad lengths "
                         f"per rank {[e[1] for e in every]}, setup digests {[hex(e[2]) for e in every]}; every rank "
                         "must pass the same layout and configuration")


def _dense(tensor, code, error, rank, n, laps, *, layout: Layout, header: bool, step: int, out) -> Program:
    """The dense path: every element all-reduced in fp32 and averaged (:func:`mean_of_sum`). With
    ``header``, each rank's code rides in ``n`` more elements of the all-reduce."""
    numel = layout.numel
    buf = torch.zeros(numel + (n if header else 0), dtype=torch.float32, device=layout.device)
    if not code:
        buf[:numel].copy_(tensor)
    if header:
        buf[numel + rank] = code
    laps.lap("other")
    total = yield AllReduce(buf)
    laps.waited()
    if header:
        (block,) = to_host(total[numel:])
        raise_stopped([int(c) for c in block.tolist()], code, error, step)
    mean = mean_of_sum(total[:numel], n, layout.dtype)
    if out is not None:
        mean = out.copy_(mean)
    laps.lap("other")
    stats = StepStats(selected=numel, sent=numel, numel=numel, bytes_sent=4 * numel, bytes_received=4 * numel,
                      t_select=0.0, t_comm=laps.times["comm"], t_other=laps.times["other"])
    return StepResult(mean, stats, times=dict(laps.times))
