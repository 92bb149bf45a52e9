"""One step of a sparsifier on one rank, written once: a generator that yields collective requests
(:mod:`deft_kernels.driver.collectives`) and receives their results. docs/exchange.md tells the
whole story; in short:

**Phases.** Check the input; at the first step agree on the setup (one all-gather) and make the
residual; ``a = g + r`` with the fragment norms (in the residual, or in a spare buffer where the
residual has another dtype or there is a loss scale); the plan (leader ``(step + rotation) % n``,
broadcast as one tensor with a status slot); each rank's selection; the union of the proposals
(int32 on the wire below 2^31 elements) and of what everyone sends anyway; the value all-reduce with
every rank's status block; the average written into ``out``, the residual update and ``observe``.

**Header.** Every step each rank tells the others, in a small int64 row, whether it accepted its
input (a cause code otherwise, :data:`CAUSES`), how many indices it proposes and which of its
tensors it used (a flag per tensor). Where it travels is the sparsifier's ``header_at``: all-gathered
before the plan (DEFT, whose counts follow from the plan), after the selection (the counts size the
index all-gather), or inside the value all-reduce (CLT-k and Dense: nothing else is gathered).

**Failure protocol.** A rank that rejects its input (other than at the first step, which the setup
agreement covers) or whose own work raises (accumulate, the leader's plan, select, pack) does not
raise at once: it takes part, with zeros of the agreed shapes, in every collective up to the first
one that carries its cause code to every rank (the header, the plan's status slot, the status block
of the value all-reduce), then raises its own error; every other rank raises there, naming the rank
and the cause. So no rank waits for a peer that has stopped, and the ranks stay in step for whatever
comes next. The healthy ranks' residuals keep that step's gradient (nothing is lost), and no step
counter advances.

**Unused tensors.** A tensor that no rank used in the step (the DDP hook's ``find_unused_parameters``
case: DDP then discards the hook's output for it) keeps its residual and gets a zero output: its
elements are restored after the exchange, so nothing sent there is lost. Where the header comes
before the plan, the leader also gives those fragments no budget.

**Numeric rule.** Every average, sparse values and dense gradients alike: the sum over ranks in
fp32, divided by ``n`` in fp32 (times the loss scale, if any), one rounding to the gradient's dtype
(:func:`mean_of_sum`).

**Sync contract.** Device data reaches the host only through :func:`deft_kernels.transfer.to_host`:
a DEFT step reads twice per rank (the leader its norms with the header, the others the header with
the plan; then every rank the status block after the value all-reduce; the first step once more,
for the setup); the plan and the header are tensors; the ops get host metadata. Every collective's
result is taken with ``Future.wait()`` (the stream rule, :mod:`deft_kernels.driver.collectives`).
The CUDA side has not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import ops
from ..sparsifiers.base import Layout, Sparsifier, StepStats
from ..transfer import to_device, to_host
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
    sent: torch.Tensor | None = None  # the global index set, sorted (None on the dense path)
    accumulated: torch.Tensor | None = None  # a = g + r before the exchange, when asked for
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase (Laps)
    skipped: bool = False  # a loss-scaled step whose output was not finite: the residual was left alone


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


# ---- the wire format ------------------------------------------------------------------------------
# What a step's collectives carry besides the data (docs/exchange.md, the wire format), written once:
# the step builds its tensors from these, and deft-bench project sizes its model of the step by them
# (deft_kernels.benchmarks.project.size_rules).

#: The header row: these fields, then one used flag per tensor.
HEADER_FIELDS = ("code", "count")
HEADER_DTYPE = torch.int64
#: Slots after the encoded plan in the plan's broadcast: the leader's status (0, or its cause code).
PLAN_STATUS_SLOTS = 1
#: Vectors shorter than this send their indices as int32, longer ones as int64.
INT32_INDEX_LIMIT = 2**31


def header_elements(tensors: int) -> int:
    """Elements of one rank's header row for a layout of ``tensors`` tensors."""
    return len(HEADER_FIELDS) + tensors


def plan_wire_elements(plan_length: int) -> int:
    """Elements of the plan's broadcast: the encoded plan (``plan_wire``'s length) and the status slot."""
    return plan_length + PLAN_STATUS_SLOTS


def index_dtype(numel: int) -> torch.dtype:
    """The dtype the proposals travel in for a vector of ``numel`` elements."""
    return torch.int32 if numel < INT32_INDEX_LIMIT else torch.int64


