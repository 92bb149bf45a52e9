"""One step of a sparsifier on one rank, written once: a generator that yields collective requests
(:mod:`deft_kernels.driver.collectives`) and receives their results. docs/exchange.md tells the
whole story; in short:

**Phases.** Check the input; at the first step agree on the setup (one all-gather) and make the
residual; ``a = g + r`` with the fragment norms; the plan (leader ``step % n``, broadcast as one
tensor); each rank's selection; the union of the proposals and of what everyone sends anyway; the
value all-reduce; the average, the residual update and ``observe``.

**Header.** Every step each rank tells the others, in a small int64 row, whether it accepted its
input (a cause code otherwise, :data:`CAUSES`), how many indices it proposes and which of its
tensors it used (a flag per tensor). Where it travels is the sparsifier's ``header_at``: all-gathered
before the plan (DEFT, whose counts follow from the plan), after the selection (the counts size the
index all-gather), or inside the value all-reduce (CLT-k and Dense: nothing else is gathered).

**Failure protocol.** A rank that rejects its input (other than at the first step, which the setup
agreement covers) does not raise at once: it takes part, with zeros of the agreed shapes, in every
collective up to the one after which every rank has read the header, then raises its own error;
every other rank raises when it reads the header, naming the rank and the cause. So no rank waits
for a peer that has stopped, and the ranks stay in step for whatever comes next. The healthy ranks'
residuals keep that step's gradient (added before the header is read; nothing is lost), and their
step counters do not advance.

**Unused tensors.** A tensor that no rank used in the step (the DDP hook's ``find_unused_parameters``
case: DDP then discards the hook's output for it) keeps its residual and gets a zero output: its
elements are restored after the exchange, so nothing sent there is lost. Where the header comes
before the plan, the leader also gives those fragments no budget.

**Numeric rule.** Every average, sparse values and dense gradients alike: the sum over ranks in
fp32, divided by ``n`` in fp32, one rounding to the gradient's dtype (:func:`mean_of_sum`).

**Sync contract.** Device data reaches the host only through :func:`deft_kernels.transfer.to_host`:
a DEFT step reads once per rank (the leader its norms with the header, the others the header with
the plan; the first step once more, for the setup); the plan and the header are tensors; the ops get
host metadata. The CUDA side has not run on a GPU yet.
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
from ..planning import offsets_of
from ..sparsifiers.base import Layout, Sparsifier, StepStats
from ..transfer import to_device, to_host
from .collectives import AllGather, AllReduce, Broadcast, GatherUnion, Program

#: Why a rank rejected its input, by the code its header carries (0: accepted).
CAUSES = {
    1: "grad is not a flat float32, bfloat16 or float16 tensor",
    2: "sizes do not sum to grad's length",
    3: "grad length changed between steps",
    4: "the parameter layout (sizes) changed between steps",
    5: "grad dtype or device changed between steps",
}


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


def mean_of_sum(total: torch.Tensor, world_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The one numeric rule of every average: the fp32 sum over the ranks divided by ``n`` in fp32
    (in place), one rounding to ``dtype``."""
    return total.div_(world_size).to(dtype)


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


# ---- the header -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Header:
    codes: list[int]  # per rank: 0, or why it rejected its input
    counts: list[int]  # per rank: proposal count (only where the header travels after the selection)
    used: list[bool]  # per tensor: some rank used it

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> _Header:
        """From the all-gathered int64 rows ``[code, count, used per tensor]``, on the host."""
        return cls(rows[:, 0].tolist(), rows[:, 1].tolist(), (rows[:, 2:] != 0).any(0).tolist())

    @classmethod
    def from_block(cls, block: torch.Tensor, world_size: int) -> _Header:
        """From the fp32 block summed into the value all-reduce, ``[code per rank, users per
        tensor]`` (small integers: exact in fp32), on the host."""
        return cls([int(c) for c in block[:world_size].tolist()], [], (block[world_size:] > 0).tolist())

    @property
    def accepted(self) -> bool:
        return not any(self.codes)

    def raise_rejected(self, code: int, error: Exception | None, step: int) -> None:
        """This rank's own error first; else, when another rank rejected its input, an error naming it."""
        if code:
            raise error
        bad = [(r, c) for r, c in enumerate(self.codes) if c]
        if bad:
            causes = "; ".join(f"rank {r}: {CAUSES.get(c, f'cause {c}')}" for r, c in bad)
            raise ValueError(f"another rank rejected its input at step {step} ({causes}); every rank stops. "
                             "This rank's residual keeps this step's gradient; reset() every rank to start afresh")

    def unused_ranges(self, layout: Layout) -> list[tuple[int, int]]:
        """Element ranges of the non-empty tensors no rank used."""
        bounds = offsets_of(layout.sizes)
        return [(bounds[i], bounds[i + 1]) for i, u in enumerate(self.used) if not u and layout.sizes[i]]


