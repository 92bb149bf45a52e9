"""The DDP hook's per-iteration engine: one per DDP model a :class:`~deft_kernels.hook.DeftState`
serves. The state holds the configuration and what survives a step (each bucket's sparsifier and
residual, the counters); the engine holds what belongs to one DDP model and one iteration: the
parameters' positions, the tensor hooks that track used parameters, the queue of the buckets' steps,
and each iteration's mode:

- ``"dense"``: the warm-up, and a new model's first iteration with nothing to carry over: every
  bucket all-reduced and averaged (``driver.mean_program``);
- ``"sparse"``: each bucket's sparsifier steps on its bucket, queued (``driver.ExchangeQueue``);
- ``"regroup"``: the buckets do not have the layout the residuals were saved for (a resumed model's
  first iteration, or a new DDP model of the same module): the buckets' gradients are gathered by
  parameter, each saved bucket's sparsifier steps on its own parameters' gradients, and the results
  are scattered back, blocking, at the last bucket.

See :mod:`deft_kernels.hook` for what each rule is for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from . import driver
from ._ddp import DdpModel
from ._integration import loss_scale
from .driver import ExchangeQueue, StepResult, TorchCollectives, mean_program, run_blocking, step_program
from .driver.collectives import future_on
from .sparsifiers.base import Sparsifier
from .transfer import to_host


@dataclass
class BucketState:
    """One rebuilt DDP bucket: its sparsifier and the layout that sparsifier was built for."""

    sparsifier: Sparsifier
    positions: tuple[int, ...]  # each parameter's position in its model (see Engine.positions)
    sizes: tuple[int, ...]  # numel of each parameter, in bucket order
    names: tuple[Optional[str], ...] = ()  # each parameter's name in the module, where DDP was found
    result: Optional[StepResult] = None  # this iteration's step, once it has ended


class Engine:
    """Runs one DDP model's iterations for ``state`` on ``group``; ``ddp``: what was found of the
    model; ``track_used``: keep a tensor hook per parameter and pass each step the tensors this rank
    used (``find_unused_parameters``)."""

    def __init__(self, state: Any, ddp: DdpModel, group: Optional[dist.ProcessGroup], track_used: bool) -> None:
        self.state, self.ddp, self.group, self.track_used = state, ddp, group, track_used
        #: parameter -> position: in the module's ``parameters()`` order where DDP was found (the same in
        #: every DDP model of the module), else in the order this model's first iteration showed them.
        self.positions: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.names: dict[int, Optional[str]] = {}  # position -> name in the module
        if ddp.found:
            module = ddp.model().module
            for i, (name, p) in enumerate(module.named_parameters()):
                self.positions[p], self.names[i] = i, name
        self._hooks: list = []
        self.first_iteration = True  # this model's first iteration (its buckets are provisional)
        self.mode: Optional[str] = None  # the current iteration's, None between iterations
        self.loss_scale: Optional[float] = None
        self.used: set[int] = set()  # positions whose gradient was computed since the last exchange
        self.queue: Optional[ExchangeQueue] = None
        self.pending: list[tuple[list[int], list[int], torch.Tensor, torch.futures.Future]] = []
        self.failure: Optional[BaseException] = None

    def close(self) -> None:
        """Remove the tensor hooks (the model is no longer served)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---- which model, which layout ----

    def knows(self, param: torch.Tensor) -> bool:
        return param in self.positions

    def serves_live_model(self) -> bool:
        """Whether the model this engine serves still exists (its DDP model where found, else any of
        its parameters)."""
        return self.ddp.alive() if self.ddp.found else len(self.positions) > 0

    def _number(self, bucket: dist.GradBucket) -> None:
        """In the model's first iteration: give the bucket's unseen parameters their positions (and
        tensor hooks, when tracking)."""
        for p in bucket.parameters():
            if p not in self.positions:
                self.positions[p] = len(self.positions)
            if self.track_used and self.first_iteration:
                self._hooks.append(p.register_hook(self._mark_used(self.positions[p])))

    def _mark_used(self, position: int):
        def hook(grad: torch.Tensor) -> None:
            self.used.add(position)
        return hook

    def layout(self, bucket: dist.GradBucket) -> tuple[list[int], list[int]]:
        """The bucket's parameters as positions, and their sizes."""
        try:
            positions = [self.positions[p] for p in bucket.parameters()]
        except KeyError:
            raise RuntimeError(f"bucket {bucket.index()} holds parameters this DeftState has not seen in its DDP "
                               "model: a state serves one DDP model; build a new state, or load_state_dict into one, "
                               "for a new model") from None
        return positions, [g.numel() for g in bucket.gradients()]

    def matches(self, bucket: dist.GradBucket) -> bool:
        """Whether the bucket holds what the state's bucket of its index was built for (True where
        there is none yet)."""
        saved = self.state._buckets.get(bucket.index())
        if saved is None:
            return True
        if not all(p in self.positions for p in bucket.parameters()):
            return False
        return tuple(self.layout(bucket)[0]) == saved.positions

    # ---- one iteration ----

    def begin(self, bucket: dist.GradBucket) -> None:
        """The iteration's first bucket: decide its mode; read what the previous iteration's steps
        left for later (raising, on every rank alike, if one of them failed)."""
        state = self.state
        if self.failure is None and self.queue is not None and self.queue.failure is not None:
            self.failure = self.queue.failure
        if self.failure is not None:
            raise RuntimeError(f"an earlier iteration's exchange failed ({type(self.failure).__name__}: "
                               f"{self.failure}); build a new DeftState (or load_state_dict into one) to go on")
        state.last_stats, state.last_plans = {}, {}
        if state.iter < state.warmup_steps:
            mode = "dense"
        elif self.first_iteration:
            mode = "regroup" if state._buckets else "dense"
        else:
            mode = "sparse" if self.matches(bucket) else "regroup"
        if mode != "dense":
            try:
                for b in state._buckets.values():
                    driver.settle(b.sparsifier)
            except Exception as e:
                self.failure = e
                raise
        self.loss_scale = loss_scale(state.grad_scaler) if mode != "dense" else None
        self.mode = mode

    def bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """One bucket of the current iteration: its future."""
        if self.first_iteration:
            self._number(bucket)
        if self.mode == "dense":
            return self._dense(bucket)
        if self.mode == "sparse":
            return self._sparse(bucket)
        positions, sizes = self.layout(bucket)
        buffer = bucket.buffer()
        fut = future_on(buffer.device)
        self.pending.append((positions, sizes, buffer, fut))
        if bucket.is_last():
            self._regroup()
        return fut

    def end(self) -> None:
        """After the last bucket: wait until every step of the iteration has ended (at most the
        group's timeout: nothing is left of backward to overlap with, and DDP may issue collectives
        of its own next), commit a loss-scaled iteration (one host read), record the statistics."""
        state = self.state
        try:
            if self.queue is not None:
                self.queue.wait_idle()
            if self.mode in ("sparse", "regroup"):
                steps = [(b.sparsifier, b.result) for b in state._buckets.values() if b.result is not None]
                if self.loss_scale is not None:
                    driver.commit(steps)
                state._log.record([result.stats for _, result in steps])
        except Exception as e:
            self.failure = self.failure or e
            raise
        finally:
            for b in state._buckets.values():
                b.result = None
            state.iter += 1
            self.mode = None
            self.first_iteration = False
            self.pending = []
            self.used = set()

    # ---- the modes ----

    def _comm(self, device: torch.device) -> TorchCollectives:
        if self.queue is None:
            self.queue = ExchangeQueue(TorchCollectives(self.group), device)
        return self.queue.collectives

    def _submit(self, program, buffer: torch.Tensor, index: Optional[int]) -> torch.futures.Future:
        """Queue a step; the future holds its output (and records its stats when ``index`` is a bucket)."""
        state = self.state

        def output(fut: torch.futures.Future) -> torch.Tensor:
            result: StepResult = fut.value()
            if index is not None:
                state.last_stats[index], state.last_plans[index] = result.stats, result.plan
                state._buckets[index].result = result
            return result.out

        return self.queue.submit(program, buffer.device).then(output)

    def _dense(self, bucket: dist.GradBucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        comm = self._comm(buffer.device)
        return self._submit(mean_program(buffer, rank=comm.rank, world_size=comm.world_size, in_place=True),
                            buffer, None)

    def _used(self, b: BucketState) -> Optional[torch.Tensor]:
        return torch.tensor([pos in self.used for pos in b.positions]) if self.track_used else None

    def _sparse(self, bucket: dist.GradBucket) -> torch.futures.Future:
        index, buffer = bucket.index(), bucket.buffer()
        b = self.state._buckets.get(index)
        if b is None:  # the bucket's layout is fixed from now on (DDP rebuilds its buckets once, before)
            positions, sizes = self.layout(bucket)
            names = tuple(self.names.get(pos) for pos in positions)
            b = self.state._buckets[index] = BucketState(self.state._new_sparsifier(index), tuple(positions),
                                                         tuple(sizes), names)
        comm = self._comm(buffer.device)
        sp = b.sparsifier.to(buffer.device) if b.sparsifier.layout is not None else b.sparsifier
        program = step_program(sp, buffer, sizes=b.sizes, rank=comm.rank, world_size=comm.world_size,
                               used=self._used(b), out=buffer, loss_scale=self.loss_scale)
        return self._submit(program, buffer, index)

    def _regroup(self) -> None:
        """Last bucket of an iteration whose buckets do not have the saved layout: gather the
        parameters of each saved bucket from this iteration's buckets, step each saved bucket's
        sparsifier, scatter the results back and complete every bucket's future."""
        state = self.state
        grads, numels = {}, {}
        for positions, sizes, buffer, _ in self.pending:
            for pos, size, g in zip(positions, sizes, buffer.split(sizes)):
                grads[pos], numels[pos] = g, size
        saved = {pos: size for b in state._buckets.values() for pos, size in zip(b.positions, b.sizes)}
        if saved != numels:
            raise RuntimeError("the DDP model's parameters do not match the buckets of the loaded state "
                               f"({len(numels)} parameters, {sum(numels.values())} elements; the state has "
                               f"{len(saved)} parameters, {sum(saved.values())} elements)")
        renamed = [(b.names[i], self.names[pos]) for b in state._buckets.values() for i, pos in enumerate(b.positions)
                   if b.names and b.names[i] is not None and self.names.get(pos) not in (None, b.names[i])]
        if renamed:
            raise RuntimeError("the DDP model's parameters do not match the buckets of the loaded state: "
                               f"{len(renamed)} parameters sit where the state had others (first: the state's "
                               f"{renamed[0][0]!r} is {renamed[0][1]!r} here)")
        if not self.first_iteration:
            warnings.warn("DDP's buckets do not hold the parameters the DeftState's buckets were built for (a new DDP "
                          "model of the same module?): this iteration regroups them, blocking", stacklevel=3)
        device = self.pending[0][2].device
        comm = self._comm(device)
        outs = {}
        for index in sorted(state._buckets):
            b = state._buckets[index]
            # A tensor hook registered in this model's first iteration fires only from the next one:
            # then a parameter counts as used where its gradient is not all zeros (module docstring).
            used = None
            if self.track_used:
                used = to_host(torch.stack([grads[pos].ne(0).any() for pos in b.positions]))[0] \
                    if self.first_iteration else self._used(b)
            sp = b.sparsifier.to(device)
            sp.rotation = index
            result = run_blocking(step_program(sp, torch.cat([grads[pos] for pos in b.positions]),
                                               sizes=list(b.sizes), rank=comm.rank, world_size=comm.world_size,
                                               used=used, loss_scale=self.loss_scale), comm)
            state.last_stats[index], state.last_plans[index] = result.stats, result.plan
            b.result = result
            outs.update(zip(b.positions, result.out.split(list(b.sizes))))
        for positions, _, buffer, fut in self.pending:
            fut.set_result(torch.cat([outs[pos] for pos in positions]).view_as(buffer))