def status_block_elements(world_size: int, tensors: int, header_with_values: bool) -> int:
    """fp32 slots after the values in the value all-reduce: each rank's code and, where the header
    rides there, one user count per tensor (a loss-scaled step adds one slot more: the count of ranks
    whose ``a`` is not finite)."""
    return world_size + (tensors if header_with_values else 0)


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

    @classmethod
    def from_block(cls, block: torch.Tensor, world_size: int) -> _Header:
        """From the fp32 block summed into the value all-reduce, ``[code per rank, users per
        tensor]`` (small integers: exact in fp32), on the host."""
        return cls([int(c) for c in block[:world_size].tolist()], [], (block[world_size:] > 0).tolist())

    @property
    def accepted(self) -> bool:
        return not any(self.codes)

    def raise_rejected(self, code: int, error: Exception | None, step: int) -> None:
        """This rank's own error first; else, when another rank stopped, an error naming it."""
        raise_stopped(self.codes, code, error, step)

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


def _used_flags(used: torch.Tensor | None, layout: Layout) -> torch.Tensor:
    """One host flag per tensor: which tensors this rank used; all by default."""
    if used is None:
        return torch.ones(len(layout.sizes), dtype=torch.bool)
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


# ---- the step -------------------------------------------------------------------------------------


def step_program(sp: Sparsifier, grad: torch.Tensor, *, sizes: Sequence[int] | None = None, rank: int = 0,
                 world_size: int = 1, used: torch.Tensor | None = None, laps: Laps | None = None,
                 keep_accumulated: bool = False, out: torch.Tensor | None = None,
                 loss_scale: float | None = None) -> Program:
    """One step of ``sp`` on rank ``rank`` of ``world_size`` (see the module docstring); returns a
    :class:`StepResult`. ``used``: one CPU flag per tensor of ``sizes``, the tensors this rank used in
    the step (default: all). ``keep_accumulated``: also return ``a = g + r``. ``out``: a tensor like
    ``grad`` that the step overwrites with its result and returns (the DDP hook passes the bucket's
    own buffer, as PowerSGD's hook does; it may be ``grad`` itself, which the step has read by then);
    default: a new tensor. ``loss_scale``: the factor ``grad`` carries (a ``GradScaler``'s scale):
    the residual then holds unscaled values (``grad / loss_scale`` is what it accumulates), the
    output is scaled back, and a step whose output is not finite (a step the scaler skips) leaves the
    residual exactly as it was (``StepResult.skipped``)."""
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
    if layout is None:
        yield from _agree_on_setup(sp, grad, sizes, code, error, world_size)
        sp.start(Layout(world_size, tuple(sizes), grad.dtype, grad.device))
    elif layout.dtype is None and not code:
        sp.layout = dataclasses.replace(layout, dtype=grad.dtype, device=grad.device)
    if sp.dense:
        result = yield from _dense(grad, code, error, rank, world_size, laps, layout=sp.layout, header=True,
                                   step=sp.step_count, out=out)
        sp.step_count += 1
        return result
    step = _Step(sp, rank, world_size, laps, code, error)
    try:
        return (yield from step.run(grad, _used_flags(used, sp.layout), keep_accumulated, out, loss_scale))
    except Exception:
        step.keep_gradient()
        raise


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


def undo(sp: Sparsifier) -> None:
    """Take back the residual update of ``sp``'s latest step, one that ran with a ``loss_scale``
    and was not skipped: the caller's other steps of the same iteration were (a ``GradScaler`` skips
    the whole optimizer step when any gradient is not finite), so this one's sent values are
    discarded too and its residual must be as before the step."""
    if sp.spare is None:
        raise ValueError("undo needs a step that ran with a loss_scale")
    sp.residual, sp.spare = sp.spare, sp.residual


