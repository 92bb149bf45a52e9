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

The state holds the configuration and what survives a step; the per-iteration engine
(:mod:`deft_kernels._engine`) and what the hook learns of its DDP model (:mod:`deft_kernels._ddp`)
are units of their own.

**Overlap.** The hook returns at once with a future chained on the step's asynchronous collectives
(:class:`deft_kernels.driver.ExchangeQueue`), as PowerSGD's hook does; nothing ever waits inside a
``Future.then`` callback (which deadlocks on gloo). Ordering rule: the buckets' steps run one at a
time, in bucket order, each starting when the previous one ends, so every rank issues the group's
collectives in one order. At the last bucket backward is done, and the hook waits there (at most the
group's timeout) until every step has ended, before DDP issues collectives of its own (with
``find_unused_parameters=True`` it all-reduces its map of used parameters right after the last
bucket). On NCCL a collective's future completes when the work is enqueued, so a step runs inline
in the hook's call, on the queue's own CUDA stream: DEFT's default step (the plan made one step
ahead) reads nothing of the device on the host, so the hook returns as soon as its kernels and
collectives are enqueued and backward goes on beside them; ``plan="leader"`` and the baselines read
device data per bucket and hold the hook's thread there (docs/exchange.md; none of this has run on a
GPU here: ``scripts/gpu_check.sh`` runs the hook on NCCL).

**Failures.** When a step fails on any rank (bad input, or its plan, selection or packing raises),
every rank raises at the same point, naming the rank and the cause (docs/exchange.md, the failure
protocol): for a step that reads its status at once, after the same collective of that step, through
the bucket's future (DDP raises it from ``backward``); for DEFT's default step, which reads its status
one iteration later, at the start of the next iteration (its first hook call raises), after the failed
iteration's average was applied without the failed rank's values. Either way the state starts no
further bucket: later hook calls fail at once. Build a new state (or ``load_state_dict`` a saved one
into a new state) to go on.

**Output in place.** The warm-up all-reduces an fp32 bucket in place and divides it, as DDP does
(16-bit buckets go through an fp32 copy: the numeric rule); a sparse step writes its result into
the bucket's own buffer and returns it, as PowerSGD's hook does: no N-element output per step.

**Planning spreads over the ranks.** Bucket ``i``'s sparsifier has ``rotation = i``: at iteration
``t`` its bins rotate by ``t + i``, and under ``plan="leader"`` its leader is rank ``(t + i) % n``,
so the buckets of one iteration are planned by different ranks.

**The process group and unused parameters** are DDP's: at a new model's first hook call the state
finds the DDP model the hook was registered on (:mod:`deft_kernels._ddp`; torch offers no public
route) and takes its ``process_group`` (the data-parallel group of a 2-D layout) and
``find_unused_parameters``; values given to ``DeftState`` must agree with DDP's (a ``ValueError``
names both otherwise, at that first call, on every rank alike). Where no DDP model is found, the
state uses the group it was given (``None``: the default group) and, unless told
``find_unused_parameters=False``, tracks usage (the safe side), and warns once. With
``find_unused_parameters`` the state registers a tensor hook on every parameter (it runs when the
parameter's gradient is computed, before DDP's own hooks) and passes each step the parameters this
rank used since the previous exchange (under ``no_sync``, in any of the accumulated iterations, as
DDP counts them); a parameter no rank used keeps its residual whole and gets a zero output (see
:mod:`deft_kernels.driver.program`). In a new DDP model's first iteration the tensor hooks are
registered too late to fire; when that iteration is sparse (resuming from a checkpoint), a parameter
counts as used where its local gradient is not all zeros.

**Why a warm-up of at least one step.** DDP buckets its parameters twice: in a new DDP model's first
iteration its buckets are provisional; at the second forward DDP rebuilds them from the order in which
gradients became ready, and keeps them. A residual and fragments keyed by ``bucket.index()`` only mean
something on the rebuilt buckets, so the first iteration must not create them. (PowerSGD asks for 2
warm-up steps for the same reason.)

**One state, one model.** A state serves one DDP model: registered on a second one while the first
is alive, the second's first hook call raises. A new DDP model of the same module (a second
``Trainer.fit``) is recognised by its buckets, which do not hold what the state's buckets were built
for: that iteration regroups (below) and the state goes on.

