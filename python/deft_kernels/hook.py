"""DDP communication hook: gradient sparsification (DEFT or a baseline) in place of DDP's all-reduce.

One line turns it on, in the style of PyTorch's PowerSGD hook::

    model.register_comm_hook(DeftState(sparsifier="deft", density=0.01), deft_hook)

What the hook does with each DDP bucket at iteration ``state.iter``:

1. **Warm-up** (``iter < warmup_steps``): the dense path of :mod:`deft_kernels.driver`: the bucket
   all-reduced in fp32 and divided by the number of workers in fp32, one rounding (DDP's average up
   to that rounding). No residual is kept.
2. **Sparse steps**: the bucket's own sparsifier (one per ``bucket.index()``, with its own
   error-feedback residual; fragments are cut from the bucket's parameter sizes) runs the driver's
   step program on the bucket's local flat gradient. The result, zero except at the indices sent by
   some worker where it holds their mean, replaces the bucket.
3. The iteration counter advances after the last bucket (``bucket.is_last()``).

**Overlap.** The hook returns at once with a future chained on the step's asynchronous collectives
(:class:`deft_kernels.driver.ExchangeQueue`): a step continues in the thread that completes its
collective, so the exchange of a bucket overlaps the rest of backward, as PowerSGD's hook does, and
nothing ever waits inside a ``Future.then`` callback (which deadlocks on gloo). Ordering rule: the
buckets' steps run one at a time, in bucket order, each starting when the previous one ends, so
every rank issues the group's collectives in one order. At the last bucket backward is done, and the
hook waits there until every step has ended, before DDP issues collectives of its own (with
``find_unused_parameters=True`` it all-reduces its map of used parameters right after the last
bucket). On NCCL a collective's future completes when the work is enqueued, so the steps run inline
and each host read of a step blocks the hook's thread until its data has arrived; every result is
taken with ``Future.wait()``, which orders the current stream after NCCL's (docs/exchange.md, the
stream rule; not run on a GPU here: ``scripts/gpu_check.sh`` runs the hook on NCCL).

**Failures.** When a step fails on any rank (bad input, or its plan, selection or packing raises),
every rank's step raises after the same collective, naming the rank and the cause (docs/exchange.md,
the failure protocol); the bucket's future carries the error, DDP raises it from ``backward``, and
the state's queue starts no further bucket: later hook calls fail at once. Build a new state (or
``load_state_dict`` a saved one into a new state) to go on.

**Output in place.** The warm-up all-reduces an fp32 bucket in place and divides it, as DDP does
(16-bit buckets go through an fp32 copy: the numeric rule); a sparse step writes its result into
the bucket's own buffer and returns it, as PowerSGD's hook does: no N-element output per step.

**Planning spreads over the ranks.** Bucket ``i``'s sparsifier has ``rotation = i``: at iteration
``t`` its leader is rank ``(t + i) % n``, so the buckets of one iteration are planned by different
ranks, and the bins rotate with the same offset.

**Unused parameters.** With ``find_unused_parameters=True`` DDP discards the hook's output for a
parameter no rank used in the iteration; anything sent there would be lost. The state takes DDP's
setting itself: at a new model's first hook call it finds the DDP model the hook was registered on
(the list of comm hooks DDP keeps, found through the garbage collector's referrers: one look per
model: 70 ms in a process holding GPT-2 small's DDP model, about 300,000 tracked objects, on a
2-core CPU VM, torch 2.13, by ``python bench/ddp_lookup_cost.py``) and reads its
``find_unused_parameters``; a value given to ``DeftState`` must agree with it (a ``ValueError``
names both otherwise, at that first call, on every rank alike). Where no DDP model is found (a hook
called some other way), ``find_unused_parameters=None`` counts as ``False``. With ``True`` (without
it the state keeps no per-parameter bookkeeping at all), the state registers a tensor hook on every
parameter (it runs when the parameter's gradient is computed, before DDP's own hooks) and passes
each step the parameters this rank used since the previous exchange (under ``no_sync``, in any of
the accumulated iterations, as DDP counts them); the step exchanges these flags in its header, and a
parameter no rank used keeps its residual whole (see :mod:`deft_kernels.driver.program`). In a new
DDP model's first iteration the tensor hooks are registered too late to fire; when that iteration is
sparse (resuming from a checkpoint), a parameter counts as used where its local gradient is not all
zeros, which also keeps everything: a parameter excluded while in use gets a zero output and keeps
its residual for later.

**Why a warm-up of at least one step.** DDP buckets its parameters twice: in a new DDP model's first
iteration every parameter sits in one provisional bucket (in ``model.parameters()`` order); at the
second forward DDP rebuilds the buckets from the order in which gradients became ready, and keeps
them. A residual and fragments keyed by ``bucket.index()`` only mean something on the rebuilt
buckets, so the first iteration must not create them. (PowerSGD asks for 2 warm-up steps for the same
reason; here the step's layout check catches a change of length: the hook raises instead of mixing
residuals. DDP does not rebuild its buckets a second time, so a bucket's parameters are looked up
once, when its sparsifier is made, not at every step.)

**Checkpoints.** ``state_dict()`` holds this rank's residual for every bucket and the counters; each
rank saves its own file and loads it back (a file from another rank is refused). A resumed run builds
a new DDP model, whose first iteration has the provisional layout again; the state recognises it (its
parameters are new to the state) and, past the warm-up, regroups that iteration's gradients into the
saved buckets (matching parameters by their position in that first iteration, which is the same in
every new DDP model of the same module), so that resuming gives the same parameters as not stopping.
A state serves one DDP model: register a loaded state on a freshly built model, before its first
iteration.
"""

