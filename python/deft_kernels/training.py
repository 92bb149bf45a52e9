"""Gradient sparsification in a training loop without DDP::

    sparsifier = deft_kernels.GradientSparsifier(model, sparsifier="deft", density=0.01)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        sparsifier.step()          # p.grad <- averaged sparse gradient, error feedback kept
        optimizer.step()

``GradientSparsifier.step`` flattens the gradients of the parameters that require grad into one
persistent flat buffer per dtype, runs the step driver on it (:func:`deft_kernels.driver.step`, with
``sizes`` = the parameter sizes, so DEFT's fragments follow the parameter boundaries; in the warm-up
:func:`deft_kernels.driver.mean`, the dense path), and writes the result, the mean over the workers
at the sent indices and zero elsewhere, back into every ``p.grad``. Each worker calls it at
the same point of every iteration; it communicates in ``group`` (the default group when
torch.distributed is initialised; alone, without communication, when it is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

import torch
import torch.distributed as dist

from . import driver
from ._integration import (CompressionLog, SparsifierSpec, check_density, check_grad_scaler, check_group, check_int,
                           check_checkpoint, check_options, check_sparsifier_spec, loss_scale, make_sparsifier,
                           world)
from .sparsifiers.base import Sparsifier, StepStats

__all__ = ["GradientSparsifier"]


@dataclass
class _DtypeGroup:
    """The parameters of one dtype, their flat gradient buffer and their sparsifier."""

    params: list[torch.Tensor]
    sizes: list[int]
    flat: torch.Tensor
    sparsifier: Sparsifier


def _trainable_parameters(model_or_params: Any) -> list[torch.Tensor]:
    if isinstance(model_or_params, torch.nn.Module):
        candidates = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor) or not isinstance(model_or_params, Iterable):
        raise TypeError("model_or_params must be a torch.nn.Module or an iterable of tensors, got "
                        f"{type(model_or_params).__name__}")
    else:
        candidates = list(model_or_params)
        for i, p in enumerate(candidates):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"model_or_params[{i}] must be a torch.Tensor, got {type(p).__name__}")
    params = [p for p in candidates if p.requires_grad]
    if not params:
        raise ValueError("model_or_params has no parameters that require grad")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("model_or_params lists a parameter more than once")
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise ValueError(f"model_or_params has parameters on several devices ({', '.join(devices)}); use one "
                         "GradientSparsifier per device")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"model_or_params: trainable parameter {i} has dtype {p.dtype}, not a floating type")
    return params


class GradientSparsifier:
    """Sparsified, averaged gradients for a custom training loop: call ``step()`` after
    ``loss.backward()`` and before ``optimizer.step()`` on every worker.

    Args:
        model_or_params: a module (its parameters that require grad) or an iterable of tensors, in
            the order to lay them end to end. All on one device. Parameters of different dtypes are
            grouped by dtype (in order of first appearance), each group with its own sparsifier and
            residual and its own budget ``max(1, int(density * group size))``; one dtype is one group.
        sparsifier: a name from ``deft_kernels.sparsifiers.SPARSIFIERS`` or a factory
            ``f(density, **sparsifier_kwargs)`` returning a ``Sparsifier``.
        density: fraction of the elements sent per step, in (0, 1] (0.01 is 1%; 1 sends every
            element, as ``"dense"`` does, and warns).
        group: process group; ``None``: the default group (or no communication when
            torch.distributed is not initialised).
        warmup_steps: steps of dense averaged all-reduce before sparsification starts (default 10,
            as ``DeftState``'s: the same training whichever of the two runs it). 0 is allowed here
            (``DeftState`` needs at least 1: DDP rebuilds its buckets after its first iteration; this
            class has no buckets to rebuild).
        grad_scaler: the loop's ``torch.amp.GradScaler``, if any: call ``step()`` right after
            ``scaler.scale(loss).backward()``; the residuals then hold unscaled gradients and a step
            the scaler skips (a gradient that is not finite) leaves them as they were (see
            ``deft_kernels.DeftState``).
        **sparsifier_kwargs: passed to the sparsifier (``residual_dtype=`` chooses the residual's
            dtype: by default fp32 for 16-bit gradients); a keyword it does not take raises a
            ``TypeError`` naming the argument it resembles.

    A parameter whose ``grad`` is ``None`` at ``step()`` (unused in this iteration on this worker)
    counts as a zero gradient: every worker must enter the collectives with the same layout, and the
    parameter's residual carries on. It receives the averaged gradient like the others, so its
    ``grad`` is not ``None`` afterwards.

    Attributes:
        step_count: ``step()`` calls so far (warm-up included).
        last_stats: the ``StepStats`` of the latest step, one per dtype group (empty in the warm-up).
    """

    def __init__(self, model_or_params: Union[torch.nn.Module, Iterable[torch.Tensor]],
                 sparsifier: SparsifierSpec = "deft", density: float = 0.01,
                 group: dist.ProcessGroup | None = None, warmup_steps: int = 10, *,
                 grad_scaler: torch.amp.GradScaler | None = None, **sparsifier_kwargs: Any) -> None:
        params = _trainable_parameters(model_or_params)
        self.grad_scaler = check_grad_scaler(grad_scaler)
        check_group("group", group)
        spec = check_sparsifier_spec(sparsifier)
        self.density = check_density(density, spec)
        check_options(spec, sparsifier_kwargs, GradientSparsifier)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.group = group
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self._groups = [
            _DtypeGroup(ps, [p.numel() for p in ps],
                        torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device),
                        make_sparsifier(spec, self.density, sparsifier_kwargs))
            for dtype, ps in by_dtype.items()
        ]
        self.step_count = 0
        self.last_stats: list[StepStats] = []
        self._log = CompressionLog()

    def step(self) -> list[StepStats]:
        """Replace every ``p.grad`` by the averaged sparse gradient (dense average in the warm-up);
        returns ``last_stats``."""
        sparse = self.step_count >= self.warmup_steps
        scale = loss_scale(self.grad_scaler) if sparse else None
        stats, steps = [], []
        for g in self._groups:
            for p, view in zip(g.params, g.flat.split(g.sizes)):
                if p.grad is None:
                    view.zero_()
                elif p.grad.is_sparse:
                    raise ValueError("GradientSparsifier needs dense gradients; a parameter has a sparse grad "
                                     "(e.g. nn.Embedding(sparse=True))")
                else:
                    view.copy_(p.grad.reshape(-1))
            if sparse:
                result = driver.run_step(g.sparsifier, g.flat, sizes=g.sizes, group=self.group, loss_scale=scale,
                                         commit_now=False)
                out = result.out
                stats.append(result.stats)
                steps.append((g.sparsifier, result))
            else:
                out = driver.mean(g.flat, self.group)
            for p, o in zip(g.params, out.split(g.sizes)):
                if p.grad is None:
                    p.grad = o.view_as(p).clone()
                else:
                    p.grad.copy_(o.view_as(p))
        if scale is not None:  # all dtype groups or none: the scaler skips the whole optimizer step
            driver.commit(steps)
        self.step_count += 1
        self.last_stats = stats
        if sparse:
            self._log.record(stats)
        return stats

    @property
    def sparsifiers(self) -> list[Sparsifier]:
        """One ``Sparsifier`` per dtype group (in order of first appearance), each holding its residual."""
        return [g.sparsifier for g in self._groups]

    def compression_stats(self) -> dict[str, float]:
        """Totals over the sparse steps of this worker (see ``deft_kernels.hook.DeftState.compression_stats``)."""
        return self._log.summary()

    def state_dict(self) -> dict[str, Any]:
        """This worker's residuals and counter; with several workers each saves its own file."""
        rank, n = world(self.group)
        for g in self._groups:
            driver.settle(g.sparsifier)  # the latest step's status read (and raised) before it is saved
        return {"step_count": self.step_count, "rank": rank, "world_size": n, "density": self.density,
                "groups": [{"dtype": str(g.flat.dtype), "sizes": list(g.sizes),
                            "sparsifier": g.sparsifier.state_dict()} for g in self._groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned on this worker, for the same parameters."""
        if not isinstance(state_dict, dict) or not {"step_count", "rank", "world_size", "groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict returned by GradientSparsifier.state_dict()")
        check_checkpoint(state_dict, self.group, self.density)
        layout = [(str(g.flat.dtype), list(g.sizes)) for g in self._groups]
        saved = [(s["dtype"], list(s["sizes"])) for s in state_dict["groups"]]
        if saved != layout:
            raise ValueError("state_dict was saved for other parameters (dtypes and sizes differ from this "
                             "GradientSparsifier's)")
        for g, s in zip(self._groups, state_dict["groups"]):
            g.sparsifier.load_state_dict(s["sparsifier"])
            g.sparsifier.to(g.flat.device)  # where this worker's gradients are, whatever the file was mapped to
        self.step_count = int(state_dict["step_count"])
