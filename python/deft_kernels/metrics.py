"""The figures an operator watches, per step and per DDP bucket, from the DDP hook.

Wrap the hook once; every ``every``-th iteration gives one :class:`StepMetrics` to each sink::

    state = DeftState(sparsifier="deft", density=0.01)
    metrics = Metrics(state, sinks=[CsvSink("deft.csv"), JsonlSink("deft.jsonl")])
    ddp.register_comm_hook(state, metrics.hook)      # in place of deft_hook

A sink is any callable taking a :class:`StepMetrics` (a callback); :class:`CsvSink` and
:class:`JsonlSink` write files with the standard library alone; :class:`TensorBoardSink` writes
through a ``torch.utils.tensorboard.SummaryWriter``; in Lightning, ``self.log_dict(metrics.latest.scalars())``
(examples/metrics_lightning.py). Each rank records its own figures (sinks see this rank only).

**The figures** (every rank, every recorded iteration; per bucket and summed over the buckets):

- ``bytes_sent`` / ``bytes_received``: payload this rank put on the wire and got back: its indices
  (int32 below 2^31 elements, as sent) and the fp32 values it contributes, the other ranks' indices
  and the summed values
  (:class:`~deft_kernels.sparsifiers.StepStats`); in the warm-up, the fp32 bucket both ways. The
  step's small header and the plan are not counted.
- ``density_sent`` (global index set / elements) next to ``density_asked`` (the state's density).
- ``t_select`` (plan and selection) and ``t_comm`` (waiting for the collectives) in seconds, as the
  step driver times them (NaN where it does not: CUDA tensors, and the warm-up);
  ``exposed`` (step only): how long the last bucket's hook call held backward's end, i.e. the
  exchange time that did not overlap with backward.
- ``grad_norm`` (this rank's local gradient, before the exchange), ``residual_norm`` (the
  error-feedback residual after it) and ``residual_ratio`` = residual_norm / grad_norm.
- ``bin_imbalance`` (DEFT only, else NaN): the largest worker's selection load over the mean one,
  in the plan's cost model (1.0: perfectly balanced; :mod:`deft_kernels.planning`); per step, each
  worker's loads summed over the buckets, each bucket's bins rotated by its own turn (bucket ``i``
  is ``i`` steps ahead: a worker selects in a different bin in each bucket).
- ``phase``: ``"warmup"`` (dense all-reduce: iterations before ``state.warmup_steps``) or ``"sparse"``.

**Health bands.** :class:`Metrics` warns once (a ``RuntimeWarning``, then never again for that figure)
when a sparse step leaves either band:

- ``density_band`` (default ``(0.5, 2.0)``): density_sent / density_asked. DEFT sends exactly what
  is asked (ratio 1); Top-k's union grows with the workers, a threshold drifts: past either bound the
  exchange costs far more, or carries far less, than planned.
- ``max_residual_ratio`` (default ``3 / sqrt(density)``: 30 at d = 1%, 95 at d = 0.1%):
  residual_norm / grad_norm. With error feedback the residual holds what has not been sent yet and
  settles at some gradients' worth, more the lower the density: on 2 ranks here (DEFT, 300 steps)
  it stayed within 3-10 at d = 1% and 7-25 at d = 0.1% for a 75k-parameter MLP, 2-4 at d = 1% for
  a small CNN. A ratio that keeps growing past that means the updates fall behind the gradients
  (density too low for the model, a learning-rate or loss-scale problem): the early sign of trouble.

**Cost.** On recorded iterations the wrapper reads each bucket's gradient norm before the exchange,
and each residual's norm after it (one pass over the gradient each, and on CUDA one host
synchronisation per iteration); ``every=N`` records one iteration in ``N`` and costs nothing on the
others.
"""

import csv
import dataclasses
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ._integration import check_int, world
from torch.utils.weak import WeakIdKeyDictionary

from .hook import DeftState, deft_hook
from .planning import DeftPlan, bin_of

__all__ = ["Metrics", "StepMetrics", "BucketMetrics", "CsvSink", "JsonlSink", "TensorBoardSink"]

#: Default band of density_sent / density_asked (see the module docstring).
DENSITY_BAND = (0.5, 2.0)


