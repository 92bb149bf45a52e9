"""The collectives a step asks for, and the three ways they are carried out.

A step program (:mod:`deft_kernels.driver.program`) yields requests and receives their results:

- :class:`AllGather` (a tensor of the same shape on every rank -> the list of every rank's, in rank
  order), :class:`Broadcast` (-> the source rank's tensor), :class:`AllReduce` (-> the sum);
- :class:`GatherProposals`: every rank's proposal (counts known to all in advance) -> the list of
  every rank's, in rank order. Over torch.distributed it is one all-gather of the proposals padded
  to the longest, in the proposal's dtype (the step sends int32 where the vector has fewer than
  2^31 elements); the step program itself makes their union, on its own stream (see below).

Runners:

- :func:`run_blocking`: one program over torch.distributed, each collective waited for in turn
  (the plain API, ``driver.step``).
- :class:`ExchangeQueue`: programs over torch.distributed, chained on the collectives' futures
  (``.then``; nothing ever waits inside a callback, which deadlocks on gloo), one program at a time
  in submission order, so that every rank issues the group's collectives in one total order (the
  DDP hook). On NCCL a work's future completes when the work is enqueued, so the chain runs inline;
  on a GPU it runs on a stream of its own (below), so backward's kernels go on beside it.
- :func:`run_lockstep`: ``n`` ranks' programs in one process, advanced together: each rank's local
  work runs alone (the benchmark times it), each collective's result is computed once and
  deterministically (sums in rank order). Results are shared between the simulated ranks: a
  program treats what it receives as read-only, except an all-reduce's sum, which is its own.

**The stream rule (NCCL).** A collective's result is taken with ``Future.wait()``, never with
``value()`` alone: on NCCL a work's future is done as soon as the work is enqueued, and ``wait()``
makes the current stream wait for the collective (without blocking the host), so the step's next
kernels, issued on the current stream, read the buffer only after NCCL has written it. Nothing runs
on the collective's own stream: the ``then`` callbacks here only hand the buffer on, and the union of
the proposals is made by the step program after its ``wait()``. A future is waited on only once it
is done (``done()`` or inside its own ``then`` callback), so no thread blocks in a wait.

**The exchange stream (the DDP hook on a GPU).** An :class:`ExchangeQueue` on a CUDA device runs
every program on a stream of its own: at submission that stream waits for the current one (the
bucket's gradients are ready there), and everything the program issues, kernels and collectives,
goes on it; its waits make only that stream wait for NCCL. Backward's kernels, on the current
stream, go on meanwhile; the program's future, completed on the exchange stream, is what DDP waits
for. All of a program's temporaries are made and freed on that one stream (no ``record_stream``
needed). Status: these CUDA paths (NCCL, CUDA-aware futures, the exchange stream) have not run on a
GPU here (no GPU on the development machine); ``scripts/gpu_check.sh`` runs the hook and the plain
API on NCCL (``bench/gpu_integration.py``).

**Bounded waits.** :meth:`ExchangeQueue.wait_idle` waits at most the process group's timeout
(:func:`group_timeout`) and a grace period (a collective that times out raises its own error first,
naming the peer), then raises :class:`ExchangeTimeout`; an exception anywhere in a program's chain
(its own, or the runner's) reaches that program's future, so DDP raises it from ``backward``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class AllGather:
    """Every rank's tensor, one shape and dtype on all -> the list of every rank's, in rank order."""

    tensor: torch.Tensor


@dataclass
class Broadcast:
    """The source rank's tensor -> on every rank."""

    tensor: torch.Tensor  # the source's data; a buffer of the same shape and dtype elsewhere
    src: int  # rank in the group


@dataclass
class AllReduce:
    """Every rank's tensor, one shape and dtype on all -> their sum."""

    tensor: torch.Tensor  # summed in place over torch.distributed


@dataclass
class GatherProposals:
    """Every rank's proposal (all counts known to every rank) -> the list of every rank's, in rank
    order (trimmed to its count)."""

    mine: torch.Tensor  # this rank's proposal: int64 indices, or int32 where they fit
    counts: list[int]  # every rank's proposal count, the same list on every rank


