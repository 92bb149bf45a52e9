"""The step driver: one distributed sparsification step, written once, run three ways.

:mod:`deft_kernels.sparsifiers` hold the algorithms (plan, select, what they keep); this package
runs their step. The step is one generator (:func:`step_program`, in
:mod:`~deft_kernels.driver.program`, which explains the phases, the header, the failure protocol,
unused tensors, the numeric rule and the sync contract) that yields collective requests
(:mod:`~deft_kernels.driver.collectives`); what carries them out is chosen by the caller:

- :func:`step`: one worker's step over ``torch.distributed`` (gloo or NCCL), blocking; without an
  initialised process group, a world of one. ``GradientSparsifier`` uses it.

The layers point one way: :mod:`deft_kernels.sparsifiers` (the algorithms) import no driver; the
driver imports them; the hook and ``GradientSparsifier`` import the driver (tests/test_layers.py).
- :class:`ExchangeQueue`: steps chained on the collectives' futures, one at a time in submission
  order; the DDP hook (:mod:`deft_kernels.hook`) uses it, so the exchange overlaps the rest of
  backward.
- :func:`simulate_step`: ``n`` ranks in one process, in lockstep; :func:`deft_kernels.simulate.simulate`
  (the tests' oracle) and the worker-count benchmark use it.

:func:`mean` is the dense path alone (fp32 sum divided by ``n``, one rounding): the warm-up steps.
docs/exchange.md describes the exchange in full; docs/algorithm.md the algorithms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..sparsifiers.base import Sparsifier, StepStats
from .collectives import (AllGather, AllReduce, Broadcast, ExchangeQueue, GatherProposals, TorchCollectives,
                          run_blocking, run_lockstep)
from .program import (CAUSES, HEADER_DTYPE, HEADER_FIELDS, INT32_INDEX_LIMIT, PLAN_STATUS_SLOTS, SETUP_ELEMENTS, Laps,
                      Shape, StepResult, Wire, commit, header_elements, index_dtype, mean_of_sum, mean_program,
                      plan_wire_elements, settle, shape_of, step_program, tail_elements, wire)

__all__ = ["step", "run_step", "mean", "simulate_step", "step_program", "mean_program", "settle", "commit",
           "StepResult", "Laps", "Shape", "shape_of", "wire", "Wire", "CAUSES", "HEADER_FIELDS", "HEADER_DTYPE",
           "PLAN_STATUS_SLOTS", "INT32_INDEX_LIMIT", "SETUP_ELEMENTS", "header_elements", "plan_wire_elements",
           "index_dtype", "tail_elements",
           "ExchangeQueue", "TorchCollectives", "run_blocking", "run_lockstep", "mean_of_sum",
           "AllGather", "AllReduce", "Broadcast", "GatherProposals"]


def collectives_for(group: dist.ProcessGroup | None, tensor: Any) -> TorchCollectives | None:
    """The torch.distributed collectives of ``group`` (``None``: the default group), or ``None`` for
    a world of one when torch.distributed is not initialised; checks that ``tensor`` can travel on
    the group's backend."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    comm = TorchCollectives(group)
    if comm.world_size > 1 and isinstance(tensor, torch.Tensor) and tensor.device.type != "cuda" \
            and dist.get_backend(group) == "nccl":
        raise ValueError(f"grad is on {tensor.device} but the process group's backend is nccl, which "
                         "needs CUDA tensors; use a gloo group for CPU gradients")
    return comm


def _run(make_program: Callable[[int, int], Any], group, tensor) -> Any:
    comm = collectives_for(group, tensor)
    if comm is None:
        return run_lockstep([make_program(0, 1)])[0]
    return run_blocking(make_program(comm.rank, comm.world_size), comm)


def step(sparsifier: Sparsifier, grad: torch.Tensor, *, sizes: Sequence[int] | None = None,
         group: dist.ProcessGroup | None = None, laps: Laps | None = None,
         loss_scale: float | None = None) -> tuple[torch.Tensor, StepStats]:
    """One step on this worker: error feedback, plan, selection and exchange.

    ``grad`` is this worker's local flat 1-D gradient (fp32/bf16/fp16), not divided by the world
    size; ``sizes`` are the sizes of the parameter tensors laid end to end in it (default: one
    tensor), from which fragments are cut at the first step. ``group`` is the process group
    (default: the default group when ``torch.distributed`` is initialised, else a world of one with
    no communication). Returns a new tensor like ``grad``, zero except at the global index set,
    where it holds the mean over workers of their accumulated gradient ``a``, and the step's
    :class:`StepStats`, timed by ``laps`` (default: the host clock on CPU tensors, untimed on CUDA).
    The residual keeps ``a`` minus what was sent. ``loss_scale``: the factor ``grad`` carries (see
    :func:`step_program`; ``GradientSparsifier(grad_scaler=...)`` passes it).
    """
    result = run_step(sparsifier, grad, sizes=sizes, group=group, laps=laps, loss_scale=loss_scale)
    return result.out, result.stats


def run_step(sparsifier: Sparsifier, grad: torch.Tensor, *, sizes: Sequence[int] | None = None,
             group: dist.ProcessGroup | None = None, laps: Laps | None = None,
             loss_scale: float | None = None, commit_now: bool = True) -> StepResult:
    """:func:`step`, returning the whole :class:`StepResult` (``skipped`` among it). A loss-scaled
    step is committed at once (:func:`commit`: one host read), unless ``commit_now=False``: the
    caller then commits it together with the iteration's other steps."""
    result = _run(lambda rank, n: step_program(sparsifier, grad, sizes=sizes, rank=rank, world_size=n, laps=laps,
                                               loss_scale=loss_scale), group, grad)
    if loss_scale is not None and commit_now:
        commit([(sparsifier, result)])
    return result


def mean(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The mean of ``tensor`` over the workers of ``group`` in a new tensor, by the package's one
    numeric rule (fp32 sum, divided by ``n`` in fp32, one rounding); world of one: a copy."""
    return _run(lambda rank, n: mean_program(tensor, rank=rank, world_size=n), group, tensor).out


def simulate_step(sparsifiers: Sequence[Sparsifier], grads: Sequence[torch.Tensor], *,
                  sizes: Sequence[int] | None = None, laps: Callable[[int], Laps] | None = None,
                  keep_accumulated: bool = False, finish: Callable[[int, StepResult], Any] | None = None) -> list[Any]:
    """One step of ``n = len(sparsifiers)`` ranks in this process, rank ``r`` with ``sparsifiers[r]``
    (each its own instance: its state is that rank's) on ``grads[r]``. ``laps(rank)`` gives each
    rank's timer (default: untimed); ``finish(rank, result)`` maps each rank's :class:`StepResult`
    as soon as it is done (to drop what is not kept). Returns the per-rank results."""
    n = len(sparsifiers)
    if len(grads) != n:
        raise ValueError(f"grads must hold one gradient per rank ({n}), got {len(grads)}")
    if len({id(s) for s in sparsifiers}) != n:
        raise ValueError("every simulated rank needs its own sparsifier instance")
    programs = [step_program(sp, g, sizes=sizes, rank=r, world_size=n,
                             laps=Laps(None) if laps is None else laps(r), keep_accumulated=keep_accumulated)
                for r, (sp, g) in enumerate(zip(sparsifiers, grads))]
    return run_lockstep(programs, finish)