**Checkpoints.** ``state_dict()`` holds this rank's residual for every bucket, the carried norms of
DEFT's step one step ahead, the parameters each bucket holds (by position and name) and the counters;
each rank saves its own file and loads it back (a file from another rank is refused). A resumed run
builds a new DDP model, whose first iteration has provisional buckets again; the state recognises it
and, past the warm-up, regroups that iteration's gradients into the saved buckets (matching
parameters by their position in the module, and by name where the DDP model was found), so that
resuming gives the same parameters as not stopping. The residuals move to the gradients' device at
that first step. Register a loaded state on a freshly built model, before its first iteration.
"""

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import driver
from ._ddp import DdpModel, registered_on
from ._engine import BucketState, Engine
from ._integration import (CompressionLog, SparsifierSpec, check_checkpoint, check_density, check_grad_scaler,
                           check_group, check_int, check_options, check_sparsifier_spec, make_sparsifier, world)
from .sparsifiers.base import Sparsifier, StepStats

__all__ = ["DeftState", "deft_hook", "registered_on"]


def _ranks(group: Optional[dist.ProcessGroup]) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


class DeftState:
    """Everything the hook keeps between steps: one sparsifier and residual per DDP bucket, the
    iteration counter and the statistics.

    Args:
        process_group: group to communicate in; ``None`` (default): the DDP model's own (the
            data-parallel group), or the default group where the DDP model is not found. A group
            given must hold the ranks of DDP's (a ``ValueError`` at the first hook call otherwise).
        sparsifier: a name from ``deft_kernels.sparsifiers.SPARSIFIERS`` ("deft", "topk", "cltk",
            "threshold", "sidco", "micro", "dense") or a factory ``f(density, **sparsifier_kwargs)``
            returning a ``Sparsifier`` (a ``Sparsifier`` subclass is one).
        density: fraction of each bucket's elements sent per step, in (0, 1] (0.01 is 1%; 1 sends
            every element, as ``"dense"`` does, and warns).
        warmup_steps: dense (averaged all-reduce) iterations before sparsification starts, >= 1
            (default 10, as ``GradientSparsifier``'s: the same training whichever of the two runs it;
            at least 1 because DDP rebuilds its buckets after its first iteration, see the module
            docstring).
        grad_scaler: the ``torch.amp.GradScaler`` of the training loop, if any (fp16 AMP): the
            residuals then hold unscaled gradients (the hook divides each bucket by the scaler's
            current scale before accumulating and scales its output back), and in an iteration whose
            output is not finite anywhere (the scaler skips its optimizer step) every bucket's
            residual stays as it was. The hook reads the scale at an iteration's start and whether it
            was skipped at its end: two host reads per iteration (the scaler's own ``step`` reads its
            inf flag too). Without it, a scaled gradient would pile up in the residual in the units of
            whatever scale was current, and an overflow step would leave its gradient there while the
            optimizer skips it.
        find_unused_parameters: ``None`` (default): DDP's own setting, read from the DDP model at
            the hook's first call (see the module docstring). ``True``/``False``: must equal the value
            given to ``DistributedDataParallel`` (a ``ValueError`` at the first call otherwise: with
            DDP's ``True`` and the state's ``False``, updates to a parameter no rank used would be
            lost). With ``True`` the state tracks which parameters this rank used (a tensor hook per
            parameter); with ``False`` (DDP's default, where every parameter is used in every
            iteration) it registers none, and a step does no per-parameter work.
        **sparsifier_kwargs: passed to the sparsifier (e.g. ``plan="leader"`` for DEFT's paper
            protocol, ``threshold=`` for "threshold"; ``residual_dtype=`` to choose the residual's
            dtype, by default fp32 for 16-bit gradients: see ``deft_kernels.sparsifiers.Sparsifier``).

    Attributes:
        iter: iterations completed (warm-up included).
        last_stats: ``{bucket index: StepStats}`` of the latest iteration's sparse steps (empty in
            the warm-up, and for the buckets of an iteration that failed).
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
        self.process_group = process_group  # as given; None: DDP's
        self.sparsifier = check_sparsifier_spec(sparsifier)
        self.density = check_density(density, self.sparsifier)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.sparsifier_kwargs = dict(sparsifier_kwargs)
        check_options(self.sparsifier, self.sparsifier_kwargs, DeftState)  # a misspelt DeftState argument named
        make_sparsifier(self.sparsifier, self.density, self.sparsifier_kwargs)  # fail now on bad kwargs
        self.iter = 0
        self.last_stats: dict[int, StepStats] = {}
        self.last_plans: dict[int, Any] = {}
        self._buckets: dict[int, BucketState] = {}
        self._numbering: Optional[str] = None  # how the buckets' positions were numbered (Engine.positions)
        self._log = CompressionLog()
        self._engine: Optional[Engine] = None
        self._warned = False

    @property
    def find_unused_parameters(self) -> bool:
        """Whether the state tracks used parameters: DDP's setting once the hook has found it, else
        the value given (``False`` before the first hook call when none was given)."""
        return self._engine.track_used if self._engine is not None else bool(self._find_unused_given)

    @property
    def sparsifiers(self) -> dict[int, Sparsifier]:
        """``{bucket index: Sparsifier}``, each holding that bucket's residual (empty in the warm-up)."""
        return {index: b.sparsifier for index, b in self._buckets.items()}

    def compression_stats(self) -> dict[str, float]:
        """Totals over all sparse iterations of this rank: ``steps``, ``selected``, ``sent``, ``numel``,
        ``bytes_sent``, ``bytes_received``, ``t_select``, ``t_comm``, ``t_other`` (seconds), ``density``
        (sent / numel) and ``compress_rate`` (numel / sent)."""
        return self._log.summary()

    def _group(self) -> Optional[dist.ProcessGroup]:
        return self._engine.group if self._engine is not None else self.process_group

    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals (one per bucket), the parameters each bucket holds, the carried
        norms and the counters; save one file per rank. Reads (and raises) what the latest
        iteration's steps left for later first (``driver.settle``)."""
        for b in self._buckets.values():
            driver.settle(b.sparsifier)
        rank, n = world(self._group())
        return {
            "iter": self.iter, "rank": rank, "world_size": n, "density": self.density, "numbering": self._numbering,
            "buckets": {index: {"positions": list(b.positions), "sizes": list(b.sizes), "names": list(b.names),
                                "sparsifier": b.sparsifier.state_dict()}
                        for index, b in self._buckets.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned on this same rank; then register the state on a
        newly built DDP model."""
        if not isinstance(state_dict, dict) or not {"iter", "rank", "world_size", "buckets"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict returned by DeftState.state_dict()")
        check_checkpoint(state_dict, self._group(), self.density)
        self._restore(state_dict)

    def _restore(self, state_dict: dict[str, Any]) -> None:
        buckets = {}
        for index, saved in state_dict["buckets"].items():
            sp = self._new_sparsifier(int(index))
            sp.load_state_dict(saved["sparsifier"])
            buckets[int(index)] = BucketState(sp, tuple(saved["positions"]), tuple(saved["sizes"]),
                                              tuple(saved.get("names", ())))
        self._buckets = buckets
        self._numbering = state_dict.get("numbering")
        self.iter = int(state_dict["iter"])
        self.last_stats, self.last_plans = {}, {}
        self._drop_engine()

    def _drop_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the process group (it becomes the default group, as in PowerSGD's state),
        without the grad scaler (pass the loop's own to the unpickled state: ``state.grad_scaler =
        scaler``) and without the link to the DDP model."""
        keep = ("sparsifier", "density", "warmup_steps", "_find_unused_given", "sparsifier_kwargs", "_log")
        return {"config": {k: self.__dict__[k] for k in keep}, "state": self.state_dict()}

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        config = dict(pickled["config"])
        given = config.pop("find_unused_parameters", None)  # pickled before it became DDP's by default
        config.setdefault("_find_unused_given", given)
        self.__dict__.update(config)
        self.process_group = None
        self.grad_scaler = None
        self.last_stats, self.last_plans = {}, {}
        self._buckets, self._numbering, self._engine, self._warned = {}, None, None, False
        self._restore(pickled["state"])

    def _new_sparsifier(self, index: int) -> Sparsifier:
        sp = make_sparsifier(self.sparsifier, self.density, self.sparsifier_kwargs)
        sp.rotation = index  # one iteration's buckets rotate (and, with a leader, are led) apart
        return sp

    # ---- which model: the engine ----

    def _engine_for(self, bucket: dist.GradBucket) -> Engine:
        """The engine of the model this bucket belongs to: the current one, or a new one for a new DDP
        model (refused while the model served so far is alive)."""
        engine = self._engine
        if engine is not None and (engine.mode is not None or engine.failure is not None or not len(engine.positions)):
            return engine  # mid-iteration, stopped (it says so), or made for this model and not yet numbered
        first = bucket.parameters()[0]
        if engine is not None and engine.knows(first):
            if engine.first_iteration or engine.matches(bucket):
                return engine
            ddp = DdpModel.of(self)  # the same parameters bucketed anew: a new DDP model of the module?
            if not ddp.found or (engine.ddp.found and engine.ddp.model() is ddp.model()):
                return engine  # the same model: this iteration regroups
            return self._start(ddp)
        if engine is not None and engine.serves_live_model():
            raise ValueError("this DeftState already serves another DDP model, which is still alive: a state serves "
                             "one model (its residuals are that model's); build one DeftState per model")
        return self._start(DdpModel.of(self))

    def _start(self, ddp: DdpModel) -> Engine:
        """A new engine for a new DDP model, on DDP's group and with DDP's find_unused_parameters (checked
        against what was given)."""
        given_group, given_unused = self.process_group, self._find_unused_given
        if ddp.found:
            group, track = ddp.process_group, ddp.find_unused_parameters
            if given_group is not None and _ranks(given_group) != _ranks(group):
                raise ValueError(f"DeftState(process_group=<ranks {_ranks(given_group)}>) but the DistributedDataParallel "
                                 f"model it is registered on reduces in ranks {_ranks(group)}: pass DDP's group, or "
                                 "leave DeftState's at None to take DDP's")
            if given_unused is not None and given_unused != track:
                lost = " (with False here, updates to a parameter no rank used would be lost)" if track else ""
                raise ValueError(f"DeftState(find_unused_parameters={given_unused}) but the DistributedDataParallel model "
                                 f"it is registered on has find_unused_parameters={track}: pass the same value, or "
                                 f"leave DeftState's at None to take DDP's{lost}")
        else:
            group, track = given_group, True if given_unused is None else given_unused
            if not self._warned:
                self._warned = True
                warnings.warn("DeftState could not find the DistributedDataParallel model it is registered on (torch "
                              "keeps comm hooks in a private list): it communicates on "
                              f"{'the default group' if group is None else 'the group it was given'} and "
                              f"{'tracks which parameters are used (the safe side)' if track else 'assumes every parameter is used'}; "
                              "pass process_group= and find_unused_parameters= to DeftState to state what the model uses",
                              stacklevel=4)
        numbering = "module" if ddp.found else "first iteration"
        if self._buckets and self._numbering not in (None, numbering):
            raise RuntimeError(f"the state's buckets name parameters by their {self._numbering} order, but this DDP "
                               f"model's parameters can only be numbered by their {numbering} order: resume with the "
                               "torch that saved the state")
        self._numbering = numbering
        self._drop_engine()
        self._engine = Engine(self, ddp, group, track)
        return self._engine


_COMPILED_DDP = ("deft_hook needs DDP's gradient buckets, but compiled DDP's python reducer (torch.compile with "
                 "torch._dynamo.config.optimize_ddp='python_reducer') calls a comm hook once per parameter with "
                 "(grad, param), which is not supported. Keep optimize_ddp=True (DDPOptimizer, the default: DDP's "
                 "reducer, its buckets and comm hooks stay), or run DDP uncompiled")


def deft_hook(state: DeftState, bucket: dist.GradBucket,
              *fsdp_grads: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averaged dense all-reduce during the warm-up, then the state's
    sparsifier per bucket (see the module docstring). Register with
    ``model.register_comm_hook(state, deft_hook)``.

    Returns a future holding a tensor shaped like ``bucket.buffer()``: the mean over workers, dense in
    the warm-up, sparse after it. The future completes when the bucket's exchange has; the hook
    itself waits only at the last bucket. FSDP is not supported: its ``register_comm_hook`` calls hooks
    with gradient tensors (``fsdp_grads``: the sharded output of a sharded strategy), which raises a
    ``TypeError`` saying so; nor is compiled DDP's python reducer, which calls hooks per parameter
    with ``(grad, param)`` (a ``TypeError`` says what to do instead).
    """
    if fsdp_grads or isinstance(bucket, torch.Tensor):
        raise TypeError("bucket must be a torch.distributed.GradBucket, got a tensor: FSDP's register_comm_hook passes "
                        "gradient tensors, and deft_hook, a DDP communication hook, does not support FSDP; wrap the "
                        "model in DistributedDataParallel")
    if not isinstance(state, DeftState):
        raise TypeError(f"state must be a DeftState, got {type(state).__name__}")
    if isinstance(bucket, tuple) and len(bucket) == 2 and all(isinstance(t, torch.Tensor) for t in bucket):
        raise TypeError(_COMPILED_DDP)
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(f"bucket must be a torch.distributed.GradBucket, got {type(bucket).__name__}")
    buffer = bucket.buffer()
    if not buffer.is_floating_point():
        raise TypeError(f"bucket.buffer() must hold floating-point gradients, got {buffer.dtype}")
    return run_bucket(state, bucket)


def run_bucket(state: DeftState, bucket: Any) -> torch.futures.Future:
    """The hook's work on one bucket once its arguments are checked (``bucket``: a ``GradBucket`` or
    an object with its methods): the engine of the bucket's model, the iteration's start at its first
    bucket and the end at its last."""
    engine = state._engine_for(bucket)
    if engine.mode is None:
        engine.begin(bucket)
    try:
        return engine.bucket(bucket)
    finally:
        if bucket.is_last():
            engine.end()