def _header_row(code: int, count: int, used: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([to_device(torch.tensor([code, count], dtype=torch.int64), device),
                      to_device(used.to(torch.int64), device)])


def _used_flags(used: torch.Tensor | None, layout: Layout) -> torch.Tensor:
    """One flag per tensor (host or device): which tensors this rank used; all by default."""
    if used is None:
        return torch.ones(len(layout.sizes), dtype=torch.bool)
    if not isinstance(used, torch.Tensor) or used.dim() != 1 or used.numel() != len(layout.sizes):
        raise ValueError(f"used must be a 1-D tensor with one flag per tensor ({len(layout.sizes)})")
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
                 keep_accumulated: bool = False) -> Program:
    """One step of ``sp`` on rank ``rank`` of ``world_size`` (see the module docstring); returns a
    :class:`StepResult`. ``used``: one flag per tensor of ``sizes`` (host or device), the tensors this
    rank used in the step (default: all). ``keep_accumulated``: also return ``a = g + r``."""
    layout = sp.layout
    if layout is not None and world_size != layout.world_size:  # another group: no peers to tell
        raise ValueError(f"world size changed between steps ({layout.world_size} -> {world_size}); "
                         "call reset() to start afresh")
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
                                   step=sp.step_count)
        sp.step_count += 1
        return result
    return (yield from _sparse(sp, grad, code, error, rank, world_size, _used_flags(used, sp.layout), laps,
                               keep_accumulated))


def mean_program(tensor: torch.Tensor, *, rank: int = 0, world_size: int = 1, laps: Laps | None = None) -> Program:
    """The dense path without a sparsifier (the warm-up steps of the integrations): the mean over
    the ranks of ``tensor`` by :func:`mean_of_sum`, in a new tensor. No header: the caller builds
    ``tensor`` itself, so it is valid on every rank."""
    laps = laps or Laps.default_for(tensor.device)
    laps.start()
    layout = Layout(world_size, (tensor.numel(),), tensor.dtype, tensor.device)
    return (yield from _dense(tensor, 0, None, rank, world_size, laps, layout=layout, header=False, step=0))


def _agree_on_setup(sp, grad, sizes, code, error, world_size) -> Program:
    """First step only, before anything else communicates: all-gather (input valid, grad length,
    digest of name, density, sizes and dtype); if any rank rejected its input or the ranks disagree,
    every rank raises (and the instance stays fresh, so a corrected call starts afresh). Without it,
    ranks whose layouts differ but whose lengths agree would exchange values of different parameters
    silently (the leader's plan names fragments by id), and the later steps' fixed-size collectives
    would not line up."""
    if not code:
        setup = repr((sp.name, sp.density, list(sizes), str(grad.dtype)))
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
        raise ValueError("ranks disagree on the step's setup (sparsifier, density, parameter sizes or grad "
                         f"dtype) at the first step: grad lengths per rank {[e[1] for e in every]}, setup "
                         f"digests {[hex(e[2]) for e in every]}; every rank must pass the same layout")


def _dense(tensor, code, error, rank, n, laps, *, layout: Layout, header: bool, step: int) -> Program:
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
    out = mean_of_sum(total[:numel], n, layout.dtype)
    laps.lap("other")
    stats = StepStats(selected=numel, sent=numel, numel=numel, bytes_sent=4 * numel, bytes_received=4 * numel,
                      t_select=0.0, t_comm=laps.times["comm"], t_other=laps.times["other"])
    return StepResult(out, stats, times=dict(laps.times))