def _agree_on_setup(sp, grad, sizes, code, error, world_size) -> Program:
    """First step only, before anything else communicates: all-gather (input valid, grad length,
    digest of name, density, sizes, dtype and rotation); if any rank rejected its input or the ranks
    disagree, every rank raises (and the instance stays fresh, so a corrected call starts afresh).
    Without it, ranks whose layouts differ but whose lengths agree would exchange values of different
    parameters silently (the leader's plan names fragments by id), and the later steps' fixed-size
    collectives would not line up."""
    if not code:
        setup = repr((sp.name, sp.density, list(sizes), str(grad.dtype), sp.rotation))
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
        raise ValueError("ranks disagree on the step's setup (sparsifier, density, parameter sizes, grad "
                         f"dtype or rotation) at the first step: grad lengths per rank {[e[1] for e in every]}, "
                         f"setup digests {[hex(e[2]) for e in every]}; every rank must pass the same layout")


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
        _Header.from_block(block, n).raise_rejected(code, error, step)
    mean = mean_of_sum(total[:numel], n, layout.dtype)
    if out is not None:
        mean = out.copy_(mean)
    laps.lap("other")
    stats = StepStats(selected=numel, sent=numel, numel=numel, bytes_sent=4 * numel, bytes_received=4 * numel,
                      t_select=0.0, t_comm=laps.times["comm"], t_other=laps.times["other"])
    return StepResult(mean, stats, times=dict(laps.times))