import gc
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from ._integration import (CompressionLog, SparsifierSpec, check_density, check_grad_scaler, check_group, check_int,
                           check_checkpoint, check_sparsifier_spec, loss_scale, make_sparsifier, undo_if_skipped, world)
from .driver import ExchangeQueue, StepResult, TorchCollectives, mean_program, run_blocking, step_program
from .driver.collectives import future_on
from .sparsifiers.base import Sparsifier, StepStats
from .transfer import to_host

__all__ = ["DeftState", "deft_hook"]


@dataclass
class _BucketState:
    """One rebuilt DDP bucket: its sparsifier and the layout that sparsifier was built for."""

    sparsifier: Sparsifier
    positions: tuple[int, ...]  # each parameter's position in the DDP model's first iteration
    sizes: tuple[int, ...]  # numel of each parameter, in bucket order
    result: StepResult | None = None  # this iteration's step, once it has ended


def _holders(obj: Any):
    """The objects that hold ``obj`` as an attribute: directly (an instance whose attributes live
    inline) or through their ``__dict__``."""
    for holder in gc.get_referrers(obj):
        yield from gc.get_referrers(holder) if isinstance(holder, dict) else (holder,)


def registered_on(state: Any) -> Optional[torch.nn.Module]:
    """The ``DistributedDataParallel`` model whose comm hooks include ``state`` (DDP keeps them as
    ``(hook, state)`` pairs in a list), found through the garbage collector's referrers; ``None``
    where there is none (a hook called directly, or by a wrapper that keeps the state elsewhere)."""
    pairs = [p for p in gc.get_referrers(state) if isinstance(p, tuple) and len(p) == 2 and p[1] is state]
    for hooks in (h for pair in pairs for h in gc.get_referrers(pair) if isinstance(h, list)):
        for ddp in _holders(hooks):
            if isinstance(ddp, DistributedDataParallel) and getattr(ddp, "_comm_hooks", None) is hooks:
                return ddp
    return None