@dataclasses.dataclass
class BucketMetrics:
    """One DDP bucket's figures in one iteration (see the module docstring for each)."""

    bucket: int  # DDP's bucket index
    numel: int  # elements in the bucket
    bytes_sent: int  # bytes this rank put on the wire for the bucket (indices and fp32 values)
    bytes_received: int  # bytes it got back (the other ranks' indices and the summed values)
    density_sent: float  # fraction of the bucket's elements sent (0.01 = 1%)
    t_select: float  # seconds: plan and selection (NaN where untimed: CUDA tensors, the warm-up)
    t_comm: float  # seconds waiting for the collectives (NaN where untimed)
    grad_norm: float  # L2 norm of this rank's gradient of the bucket, before the exchange
    residual_norm: float  # L2 norm of the bucket's error-feedback residual after the exchange
    residual_ratio: float  # residual_norm / grad_norm (a ratio; its band: the module docstring)
    bin_imbalance: float  # DEFT: the largest worker's selection load over the mean one (1.0: even); else NaN


@dataclasses.dataclass
class StepMetrics:
    """One iteration of one rank: the buckets' figures and their totals (norms: the norm of the
    concatenation; bin imbalance: of the loads summed over buckets)."""

    step: int  # the hook's iteration counter (state.iter) when the iteration began
    rank: int  # this rank in the state's process group
    phase: str  # "warmup" (dense all-reduce) or "sparse"
    density_asked: float  # the state's density (a fraction: 0.01 = 1%)
    numel: int  # elements in all the buckets
    bytes_sent: int  # bytes this rank put on the wire, summed over the buckets
    bytes_received: int  # bytes it got back, summed over the buckets
    density_sent: float  # elements sent / numel over all the buckets (a fraction)
    t_select: float  # seconds of plan and selection, summed over the buckets (NaN where untimed)
    t_comm: float  # seconds waiting for the collectives, summed over the buckets (NaN where untimed)
    exposed: float  # seconds the last bucket's hook call held the end of backward: exchange not overlapped
    grad_norm: float  # L2 norm of this rank's whole gradient, before the exchange
    residual_norm: float  # L2 norm of all the residuals after the exchange (NaN in the warm-up)
    residual_ratio: float  # residual_norm / grad_norm (NaN in the warm-up)
    bin_imbalance: float  # DEFT: max / mean selection load of the loads summed over the buckets; else NaN
    buckets: list[BucketMetrics]  # each bucket's figures, in bucket order

    #: The per-iteration figures, in the order CSV columns and scalars follow.
    FIGURES = ("numel", "bytes_sent", "bytes_received", "density_asked", "density_sent", "t_select", "t_comm",
               "exposed", "grad_norm", "residual_norm", "residual_ratio", "bin_imbalance")

    def scalars(self, prefix: str = "deft/") -> dict[str, float]:
        """Flat ``{name: value}`` for a logger: the totals as ``<prefix><figure>``, each bucket's as
        ``<prefix>bucket<i>/<figure>``, and ``<prefix>sparse`` (1.0 in the sparse phase, else 0.0);
        NaN figures are left out."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        out = {f"{prefix}sparse": float(self.phase == "sparse")}
        out.update({f"{prefix}{k}": float(v) for k in self.FIGURES if not _nan(v := getattr(self, k))})
        for b in self.buckets:
            out.update({f"{prefix}bucket{b.bucket}/{k}": float(v) for k in self.FIGURES
                        if hasattr(b, k) and not _nan(v := getattr(b, k))})
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per bucket and one for the totals (``bucket`` = ``"all"``), every column present."""
        head = {"step": self.step, "rank": self.rank, "phase": self.phase}
        rows = [dict(head, bucket="all", **{k: getattr(self, k) for k in self.FIGURES})]
        for b in self.buckets:
            values = {k: getattr(b, k, math.nan) for k in self.FIGURES}  # a bucket has no exposed time
            values["density_asked"] = self.density_asked
            rows.append(dict(head, bucket=b.bucket, **values))
        return rows

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as ``None``)."""
        return _json_ready(dataclasses.asdict(self))


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return None if _nan(value) else value


def _check_band(name: str, band: Any) -> tuple[float, float]:
    if (not isinstance(band, (tuple, list)) or len(band) != 2
            or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in band)):
        raise TypeError(f"{name} must be a pair of numbers (low, high), got {band!r}")
    low, high = float(band[0]), float(band[1])
    if not 0.0 <= low < high:
        raise ValueError(f"{name} must satisfy 0 <= low < high, got {band!r}")
    return low, high


def _norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _imbalance(loads: list[float]) -> float:
    """Largest load over the mean one; NaN without loads."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else math.nan


def _rank_loads(buckets: Iterable[tuple[list[float], int]], n: int) -> list[float]:
    """Each rank's selection load in one iteration, summed over the buckets: ``buckets`` holds each
    bucket's bin costs and its step's turn (``step_count + rotation`` when the step ran: bucket ``i``
    has ``rotation = i``), and in a bucket whose turn is ``t`` rank ``r`` selects in bin
    ``(t + r) % n`` (:func:`deft_kernels.planning.bin_of`)."""
    loads = [0.0] * n
    for costs, turn in buckets:
        for r in range(n):
            loads[r] += costs[bin_of(r, turn, n)]
    return loads