def _wire(encoded: torch.Tensor, status: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The plan as it travels: the encoded plan and one status slot (0, or the leader's cause code)."""
    return torch.cat([to_device(encoded, device), torch.full((PLAN_STATUS_SLOTS,), status, dtype=dtype, device=device)])


def _failed_wire(length: int, status: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The sentinel plan of a leader that stopped: zeros of the agreed shape, its cause in the slot."""
    wire = torch.zeros(plan_wire_elements(length), dtype=dtype, device=device)
    wire[-1] = status
    return wire


class _Step:
    """One sparse step on one rank. Failure protocol: a rank whose own work raises (accumulate, plan,
    select, pack) records the cause in ``code`` and goes on with zeros of the agreed shapes, through
    every collective up to the next one that carries its code to every rank (the sentinel plan, the
    header, the status block of the value all-reduce); after that one every rank raises (see
    :func:`raise_stopped`)."""

    def __init__(self, sp: Sparsifier, rank: int, n: int, laps: Laps, code: int, error: Exception | None) -> None:
        self.sp, self.rank, self.n, self.laps = sp, rank, n, laps
        self.code, self.error = code, error
        self.step = sp.step_count
        self.turn = sp.step_count + sp.rotation  # who leads, and the bins' rotation (docs/exchange.md)
        self.acc: torch.Tensor | None = None

    def fail(self, cause: int, error: Exception) -> None:
        self.code, self.error = cause, error

    def keep_gradient(self) -> None:
        """On a raise: the residual keeps this step's gradient (as the in-place accumulation does)."""
        if self.acc is not None and self.acc is not self.sp.residual:
            _commit(self.sp, self.acc)

    def run(self, grad, used, keep, out, loss_scale) -> Program:
        sp, rank, n, laps = self.sp, self.rank, self.n, self.laps
        layout, offsets = sp.layout, sp.offsets
        device = layout.device
        if not self.code:
            try:
                self.acc, norms = _accumulate(sp, grad, loss_scale)
            except Exception as e:  # noqa: BLE001 -- the failure protocol carries it
                self.fail(ACCUMULATE, e)
        if self.code:
            norms = torch.zeros(offsets.numel() - 1, dtype=torch.float32, device=device)
        acc = self.acc
        accumulated = acc.clone() if keep and acc is not None else None
        laps.lap("other")
        header, plan, counts = None, None, None
        if sp.header_at == "before_plan":
            header, plan = yield from self._header_then_plan(norms, used)
            counts = sp.proposal_counts(plan, n, self.turn)
        elif sp.plan_wire(layout.numel, offsets, n) is not None:
            plan = yield from self._plan(norms)

        laps.lap("other")
        selected = None
        if not self.code:
            try:
                selected = sp.select(acc, norms, offsets, plan, rank, n, self.turn)
                laps.lap("select")
            except Exception as e:  # noqa: BLE001 -- the failure protocol carries it
                self.fail(SELECT, e)
        if self.code:  # the count the others expect from this rank (known from DEFT's plan), or none
            selected = torch.zeros(counts[rank] if counts is not None else 0, dtype=torch.int64, device=device)
        if sp.header_at == "after_select":
            rows = yield AllGather(_header_row(self.code, selected.numel(), used, device))
            laps.waited()
            header = _Header.from_rows(to_host(torch.stack(rows))[0])
            header.raise_rejected(self.code, self.error, self.step)
            counts = header.counts

        fixed = sp.always_sent(plan, device)
        if sp.gathers_selection:
            # int32 on the wire where every index fits: half the bytes (docs/exchange.md, the wire format)
            wire_dtype = index_dtype(layout.numel)
            laps.lap("other")
            parts = yield GatherProposals(selected.to(wire_dtype), counts)
            laps.waited()
            sent = union(parts if fixed is None else [*parts, fixed], sp.disjoint_proposals, device)
            index_bytes = selected.numel() * wire_dtype.itemsize
            others_bytes = (sum(counts) - selected.numel()) * wire_dtype.itemsize  # the other ranks' proposals
        else:
            sent = fixed if fixed is not None else torch.zeros(0, dtype=torch.int64, device=device)
            index_bytes = others_bytes = 0
        values = None
        if not self.code:
            try:
                values = sp.kernels.sparse_pack(acc, sent).float()
            except Exception as e:  # noqa: BLE001 -- the failure protocol carries it
                self.fail(PACK, e)
        if self.code:
            values = torch.zeros(sent.numel(), dtype=torch.float32, device=device)
        laps.lap("other")
        vals, header, finite = yield from self._values(values, used, header, loss_scale)

        skipped = not finite
        kept = [] if skipped else [(lo, hi, acc[lo:hi].clone()) for lo, hi in header.unused_ranges(layout)]
        if out is None:
            out = torch.zeros(layout.numel, dtype=layout.dtype, device=device)
        else:
            out.zero_()
        out.index_copy_(0, sent, vals)
        if skipped and out.numel():  # a non-finite gradient not sent: the scaler must skip this step too
            out[0] = math.inf
        if not skipped:
            acc.index_fill_(0, sent, 0)
            for lo, hi, residual in kept:  # nobody used these tensors: DDP discards their output
                acc[lo:hi] = residual
                out[lo:hi] = 0
            _commit(sp, acc)
        self.acc = None  # nothing left for keep_gradient to do
        sp.observe(plan, sent, layout.numel, n)
        sp.step_count += 1
        laps.lap("other")
        times = laps.times
        stats = StepStats(selected=selected.numel(), sent=sent.numel(), numel=layout.numel,
                          bytes_sent=index_bytes + 4 * sent.numel(), bytes_received=others_bytes + 4 * sent.numel(),
                          t_select=times["plan"] + times["select"],
                          t_comm=times["comm"], t_other=times["other"])
        return StepResult(out, stats, plan, selected, sent, accumulated, dict(times), skipped)

    def _header_then_plan(self, norms, used) -> Program:
        """The header all-gathered first; the leader reads it with its norms and plans (giving tensors no
        rank used no budget), the others read it with the plan it broadcasts: one transfer each. A
        leader whose plan raises broadcasts the sentinel plan, and every rank raises after it."""
        sp, rank, n, laps = self.sp, self.rank, self.n, self.laps
        layout, offsets = sp.layout, sp.offsets
        length, dtype = sp.plan_wire(layout.numel, offsets, n)
        leader = self.turn % n
        rows = yield AllGather(_header_row(self.code, 0, used, layout.device))
        laps.waited()
        rows = torch.stack(rows)
        plan, status = None, 0
        if rank == leader:
            norms, rows = to_host(norms, rows)
            header = _Header.from_rows(rows)
            wire = None
            if header.accepted:
                try:
                    norms = norms.masked_fill(_within(header.unused_ranges(layout), offsets), 0)
                    laps.lap("other")
                    plan = sp.plan(self.acc, norms, offsets, n, self.turn)
                    laps.lap("plan")
                    wire = _wire(sp.encode_plan(plan), 0, dtype, layout.device)
                except Exception as e:  # noqa: BLE001 -- the sentinel plan carries it
                    self.fail(PLAN, e)
                    status = PLAN
            if wire is None:  # somebody stops: only the plan's shape must agree
                wire = _failed_wire(length, status, dtype, layout.device)
            laps.lap("other")
            yield Broadcast(wire, leader)
        else:
            wire = yield Broadcast(torch.empty(plan_wire_elements(length), dtype=dtype, device=layout.device), leader)
            rows, wire = to_host(rows, wire)
            header = _Header.from_rows(rows)
            status = int(wire[-1])
            if header.accepted and not status:
                plan = sp.decode_plan(wire[:-1], offsets, n)
        laps.waited()
        codes = list(header.codes)
        codes[leader] = codes[leader] or status
        raise_stopped(codes, self.code, self.error, self.step)
        return header, plan

    def _plan(self, norms) -> Program:
        """The leader plans alone and broadcasts; the header comes later. The selection reads the plan
        on the host, and so does the status slot: a leader that stopped (bad input or a failed plan)
        makes every rank raise right after the broadcast. Where the header rides in the values, the
        plan stays on the device, every rank decodes the wire (a stopped leader's zeros included, so
        the shapes agree) and the leader's code reaches the others with the values."""
        sp, rank, n, laps = self.sp, self.rank, self.n, self.laps
        layout, offsets = sp.layout, sp.offsets
        length, dtype = sp.plan_wire(layout.numel, offsets, n)
        on_device = sp.header_at == "with_values"
        leader = self.turn % n
        if rank == leader:
            wire = None
            if not self.code:
                try:
                    plan = sp.plan(self.acc, norms, offsets, n, self.turn)
                    laps.lap("plan")
                    wire = _wire(sp.encode_plan(plan), 0, dtype, layout.device)
                except Exception as e:  # noqa: BLE001 -- the sentinel plan carries it
                    self.fail(PLAN, e)
            if wire is None:
                wire = _failed_wire(length, self.code, dtype, layout.device)
                plan = sp.decode_plan(wire[:-1], offsets, n) if on_device else None
            laps.lap("other")
            yield Broadcast(wire, leader)
            status = self.code
        else:
            wire = yield Broadcast(torch.empty(plan_wire_elements(length), dtype=dtype, device=layout.device), leader)
            if on_device:
                plan, status = sp.decode_plan(wire[:-1], offsets, n), 0
            else:
                (wire,) = to_host(wire)
                status = int(wire[-1])
                plan = None if status else sp.decode_plan(wire[:-1], offsets, n)
        laps.waited()
        if status and not on_device:
            codes = [0] * n
            codes[leader] = status
            raise_stopped(codes, self.code, self.error, self.step)
        return plan

    def _values(self, values, used, header, loss_scale) -> Program:
        """The value all-reduce with a status block: each rank's code in its own slot and, where the
        header rides here, a flag per tensor (the sums: users per tensor); with a ``loss_scale``,
        one more slot counting the ranks whose ``a`` is not finite. Returns the values to write (the
        mean, scaled back by ``loss_scale``), the header and whether the step goes on (``False``: a
        ``loss_scale`` step that some rank's non-finite gradient or the output makes the scaler
        skip); raises, on every rank, when some rank stopped."""
        n, rank = self.n, self.rank
        with_header = header is None
        block = torch.zeros(status_block_elements(n, used.numel(), with_header), dtype=torch.float32)
        block[rank] = self.code
        if with_header:
            block[n:] = used
        m = values.numel()
        parts = [values, to_device(block, values.device)]
        if loss_scale is not None:  # an inf the plan does not send must stop every rank's step too
            acc = self.acc
            parts.append((~torch.isfinite(acc).all()).float().reshape(1) if acc is not None
                         else torch.zeros(1, device=values.device))
        total = yield AllReduce(torch.cat(parts))
        self.laps.waited()
        vals = mean_of_sum(total[:m], n, self.sp.layout.dtype, loss_scale)
        if loss_scale is None:
            (status,), finite = to_host(total[m:]), True
        else:  # the scaler skips a step with a non-finite gradient: so does the residual
            status, finite = to_host(total[m:], torch.isfinite(vals).all())
            finite = bool(finite) and not status[-1] > 0
            status = status[:-1]
        if with_header:
            header = _Header.from_block(status, n)
        raise_stopped([int(c) for c in status[:n].tolist()], self.code, self.error, self.step)
        return vals, header, finite


def _accumulate(sp: Sparsifier, grad: torch.Tensor, loss_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = g + r`` and its fragment norms. In place in the residual when it has the gradient's
    dtype and there is no loss scale; else in the sparsifier's spare buffer (``g / loss_scale + r``
    in the residual's dtype), which becomes the residual when the step commits, the old residual
    becoming the spare: the residual stays as it was until then (a skipped step, :func:`undo`)."""
    residual = sp.residual
    if loss_scale is None and residual.dtype == grad.dtype:
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