class DeftState:
    """Everything the hook keeps between steps: one sparsifier and residual per DDP bucket, the
    iteration counter and the statistics.

    Args:
        process_group: group to communicate in; ``None``: the default group.
        sparsifier: a name from ``deft_kernels.sparsifiers.SPARSIFIERS`` ("deft", "topk", "cltk",
            "threshold", "sidco", "micro", "dense") or a factory ``f(density, **sparsifier_kwargs)``
            returning a ``Sparsifier`` (a ``Sparsifier`` subclass is one).
        density: fraction of each bucket's elements sent per step, in (0, 1].
        warmup_steps: dense (averaged all-reduce) iterations before sparsification starts, >= 1
            (see the module docstring for why).
        grad_scaler: the ``torch.amp.GradScaler`` of the training loop, if any (fp16 AMP): the
            residuals then hold unscaled gradients (the hook divides each bucket by the scaler's
            current scale before accumulating and scales its output back), and in an iteration whose
            output is not finite anywhere (the scaler skips its optimizer step) every bucket's
            residual stays as it was. Without it, a scaled gradient would pile up in the residual in
            the units of whatever scale was current, and an overflow step would leave its gradient
            there while the optimizer skips it.
        find_unused_parameters: ``None`` (default): DDP's own setting, read from the DDP model at
            the hook's first call (see the module docstring). ``True``/``False``: must equal the value
            given to ``DistributedDataParallel`` (a ``ValueError`` at the first call otherwise: with
            DDP's ``True`` and the state's ``False``, updates to a parameter no rank used would be
            lost). With ``True`` the state tracks which parameters this rank used (a tensor hook per
            parameter); with ``False`` (DDP's default, where every parameter is used in every
            iteration) it registers none, and a step does no per-parameter work.
        **sparsifier_kwargs: passed to the sparsifier (e.g. ``threshold=`` for "threshold";
            ``residual_dtype=`` to choose the residual's dtype, by default fp32 for 16-bit
            gradients: see ``deft_kernels.sparsifiers.Sparsifier``).

    Attributes:
        iter: iterations completed (warm-up included).
        last_stats: ``{bucket index: StepStats}`` of the latest sparse iteration (empty before one).
        last_plans: ``{bucket index: plan}`` of the latest sparse iteration (the plan every rank used, e.g.
            DEFT's :class:`~deft_kernels.planning.DeftPlan`; ``None`` for sparsifiers without one).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, sparsifier: SparsifierSpec = "deft",
                 density: float = 0.01, warmup_steps: int = 10, *, grad_scaler: Optional[torch.amp.GradScaler] = None,
                 find_unused_parameters: Optional[bool] = None, **sparsifier_kwargs: Any) -> None:
        check_group("process_group", process_group)
        self.grad_scaler = check_grad_scaler(grad_scaler)
        if find_unused_parameters is not None and not isinstance(find_unused_parameters, bool):
            raise TypeError("find_unused_parameters must be None or a bool, got "
                            f"{type(find_unused_parameters).__name__}")
        self._find_unused_given = find_unused_parameters  # None: DDP's
        self.find_unused_parameters = bool(find_unused_parameters)  # in effect; DDP's once the hook finds it
        self.process_group = process_group
        self.sparsifier = check_sparsifier_spec(sparsifier)
        self.density = check_density(density)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.sparsifier_kwargs = dict(sparsifier_kwargs)
        make_sparsifier(self.sparsifier, self.density, self.sparsifier_kwargs)  # fail now on bad kwargs
        self.iter = 0
        self.last_stats: dict[int, StepStats] = {}
        self.last_plans: dict[int, Any] = {}
        self._buckets: dict[int, _BucketState] = {}
        self._log = CompressionLog()
        self._reset_model()

    def _reset_model(self) -> None:
        """Forget the DDP model: the next hook call starts a new model's first iteration."""
        self._forget_parameters()
        self._iteration_started = False
        self._new_model = False
        self._mode = ""
        self._loss_scale: float | None = None
        self._pending: list[tuple[list[int], list[int], torch.Tensor, torch.futures.Future]] = []
        self._queue: ExchangeQueue | None = None  # made at the first step that needs it (needs the group)

    def _forget_parameters(self) -> None:
        """Drop the parameters of the previous DDP model and the tensor hooks on them."""
        for handle in getattr(self, "_tensor_hooks", []):
            handle.remove()
        self._tensor_hooks: list = []
        self._positions: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> position
        self._used: set[int] = set()  # positions whose gradient was computed in this iteration

    def _mark_used(self, position: int):
        def hook(grad: torch.Tensor) -> None:
            self._used.add(position)
        return hook

    @property
    def sparsifiers(self) -> dict[int, Sparsifier]:
        """``{bucket index: Sparsifier}``, each holding that bucket's residual (empty in the warm-up)."""
        return {index: b.sparsifier for index, b in self._buckets.items()}

    def compression_stats(self) -> dict[str, float]:
        """Totals over all sparse iterations of this rank: ``steps``, ``selected``, ``sent``, ``numel``,
        ``bytes_sent``, ``bytes_received``, ``t_select``, ``t_comm``, ``t_other`` (seconds), ``density``
        (sent / numel) and ``compress_rate`` (numel / sent)."""
        return self._log.summary()

    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals (one per bucket), layouts and counters; save one file per rank."""
        rank, n = world(self.process_group)
        return {
            "iter": self.iter, "rank": rank, "world_size": n, "density": self.density,
            "buckets": {index: {"positions": list(b.positions), "sizes": list(b.sizes),
                                "sparsifier": b.sparsifier.state_dict()}
                        for index, b in self._buckets.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned on this same rank; then register the state on a
        newly built DDP model."""
        if not isinstance(state_dict, dict) or not {"iter", "rank", "world_size", "buckets"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict returned by DeftState.state_dict()")
        check_checkpoint(state_dict, self.process_group, self.density)
        self._restore(state_dict)

    def _restore(self, state_dict: dict[str, Any]) -> None:
        buckets = {}
        for index, saved in state_dict["buckets"].items():
            sp = self._new_sparsifier(int(index))
            sp.load_state_dict(saved["sparsifier"])
            buckets[int(index)] = _BucketState(sp, tuple(saved["positions"]), tuple(saved["sizes"]))
        self._buckets = buckets
        self.iter = int(state_dict["iter"])
        self.last_stats, self.last_plans = {}, {}
        self._reset_model()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the process group (it becomes the default group, as in PowerSGD's state),
        without the grad scaler (pass the loop's own to the unpickled state: ``state.grad_scaler =
        scaler``) and without the link to the DDP model."""
        keep = ("sparsifier", "density", "warmup_steps", "find_unused_parameters", "_find_unused_given",
                "sparsifier_kwargs", "_log")
        return {"config": {k: self.__dict__[k] for k in keep}, "state": self.state_dict()}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        self.__dict__.update(pickled["config"])
        self.__dict__.setdefault("_find_unused_given", self.find_unused_parameters)  # pickled before it
        self.process_group = None
        self.grad_scaler = None
        self._restore(pickled["state"])

    # ---- what the hook calls ----

    def _adopt_ddp_setting(self) -> None:
        """Take ``find_unused_parameters`` from the DDP model this state is registered on, or check
        the value given against it (module docstring, "Unused parameters"). Without a DDP model the
        value given counts (``False`` for ``None``)."""
        ddp, given = registered_on(self), self._find_unused_given
        if ddp is None:
            self.find_unused_parameters = bool(given)
            return
        theirs = bool(ddp.find_unused_parameters)
        if given is not None and given != theirs:
            lost = " (with False here, updates to a parameter no rank used would be lost)" if theirs else ""
            raise ValueError(f"DeftState(find_unused_parameters={given}) but the DistributedDataParallel model it "
                             f"is registered on has find_unused_parameters={theirs}: pass the same value, or leave "
                             f"DeftState's at None to take DDP's{lost}")
        self.find_unused_parameters = theirs

    def _begin_bucket(self, bucket: dist.GradBucket) -> None:
        """On the iteration's first bucket, decide how the whole iteration runs: "dense" (warm-up, or
        a new model's first iteration with nothing to carry over), "regroup" (a new model's first
        iteration with residuals to carry over) or "sparse"."""
        if not self._iteration_started:
            self._iteration_started = True
            # A new DDP model has parameters this state has not seen; the first one tells (a state
            # serves one model, so there is no need to look at every parameter every iteration).
            new_model = bucket.parameters()[0] not in self._positions
            if new_model:
                self._forget_parameters()
                self._adopt_ddp_setting()
            self._new_model = new_model
            if self.iter < self.warmup_steps:
                self._mode = "dense"
            elif new_model:
                self._mode = "regroup" if self._buckets else "dense"
            else:
                self._mode = "sparse"
            self._loss_scale = loss_scale(self.grad_scaler) if self._mode != "dense" else None
        if self._new_model:
            for p in bucket.parameters():
                self._positions[p] = len(self._positions)
                if self.find_unused_parameters:
                    self._tensor_hooks.append(p.register_hook(self._mark_used(self._positions[p])))

    def _layout(self, bucket: dist.GradBucket) -> tuple[list[int], list[int]]:
        try:
            positions = [self._positions[p] for p in bucket.parameters()]
        except KeyError:
            raise RuntimeError(f"bucket {bucket.index()} holds parameters this DeftState has not seen in its DDP "
                               "model's first iteration: a state serves one DDP model; build a new state, or "
                               "load_state_dict into one, for a new model") from None
        return positions, [g.numel() for g in bucket.gradients()]

    def _comm(self) -> TorchCollectives:
        if self._queue is None:
            self._queue = ExchangeQueue(TorchCollectives(self.process_group))
        return self._queue.collectives

    def _submit(self, program, buffer: torch.Tensor, index: int | None) -> torch.futures.Future:
        """Queue a step; the future holds its output (and records its stats when ``index`` is a bucket)."""
        def output(fut: torch.futures.Future) -> torch.Tensor:
            result: StepResult = fut.value()
            if index is not None:
                self.last_stats[index], self.last_plans[index] = result.stats, result.plan
                self._buckets[index].result = result
            return result.out

        return self._queue.submit(program, buffer.device).then(output)

    def _dense_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        comm = self._comm()
        buffer = bucket.buffer()
        return self._submit(mean_program(buffer, rank=comm.rank, world_size=comm.world_size, in_place=True),
                            buffer, None)

    def _new_sparsifier(self, index: int) -> Sparsifier:
        sp = make_sparsifier(self.sparsifier, self.density, self.sparsifier_kwargs)
        sp.rotation = index  # one iteration's buckets are led by different ranks (docs/exchange.md)
        return sp

    def _sparse_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        index = bucket.index()
        b = self._buckets.get(index)
        if b is None:  # the bucket's layout is fixed from now on (DDP rebuilds its buckets once, before)
            positions, sizes = self._layout(bucket)
            b = self._buckets[index] = _BucketState(self._new_sparsifier(index), tuple(positions), tuple(sizes))
        comm = self._comm()
        used = torch.tensor([pos in self._used for pos in b.positions]) if self.find_unused_parameters else None
        buffer = bucket.buffer()
        program = step_program(b.sparsifier, buffer, sizes=b.sizes, rank=comm.rank, world_size=comm.world_size,
                               used=used, out=buffer, loss_scale=self._loss_scale)
        return self._submit(program, buffer, index)

    def _regroup(self) -> None:
        """Last bucket of a resumed model's first iteration: gather the parameters of each saved bucket
        from the provisional buckets, step each saved bucket's sparsifier, scatter the results back and
        complete every provisional bucket's future."""
        grads, numels = {}, {}
        for positions, sizes, buffer, _ in self._pending:
            for pos, size, g in zip(positions, sizes, buffer.split(sizes)):
                grads[pos], numels[pos] = g, size
        saved = {pos: size for b in self._buckets.values() for pos, size in zip(b.positions, b.sizes)}
        if saved != numels:
            raise RuntimeError("the DDP model's parameters do not match the buckets of the loaded state "
                               f"({len(numels)} parameters, {sum(numels.values())} elements; the state has "
                               f"{len(saved)} parameters, {sum(saved.values())} elements)")
        comm = self._comm()
        outs = {}
        for index in sorted(self._buckets):
            b = self._buckets[index]
            # The tensor hooks were registered too late to fire in this first iteration: a parameter
            # counts as used where its gradient is not all zeros (see the module docstring).
            used = to_host(torch.stack([grads[pos].ne(0).any() for pos in b.positions]))[0] \
                if self.find_unused_parameters else None
            b.sparsifier.rotation = index
            result = run_blocking(step_program(b.sparsifier, torch.cat([grads[pos] for pos in b.positions]),
                                               sizes=list(b.sizes), rank=comm.rank, world_size=comm.world_size,
                                               used=used, loss_scale=self._loss_scale), comm)
            self.last_stats[index], self.last_plans[index] = result.stats, result.plan
            b.result = result
            outs.update(zip(b.positions, result.out.split(list(b.sizes))))
        for positions, _, buffer, fut in self._pending:
            fut.set_result(torch.cat([outs[pos] for pos in positions]).view_as(buffer))

    def _end_iteration(self) -> None:
        """After the last bucket: wait until every step of the iteration has ended (nothing is left of
        backward to overlap with, and DDP may issue collectives of its own next), then advance."""
        if self._queue is not None:
            self._queue.wait_idle()
        if self._mode in ("sparse", "regroup"):
            steps = [(b.sparsifier, b.result) for b in self._buckets.values() if b.result is not None]
            if self._loss_scale is not None:
                undo_if_skipped(steps)
            for b in self._buckets.values():
                b.result = None
            self._log.record(list(self.last_stats.values()))
        self.iter += 1
        self._iteration_started = False
        self._pending = []
        self._used = set()


def deft_hook(state: DeftState, bucket: dist.GradBucket,
              *fsdp_grads: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averaged dense all-reduce during the warm-up, then the state's
    sparsifier per bucket (see the module docstring). Register with
    ``model.register_comm_hook(state, deft_hook)``.

    Returns a future holding a tensor shaped like ``bucket.buffer()``: the mean over workers, dense in
    the warm-up, sparse after it. The future completes when the bucket's exchange has; the hook
    itself waits only at the last bucket. FSDP is not supported: its ``register_comm_hook`` calls hooks
    with gradient tensors (``fsdp_grads``: the sharded output of a sharded strategy), which raises a
    ``TypeError`` saying so.
    """
    if fsdp_grads or isinstance(bucket, torch.Tensor):
        raise TypeError("bucket must be a torch.distributed.GradBucket, got a tensor: FSDP's register_comm_hook passes "
                        "gradient tensors, and deft_hook, a DDP communication hook, does not support FSDP; wrap the "
                        "model in DistributedDataParallel")
    if not isinstance(state, DeftState):
        raise TypeError(f"state must be a DeftState, got {type(state).__name__}")
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(f"bucket must be a torch.distributed.GradBucket, got {type(bucket).__name__}")
    buffer = bucket.buffer()
    if not buffer.is_floating_point():
        raise TypeError(f"bucket.buffer() must hold floating-point gradients, got {buffer.dtype}")
    state._begin_bucket(bucket)
    try:
        if state._mode == "dense":
            return state._dense_bucket(bucket)
        if state._mode == "sparse":
            return state._sparse_bucket(bucket)
        positions, sizes = state._layout(bucket)
        fut = future_on(buffer.device)
        state._pending.append((positions, sizes, buffer, fut))
        if bucket.is_last():
            state._regroup()
        return fut
    finally:
        if bucket.is_last():
            state._end_iteration()