class Metrics:
    """Records the hook's figures (module docstring) and hands them to ``sinks``.

    Args:
        state: the ``DeftState`` registered with :meth:`hook`.
        sinks: callables, each called with every :class:`StepMetrics` (``CsvSink``, ``JsonlSink``,
            ``TensorBoardSink``, or any function).
        every: record one iteration in ``every`` (iterations whose counter is a multiple of it).
        density_band: ``(low, high)`` bounds on density_sent / density_asked.
        max_residual_ratio: bound on residual_norm / grad_norm (``None``: ``3 / sqrt(state.density)``).

    Attributes:
        latest: the latest :class:`StepMetrics` (``None`` before one).
        warned: the bands already warned about (``"density"``, ``"residual"``).
    """

    def __init__(self, state: DeftState, sinks: Iterable[Callable[[StepMetrics], Any]] = (), *, every: int = 1,
                 density_band: tuple[float, float] = DENSITY_BAND,
                 max_residual_ratio: float | None = None) -> None:
        if not isinstance(state, DeftState):
            raise TypeError(f"state must be a DeftState, got {type(state).__name__}")
        if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
            raise TypeError(f"sinks must be an iterable of callables, got {type(sinks).__name__}")
        self.sinks = list(sinks)
        for i, sink in enumerate(self.sinks):
            if not callable(sink):
                raise TypeError(f"sinks[{i}] must be callable (called with each StepMetrics), got {type(sink).__name__}")
        self.state = state
        self.every = check_int("every", every, 1)
        self.density_band = _check_band("density_band", density_band)
        if max_residual_ratio is None:
            max_residual_ratio = 3 / math.sqrt(state.density)
        if isinstance(max_residual_ratio, bool) or not isinstance(max_residual_ratio, numbers.Real):
            raise TypeError(f"max_residual_ratio must be a number or None, got {type(max_residual_ratio).__name__}")
        if not max_residual_ratio > 0:
            raise ValueError(f"max_residual_ratio must be > 0, got {max_residual_ratio!r}")
        self.max_residual_ratio = float(max_residual_ratio)
        self.latest: StepMetrics | None = None
        self.warned: set[str] = set()
        self._grads: dict[int, tuple[int, torch.Tensor | None]] | None = None  # None: no iteration begun
        self._step = 0
        self._params: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the DDP model's parameters, once seen
        self._provisional = False  # this iteration is a new DDP model's first: its buckets are not the rebuilt ones

    def hook(self, state: DeftState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """``deft_hook`` that also records: register with ``ddp.register_comm_hook(state, metrics.hook)``."""
        if state is not self.state:
            raise ValueError("state must be the DeftState this Metrics was made for (register it with "
                             "ddp.register_comm_hook(metrics.state, metrics.hook))")
        if self._grads is None:
            self._grads, self._step = {}, state.iter
            params = bucket.parameters() if isinstance(bucket, dist.GradBucket) else []
            self._provisional = bool(params) and params[0] not in self._params
            if self._provisional:
                self._params = WeakIdKeyDictionary()
        if self._provisional and isinstance(bucket, dist.GradBucket):
            self._params.update((p, None) for p in bucket.parameters())
        recording = self._step % self.every == 0
        last = isinstance(bucket, dist.GradBucket) and bucket.is_last()
        try:
            if recording and isinstance(bucket, dist.GradBucket):
                buffer = bucket.buffer()
                self._grads[bucket.index()] = (buffer.numel(), _norm(buffer) if buffer.is_floating_point() else None)
            start = time.perf_counter()
            fut = deft_hook(state, bucket)
            exposed = time.perf_counter() - start
            if last and recording:
                self._record(exposed)
            return fut
        finally:
            if last:
                self._grads = None

    def _record(self, exposed: float) -> None:
        state, grads = self.state, self._grads
        rank, n = world(state.process_group)
        sparse = self._step >= state.warmup_steps and bool(state.last_stats)
        grad_sq = sum(float(g) ** 2 for _, g in grads.values())
        buckets, bins, residual_sq = [], [], 0.0
        if sparse:
            sparsifiers = state.sparsifiers
            for index in sorted(state.last_stats):
                st, sp = state.last_stats[index], sparsifiers[index]
                # A resumed model's first iteration: the hook regroups the provisional buckets into the
                # saved ones, whose local gradients were never one buffer here.
                numel, g = grads.get(index, (-1, None)) if not self._provisional else (-1, None)
                g = float(g) if numel == st.numel else math.nan
                r = float(_norm(sp.residual)) if sp.residual is not None else math.nan
                residual_sq += r * r if not _nan(r) else 0.0
                plan, imbalance = state.last_plans.get(index), math.nan
                if isinstance(plan, DeftPlan):
                    costs = plan.bin_costs()
                    # the turn of the step just run (the driver's step_count + rotation, before it advanced)
                    bins.append((costs, sp.step_count - 1 + sp.rotation))
                    imbalance = _imbalance(costs)
                buckets.append(BucketMetrics(index, st.numel, st.bytes_sent, st.bytes_received, st.density, st.t_select,
                                             st.t_comm, g, r, _ratio(r, g), imbalance))
        else:
            for index in sorted(grads):
                numel, g = grads[index]
                buckets.append(BucketMetrics(index, numel, 4 * numel, 4 * numel, 1.0, math.nan, math.nan,
                                             float(g), math.nan, math.nan, math.nan))
        numel = sum(b.numel for b in buckets)
        grad_norm = math.sqrt(grad_sq)
        residual_norm = math.sqrt(residual_sq) if sparse else math.nan
        sent = sum(b.density_sent * b.numel for b in buckets)
        record = StepMetrics(
            step=self._step, rank=rank, phase="sparse" if sparse else "warmup", density_asked=state.density,
            numel=numel, bytes_sent=sum(b.bytes_sent for b in buckets),
            bytes_received=sum(b.bytes_received for b in buckets),
            density_sent=sent / numel if numel else math.nan,
            t_select=sum(b.t_select for b in buckets), t_comm=sum(b.t_comm for b in buckets), exposed=exposed,
            grad_norm=grad_norm, residual_norm=residual_norm, residual_ratio=_ratio(residual_norm, grad_norm),
            bin_imbalance=_imbalance(_rank_loads(bins, n)) if bins else math.nan,
            buckets=buckets)
        if sparse:
            self._check_bands(record)
        self.latest = record
        for sink in self.sinks:
            sink(record)

    def _check_bands(self, m: StepMetrics) -> None:
        low, high = self.density_band
        ratio = m.density_sent / m.density_asked
        if "density" not in self.warned and not low <= ratio <= high:
            self.warned.add("density")
            warnings.warn(f"deft_kernels.metrics: rank {m.rank} step {m.step}: density sent {m.density_sent:.4g} is "
                          f"{ratio:.3g}x the density asked {m.density_asked:.4g}, outside the band [{low:g}, {high:g}]x "
                          "(warned once)", RuntimeWarning, stacklevel=2)
        if "residual" not in self.warned and m.residual_ratio > self.max_residual_ratio:
            self.warned.add("residual")
            warnings.warn(f"deft_kernels.metrics: rank {m.rank} step {m.step}: residual norm {m.residual_norm:.4g} is "
                          f"{m.residual_ratio:.3g}x the gradient norm {m.grad_norm:.4g}, above {self.max_residual_ratio:g}: "
                          "the updates fall behind the gradients (warned once)", RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Close every sink that has a ``close()``."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


class CsvSink:
    """Appends :meth:`StepMetrics.rows` to a CSV file (header written when the file is new or empty),
    flushed after every iteration, so a restarted process (torchrun) continues the same file and a
    killed one loses nothing already recorded. Use one file per rank."""

    COLUMNS = ("step", "rank", "phase", "bucket") + StepMetrics.FIGURES

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = _check_path(path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.COLUMNS)
        if self._file.tell() == 0:
            self._writer.writeheader()

    def __call__(self, m: StepMetrics) -> None:
        self._writer.writerows(m.rows())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class JsonlSink:
    """Appends one JSON line per iteration (:meth:`StepMetrics.to_json`, buckets nested), flushed after
    each; as :class:`CsvSink`, restarts continue the file. Use one file per rank."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = _check_path(path)
        self._file = open(self.path, "a")

    def __call__(self, m: StepMetrics) -> None:
        self._file.write(json.dumps(m.to_json()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Writes :meth:`StepMetrics.scalars` through ``writer.add_scalar(name, value, step)`` (a
    ``torch.utils.tensorboard.SummaryWriter``, or anything with that method), e.g. one writer per
    rank with ``log_dir=f"runs/rank{rank}"``. ``close()`` closes the writer."""

    def __init__(self, writer: Any, prefix: str = "deft/") -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar(name, value, step) (a SummaryWriter), got {type(writer).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.writer, self.prefix = writer, prefix

    def __call__(self, m: StepMetrics) -> None:
        for name, value in m.scalars(self.prefix).items():
            self.writer.add_scalar(name, value, m.step)

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if callable(close):
            close()