Request = AllGather | Broadcast | AllReduce | GatherProposals
Program = Generator[Request, Any, Any]


def union(parts: list[torch.Tensor], disjoint: bool, device: torch.device) -> torch.Tensor:
    """Sorted int64 union of index tensors (int32 or int64). Disjoint parts need no deduplication: a
    sort keeps the result free of a data-dependent size (no host sync on CUDA)."""
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    every = torch.cat([p.long() for p in parts])
    return torch.sort(every).values if disjoint else torch.unique(every, sorted=True)


# ---- torch.distributed ----------------------------------------------------------------------------


def future_on(device: torch.device) -> torch.futures.Future:
    """A new future, CUDA-aware on a GPU, so that whoever waits on it waits for the kernels that
    produced its value."""
    return torch.futures.Future(devices=[device] if device.type == "cuda" else None)


def _future(value: Any, device: torch.device) -> torch.futures.Future:
    """A completed :func:`future_on` ``device``."""
    fut = future_on(device)
    fut.set_result(value)
    return fut


class TorchCollectives:
    """Requests carried out with torch.distributed on ``group`` (``None``: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def start(self, request: Request) -> torch.futures.Future:
        """Issue the request's collective; returns a future of its result."""
        group = self.group
        if isinstance(request, AllGather):
            outs = [torch.empty_like(request.tensor) for _ in range(self.world_size)]
            work = dist.all_gather(outs, request.tensor.contiguous(), group=group, async_op=True)
            return work.get_future().then(lambda f: (f.value(), outs)[1])
        if isinstance(request, Broadcast):
            tensor = request.tensor
            # src is a global rank: ``group_src=`` would take the group rank, but only from torch 2.6 on
            # (pyproject says torch>=2.5).
            src = request.src if group is None else dist.get_global_rank(group, request.src)
            work = dist.broadcast(tensor, src, group=group, async_op=True)
            return work.get_future().then(lambda f: (f.value(), tensor)[1])
        if isinstance(request, AllReduce):
            tensor = request.tensor
            work = dist.all_reduce(tensor, group=group, async_op=True)
            return work.get_future().then(lambda f: (f.value(), tensor)[1])
        if isinstance(request, GatherProposals):
            mine, counts = request.mine, request.counts
            longest = max(counts)
            padded = mine.new_zeros(longest)  # the step asks only where some count is positive
            padded[: mine.numel()] = mine
            outs = [torch.empty_like(padded) for _ in range(self.world_size)]
            work = dist.all_gather(outs, padded, group=group, async_op=True)
            return work.get_future().then(lambda f: (f.value(), [o[:c] for o, c in zip(outs, counts)])[1])
        raise TypeError(f"not a collective request: {request!r}")


def _outcome(fut: torch.futures.Future) -> tuple[Any, BaseException | None]:
    """The result of a done future, taken with ``wait()`` (the stream rule: on NCCL it makes the
    current stream wait for the collective), or its error."""
    try:
        return fut.wait(), None
    except BaseException as e:  # noqa: BLE001 -- handed back into the program
        return None, e


def run_blocking(program: Program, collectives: TorchCollectives) -> Any:
    """Run one program to its end, waiting for each collective in turn; returns what it returns."""
    value, error = None, None
    while True:
        try:
            request = program.throw(error) if error is not None else program.send(value)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = collectives.start(request).wait(), None
        except BaseException as e:  # noqa: BLE001 -- thrown into the program
            value, error = None, e


#: The timeout torch.distributed gives a group that was not given one (its default for gloo and NCCL).
DEFAULT_TIMEOUT = timedelta(minutes=30)
#: How much longer than the group's timeout :meth:`ExchangeQueue.wait_idle` waits: a collective that
#: times out raises its own error (which names the peer) first; the queue's is the backstop.
GRACE = timedelta(seconds=5)


class ExchangeTimeout(TimeoutError, RuntimeError):
    """The exchange did not finish within the process group's timeout (and its collectives did not
    raise): a ``TimeoutError``, and a ``RuntimeError`` like torch.distributed's own errors."""