def _sparse(sp: Sparsifier, grad, code, error, rank, n, used, laps, keep) -> Program:
    layout, offsets, kernels = sp.layout, sp.offsets, sp.kernels
    device, step = layout.device, sp.step_count
    if not code:
        norms = kernels.accumulate_norms(grad, sp.residual, offsets)  # a = g + r, in place
    else:
        norms = torch.zeros(offsets.numel() - 1, dtype=torch.float32, device=device)
    acc = sp.residual
    accumulated = acc.clone() if keep else None
    laps.lap("other")
    header, plan, counts = None, None, None
    if sp.header_at == "before_plan":
        header, plan = yield from _header_then_plan(sp, acc, norms, code, error, rank, n, used, laps)
        counts = sp.proposal_counts(plan, n, step)
    elif sp.plan_wire(layout.numel, offsets, n) is not None:
        plan = yield from _plan(sp, acc, norms, code, rank, n, laps)

    laps.lap("other")
    if not code:
        selected = sp.select(acc, norms, offsets, plan, rank, n, step)
        laps.lap("select")
    else:
        selected = torch.zeros(0, dtype=torch.int64, device=device)
    if sp.header_at == "after_select":
        rows = yield AllGather(_header_row(code, selected.numel(), used, device))
        laps.waited()
        header = _Header.from_rows(to_host(torch.stack(rows))[0])
        header.raise_rejected(code, error, step)
        counts = header.counts

    fixed = sp.always_sent(plan, device)
    if sp.gathers_selection:
        laps.lap("other")
        sent = yield GatherUnion(selected, counts, fixed, sp.disjoint_proposals)
        laps.waited()
    else:
        sent = fixed if fixed is not None else torch.zeros(0, dtype=torch.int64, device=device)
    values = kernels.sparse_pack(acc, sent).float() if not code else torch.zeros(sent.numel(), device=device)
    laps.lap("other")
    if sp.header_at == "with_values":
        total, header = yield from _values_with_header(values, code, error, rank, n, used, step, laps)
    elif sent.numel():
        total = yield AllReduce(values)
        laps.waited()
    else:
        total = values

    kept = [(lo, hi, acc[lo:hi].clone()) for lo, hi in header.unused_ranges(layout)]
    out = kernels.sparse_unpack(sp.residual, sent, mean_of_sum(total, n, layout.dtype), 1.0)
    for lo, hi, residual in kept:  # nobody used these tensors: DDP discards their output
        sp.residual[lo:hi] = residual
        out[lo:hi] = 0
    sp.observe(plan, sent, layout.numel, n)
    sp.step_count += 1
    laps.lap("other")
    own = selected.numel() if sp.gathers_selection else 0
    others = sum(counts) - own if sp.gathers_selection else 0  # proposals all-gathered from the other ranks
    times = laps.times
    stats = StepStats(selected=selected.numel(), sent=sent.numel(), numel=layout.numel,
                      bytes_sent=8 * own + 4 * sent.numel(), bytes_received=8 * others + 4 * sent.numel(),
                      t_select=times["plan"] + times["select"],
                      t_comm=times["comm"], t_other=times["other"])
    return StepResult(out, stats, plan, selected, sent, accumulated, dict(times))


def _header_then_plan(sp, acc, norms, code, error, rank, n, used, laps) -> Program:
    """The header all-gathered first; the leader reads it with its norms and plans (giving tensors no
    rank used no budget), the others read it with the plan it broadcasts: one transfer each."""
    layout, offsets, step = sp.layout, sp.offsets, sp.step_count
    length, dtype = sp.plan_wire(layout.numel, offsets, n)
    leader = step % n
    rows = yield AllGather(_header_row(code, 0, used, layout.device))
    laps.waited()
    rows = torch.stack(rows)
    plan = None
    if rank == leader:
        norms, rows = to_host(norms, rows)
        header = _Header.from_rows(rows)
        if header.accepted:
            norms = norms.masked_fill(_within(header.unused_ranges(layout), offsets), 0)
            laps.lap("other")
            plan = sp.plan(acc, norms, offsets, n, step)
            laps.lap("plan")
            wire = to_device(sp.encode_plan(plan), layout.device)
        else:  # somebody stops: only the plan's shape must agree
            wire = torch.zeros(length, dtype=dtype, device=layout.device)
        laps.lap("other")
        yield Broadcast(wire, leader)
    else:
        wire = yield Broadcast(torch.empty(length, dtype=dtype, device=layout.device), leader)
        rows, wire = to_host(rows, wire)
        header = _Header.from_rows(rows)
        if header.accepted:
            plan = sp.decode_plan(wire, offsets, n)
    laps.waited()
    header.raise_rejected(code, error, step)
    return header, plan


def _plan(sp, acc, norms, code, rank, n, laps) -> Program:
    """The leader plans alone and broadcasts; the header comes later. The selection reads the plan on
    the host, except where the header rides in the values (the plan then stays on the device)."""
    layout, offsets, step = sp.layout, sp.offsets, sp.step_count
    length, dtype = sp.plan_wire(layout.numel, offsets, n)
    leader = step % n
    if rank == leader and not code:
        plan = sp.plan(acc, norms, offsets, n, step)
        laps.lap("plan")
        wire = to_device(sp.encode_plan(plan), layout.device)
        laps.lap("other")
        yield Broadcast(wire, leader)
    else:  # a leader that rejected its input sends zeros: only the plan's shape must agree
        buffer = (torch.zeros if rank == leader else torch.empty)(length, dtype=dtype, device=layout.device)
        wire = yield Broadcast(buffer, leader)
        plan = sp.decode_plan(to_host(wire)[0] if sp.header_at == "after_select" else wire, offsets, n)
    laps.waited()
    return plan


def _values_with_header(values, code, error, rank, n, used, step, laps) -> Program:
    """The value all-reduce carrying the header as an fp32 block: each rank's code in its own slot,
    then a flag per tensor (the sums: users per tensor)."""
    block = torch.zeros(n + used.numel(), dtype=torch.float32, device=values.device)
    block[rank] = code
    block[n:] = to_device(used.to(torch.float32), values.device)
    total = yield AllReduce(torch.cat([values, block]))
    laps.waited()
    m = values.numel()
    header = _Header.from_block(to_host(total[m:])[0], n)
    header.raise_rejected(code, error, step)
    return total[:m], header