def group_timeout(group: dist.ProcessGroup | None, device: torch.device | None = None) -> timedelta:
    """The timeout of ``group``'s backend for ``device`` (``None``: the default group, the CPU), read
    from the backend's options (a private attribute of torch's process groups; where it is absent,
    :data:`DEFAULT_TIMEOUT`)."""
    try:
        pg = group if group is not None else dist.group.WORLD
        backend = pg._get_backend(device if device is not None else torch.device("cpu"))
        timeout = backend.options._timeout
        return timeout if isinstance(timeout, timedelta) else DEFAULT_TIMEOUT
    except (AttributeError, RuntimeError, ValueError):
        return DEFAULT_TIMEOUT


class ExchangeQueue:
    """Runs programs one at a time, in submission order, each chained on its collectives' futures.

    ``submit`` returns at once with a future of the program's result. A program's next step runs in
    the thread that completed its collective (gloo's worker, or inline where the future is already
    complete: NCCL), and a finished program starts the next one from there, under a lock: so the
    group's collectives are issued in one order, the same on every rank, whichever thread issues
    them. On a CUDA ``device`` every program runs on the queue's own stream (the module docstring).

    A program that raises stops the queue: it starts no further program (those waiting, and those
    submitted later, fail at once with an error naming the first one's). The step's failure protocol
    makes every rank's program raise after the same collective, so every rank's queue stops at the
    same point and no rank issues a collective that its peers will never join. Whatever raises while
    a program runs, the program's own code or the runner's, ends in that program's future.

    ``timeout``: how long :meth:`wait_idle` waits (default: the group's, :func:`group_timeout`, plus
    :data:`GRACE`, so that a collective's own timeout error comes first).
    """

    def __init__(self, collectives: TorchCollectives, device: torch.device | None = None,
                 timeout: timedelta | None = None) -> None:
        self.collectives = collectives
        self.timeout = timeout if timeout is not None else \
            group_timeout(getattr(collectives, "group", None), device) + GRACE
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Program, torch.futures.Future]] = deque()
        self._current: tuple[Program, torch.futures.Future] | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.failure: BaseException | None = None  # the error that stopped the queue

    def submit(self, program: Program, device: torch.device) -> torch.futures.Future:
        """Queue ``program``; its future holds what it returns (CUDA-aware on a GPU)."""
        fut = future_on(device)
        if self.stream is not None:  # the program reads what the current stream produced
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with self._lock:
            if self.failure is not None:
                program.close()
                fut.set_exception(self._stopped())
                return fut
            self._waiting.append((program, fut))
            if self._current is not None:
                return fut
            self._current = self._waiting.popleft()
            self._idle.clear()
        self._advance(None, None)
        return fut

    def wait_idle(self) -> None:
        """Block until every submitted program has finished (never call it from a callback), at most
        :attr:`timeout`; then raise an :class:`ExchangeTimeout` (and stop the queue: the ranks can no
        longer be assumed in step)."""
        if not self._idle.wait(self.timeout.total_seconds()):
            error = ExchangeTimeout(f"the exchange did not finish within {self.timeout} (the process group's timeout "
                                    "and a grace period): a peer stopped or the network is down; no further step "
                                    "starts")
            with self._lock:
                self.failure = self.failure or error
            raise error

    def _stopped(self) -> RuntimeError:
        error = RuntimeError(f"an earlier step in this exchange failed ({type(self.failure).__name__}: "
                             f"{self.failure}); no further step starts")
        error.__cause__ = self.failure
        return error

    def _resume(self, fut: torch.futures.Future) -> None:
        self._advance(*_outcome(fut))

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _advance(self, value: Any, error: BaseException | None) -> None:
        with self._on_stream():
            try:
                self._run(value, error)
            except BaseException as e:  # noqa: BLE001 -- the runner's own failure: into the program's future
                self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self.failure = self.failure or error
            current = self._current
        if current is not None:
            current[0].close()
            if not current[1].done():
                current[1].set_exception(error)
        self._next()

    def _run(self, value: Any, error: BaseException | None) -> None:
        while True:
            program, fut = self._current
            try:
                request = program.throw(error) if error is not None else program.send(value)
            except StopIteration as stop:
                fut.set_result(stop.value)
            except BaseException as e:  # noqa: BLE001 -- the program's future carries it
                with self._lock:
                    self.failure = self.failure or e
                fut.set_exception(e)
            else:
                try:
                    pending = self.collectives.start(request)
                except BaseException as e:  # noqa: BLE001 -- thrown into the program
                    value, error = None, e
                    continue
                if pending.done():
                    value, error = _outcome(pending)
                    continue
                pending.then(self._resume)
                return
            if not self._next():
                return
            value, error = None, None

    def _next(self) -> bool:
        """The current program has ended: make the next waiting one current (True); or, with none
        waiting or after a failure (whose waiting programs then fail at once), go idle (False). One
        step under the lock, so that a concurrent ``submit`` never starts a second program."""
        with self._lock:
            if self.failure is None and self._waiting:
                self._current = self._waiting.popleft()
                return True
            self._current = None
            waiting, self._waiting = list(self._waiting), deque()
            self._idle.set()
        for program, fut in waiting:
            program.close()
            fut.set_exception(self._stopped())
        return False


# ---- n ranks in one process -----------------------------------------------------------------------


def _resolve(requests: list[Request]) -> list[Any]:
    """Every rank's result of one collective that all ranks asked for together."""
    n = len(requests)
    first = requests[0]
    kinds = {type(r).__name__ for r in requests}
    if len(kinds) > 1:
        raise RuntimeError(f"simulated ranks fell out of step: they asked for {sorted(kinds)} at once")
    if isinstance(first, GatherProposals):
        if any(r.counts != first.counts for r in requests) or \
                [r.mine.numel() for r in requests] != first.counts:
            raise RuntimeError(f"simulated ranks disagree on the proposal counts {[r.counts for r in requests]}")
        return [[r.mine for r in requests]] * n
    tensors = [r.tensor for r in requests]
    shapes = {(tuple(t.shape), t.dtype) for t in tensors}
    if len(shapes) > 1:
        raise RuntimeError(f"simulated ranks fell out of step: {type(first).__name__} of {sorted(map(str, shapes))}")
    if isinstance(first, AllGather):
        return [tensors] * n
    if isinstance(first, Broadcast):
        if any(r.src != first.src for r in requests):
            raise RuntimeError(f"simulated ranks disagree on the broadcast's source {[r.src for r in requests]}")
        return [tensors[first.src]] * n
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t  # rank order: deterministic
    return [total] + [total.clone() for _ in range(n - 1)]


def run_lockstep(programs: list[Program], finish: Callable[[int, Any], Any] | None = None) -> list[Any]:
    """Advance ``n`` ranks' programs together until they end; returns what each returned (passed
    through ``finish(rank, result)`` as soon as that rank ends, so that a caller can drop what it
    does not keep). Every rank must ask for the same collective at the same point and end at the
    same point; when ranks raise, the lowest rank's exception is raised."""
    n = len(programs)
    values: list[Any] = [None] * n
    while True:
        requests, ended, errors = [], {}, {}
        for rank, program in enumerate(programs):
            try:
                requests.append(program.send(values[rank]))
            except StopIteration as stop:
                ended[rank] = stop.value if finish is None else finish(rank, stop.value)
            except Exception as e:  # noqa: BLE001 -- raised below, lowest rank first
                errors[rank] = e
        if errors:
            if len(errors) + len(ended) < n:  # some ranks went on: a bug in the step, not bad input
                raise RuntimeError(f"simulated ranks {sorted(errors)} raised while others went on") \
                    from errors[min(errors)]
            raise errors[min(errors)]
        if ended:
            if len(ended) < n:
                raise RuntimeError(f"simulated ranks {sorted(ended)} ended while others went on")
            return [ended[rank] for rank in range(n)]
        values = _resolve(requests)
