"""Host-side planning of a DEFT step: pure functions of sizes and norms, no communication.

The terms, defined step by step in ``docs/algorithm.md``:

- **budget**: ``k = int(d * N)`` elements per step, at least 1 for a non-empty vector
  (:func:`budget`; every sparsifier's ``Sparsifier.budget``).
- **fragments** (step 2): parameters in order; a tensor with more than ``N / n`` elements is cut
  into ``n`` contiguous fragments whose sizes differ by at most one, a smaller tensor is one
  fragment. Fixed at the first step.
- **local k by norm** (step 4): the budget shared out in proportion to fragment norms, visiting
  fragments by descending norm (equal norms: lower fragment id first), each share clamped to
  ``[1, size_f]``; what the floors leave unassigned is topped up in the same order.
- **common part** (step 5): fragments with ``k_f == size_f``, sent whole by everyone, no selection.
- **bins** (step 5): the other fragments with ``k_f > 0``, packed greedily into ``n`` bins by a
  cost model, largest cost first (ties: lower fragment id), each into the lightest bin (ties: the
  lowest bin id), i.e. LPT.
- **rotation** (step 6): worker ``rank`` takes bin ``(step + rank) % n``.
- **partitions** (MiCRO, not DEFT): ``n`` contiguous, nearly equal slices of the flat vector,
  ignoring parameter boundaries; rotated like bins.

Everything here runs on CPU tensors and Python numbers; plans are small (one entry per fragment).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _C

__all__ = ["budget", "offsets_of", "fragment_sizes", "fragment_offsets", "partition_offsets", "local_k",
           "COST_MODELS", "DEFAULT_COST_MODEL", "cost_size_log_k", "cost_size",
           "pack_bins", "common_fragments", "bin_of", "imbalance", "DeftPlan", "make_plan"]

CostModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def budget(density: float, numel: int) -> int:
    """The number of elements a step sends in total: ``int(density * numel)``, but at least 1 when
    ``numel > 0`` (0 for an empty vector). Without the floor a small vector (a small DDP bucket, a
    tiny model at a low density) would send nothing, step after step, while its residual grows
    without bound; raising instead would make small buckets unusable (docs/algorithm.md, "The
    budget")."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    return max(1, int(density * numel)) if numel else 0


def offsets_of(sizes) -> list[int]:
    """Prefix sums ``[0, s0, s0+s1, ...]`` of a list of sizes (or of ``(name, size)`` pairs)."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + (s[1] if isinstance(s, tuple) else s))
    return out


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    try:
        out = [int(s) for s in sizes]
    except (TypeError, ValueError):
        raise TypeError(f"sizes must be a sequence of ints, got {sizes!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"sizes must be non-negative, got {min(out)}")
    return out


def _check_world_size(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"world_size must be a positive int, got {n!r}")
    return n


def fragment_sizes(sizes: Sequence[int], world_size: int) -> list[int]:
    """Fragment sizes for ``world_size`` workers (step 2), in parameter order."""
    sizes = _check_sizes(sizes)
    n = _check_world_size(world_size)
    total = sum(sizes)
    out: list[int] = []
    for s in sizes:
        if s * n > total and n > 1:  # s > N / n, without rounding
            q, r = divmod(s, n)
            out.extend(q + 1 if i < r else q for i in range(n))
        else:
            out.append(s)
    return out


def fragment_offsets(sizes: Sequence[int], world_size: int) -> torch.Tensor:
    """int64 offsets (length F + 1) of :func:`fragment_sizes` over the flat vector."""
    frag = fragment_sizes(sizes, world_size)
    out = torch.zeros(len(frag) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(frag, dtype=torch.int64).cumsum(0) if frag else out[1:]
    return out


def partition_offsets(numel: int, world_size: int) -> torch.Tensor:
    """int64 offsets (length ``world_size + 1``) of ``world_size`` contiguous slices of a flat
    vector of ``numel`` elements whose sizes differ by at most one (larger ones first)."""
    n = _check_world_size(world_size)
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    q, r = divmod(numel, n)
    sizes = torch.tensor([q + 1 if p < r else q for p in range(n)], dtype=torch.int64)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


def local_k(norms: torch.Tensor, sizes: torch.Tensor, k_total: int) -> torch.Tensor:
    """Per-fragment k (int64, CPU) sharing ``k_total`` by norm (docs/algorithm.md, step 4).

    ``norms`` (float) and ``sizes`` (int) have one entry per fragment. Fragments are visited by
    descending norm (ties: lower id); each takes ``int(remaining_k * norm_f / remaining_norm)``
    (at most ``remaining_k``), clamped to ``[1, size_f]``, then a second pass in the same order
    hands what the floors left unassigned to the fragments with room. So ``sum(k)`` is
    ``min(k_total, N)`` plus the fragments that got their floor of 1 after the budget ran out (the
    bound is proved in docs/algorithm.md); at ``k_total = N`` every fragment is whole.

    NaN policy (the ops' policy carried to the plan): a fragment whose norm is NaN or inf is sent
    whole (``k_f = size_f``), so the non-finite values reach the averaged gradient where the user's
    check sees them; the rest of the budget is shared among the finite fragments as usual. Raising
    instead would stop only the leader and leave the other workers waiting in the broadcast.

    Runs in C++ (``_C.plan_local_k``: it is on every step's critical path);
    :func:`deft_kernels.reference.local_k` is the same rule in plain Python, and the tests check
    that both give identical results."""
    _check_local_k_args(norms, sizes, k_total)
    return _C.plan_local_k(norms.detach(), sizes, k_total)


def _check_local_k_args(norms, sizes, k_total) -> None:
    if not isinstance(norms, torch.Tensor) or not norms.is_floating_point() or norms.dim() != 1:
        raise TypeError("norms must be a 1-D float tensor")
    if not isinstance(sizes, torch.Tensor) or sizes.dtype != torch.int64 or sizes.shape != norms.shape:
        raise TypeError(f"sizes must be an int64 tensor shaped like norms {tuple(norms.shape)}")
    if not isinstance(k_total, int) or isinstance(k_total, bool) or k_total < 0:
        raise ValueError(f"k_total must be a non-negative int, got {k_total!r}")


def _check_sizes_and_k(sizes, k) -> None:
    if not isinstance(sizes, torch.Tensor) or sizes.dtype != torch.int64 or sizes.dim() != 1:
        raise TypeError("sizes must be a 1-D int64 tensor (one entry per fragment)")
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.shape != sizes.shape:
        raise TypeError(f"k must be an int64 tensor shaped like sizes {tuple(sizes.shape)}")


def cost_size_log_k(sizes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The paper's cost: ``size * log2(k)`` when ``k > 1``, else ``size`` (a top-k over the fragment)."""
    _check_sizes_and_k(sizes, k)
    s, kk = sizes.double(), k.double()
    return torch.where(kk > 1, s * torch.log2(kk.clamp(min=1)), s)


def cost_size(sizes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Linear cost: the size (a radix select reads each element a bounded number of times)."""
    _check_sizes_and_k(sizes, k)
    return sizes.double()


COST_MODELS: dict[str, CostModel] = {"size_log_k": cost_size_log_k, "size": cost_size}

#: ``size``, not the paper's ``size * log2(k)``: measured with our radix-select kernel on ResNet-50
#: (bench/cost_models.py, bench/results/cost_models_resnet50_cpu.txt) the two balance the measured
#: bin times alike up to n = 16, and at n = 32 ``size_log_k`` cannot balance even its own cost (a
#: fragment with a large k outweighs a bin) and its slowest bin is 9% slower.
DEFAULT_COST_MODEL = "size"


def common_fragments(k: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Ids of the common part: fragments with ``k_f == size_f`` (and non-empty), sent whole."""
    _check_sizes_and_k(sizes, k)
    return torch.nonzero((k == sizes) & (sizes > 0)).flatten()


def pack_bins(costs: torch.Tensor, world_size: int, candidates: torch.Tensor) -> list[torch.Tensor]:
    """LPT: the ``candidates`` (fragment ids) by descending cost (ties: lower id) each into the
    lightest of ``world_size`` bins (ties: lowest bin id). Returns the bins' fragment ids, sorted.

    Runs in C++; :func:`deft_kernels.reference.pack_bins` is the plain-Python twin the tests hold
    it to."""
    n = _check_world_size(world_size)
    if not isinstance(costs, torch.Tensor) or costs.dim() != 1 or costs.dtype == torch.bool or costs.is_complex():
        raise TypeError("costs must be a 1-D real tensor (one entry per fragment)")
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.int64 or candidates.dim() != 1:
        raise TypeError("candidates must be a 1-D int64 tensor of fragment ids")
    # Costs must be finite (negative is allowed: fitted cost models can dip below 0); candidates
    # distinct and in range. Checked, and packed, in C++ (_C.plan_pack_bins).
    return _C.plan_pack_bins(costs, n, candidates)


def bin_of(rank: int, step: int, world_size: int) -> int:
    """Rotation: the bin worker ``rank`` selects in at ``step``."""
    n = _check_world_size(world_size)
    if not 0 <= rank < n:
        raise ValueError(f"rank must lie in [0, {n}), got {rank}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return (step + rank) % n


def imbalance(loads: Sequence[float]) -> float:
    """Max over mean of per-bin loads (1.0 is perfect balance; 1.0 for all-zero loads)."""
    loads = [float(x) for x in loads]
    if not loads:
        raise ValueError("loads must not be empty")
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


@dataclass
class DeftPlan:
    """What all workers of a step agree on (built by the leader, broadcast): CPU tensors only."""

    sizes: torch.Tensor  # int64 per fragment
    k: torch.Tensor  # int64 per fragment
    bins: list[torch.Tensor]  # world_size tensors of fragment ids, ascending
    common: torch.Tensor  # fragment ids of the common part
    costs: torch.Tensor  # float64 model cost per fragment

    @property
    def world_size(self) -> int:
        """The number of workers (bins) the plan was made for."""
        return len(self.bins)

    def bin_of(self, rank: int, step: int) -> int:
        """The bin worker ``rank`` selects in at ``step`` (rotation, :func:`bin_of`)."""
        return bin_of(rank, step, self.world_size)

    def fragments_of(self, rank: int, step: int) -> torch.Tensor:
        """The fragment ids (ascending, int64, CPU) worker ``rank`` selects in at ``step``."""
        return self.bins[self.bin_of(rank, step)]

    def bin_costs(self) -> list[float]:
        """Model cost of each bin."""
        return [float(self.costs[b].sum()) for b in self.bins]

    def common_indices(self) -> torch.Tensor:
        """Every flat index of the common part, ascending (int64, CPU)."""
        offsets = torch.cat([self.sizes.new_zeros(1), self.sizes.cumsum(0)])
        lo, lengths = offsets[self.common], self.sizes[self.common]
        starts = torch.repeat_interleave(lo - lengths.cumsum(0) + lengths, lengths)
        return starts + torch.arange(int(lengths.sum()), dtype=torch.int64)

    @property
    def sent_count(self) -> int:
        """Size of the global index set this plan yields: ``sum(k)``."""
        return int(self.k.sum())


def make_plan(norms: torch.Tensor, sizes: torch.Tensor, k_total: int, world_size: int,
              cost_model: str | CostModel = DEFAULT_COST_MODEL) -> DeftPlan:
    """Local k by norm, the common part and LPT bins (docs/algorithm.md, steps 4 and 5).

    With a named cost model the whole plan is made in one C++ call (``_C.plan_make``): it is on
    every step's critical path, where a few hundred fragments cost about 1 ms of Python and torch
    calls. A callable cost model goes through :func:`local_k`, the model and :func:`pack_bins`."""
    if not (cost_model in COST_MODELS if isinstance(cost_model, str) else callable(cost_model)):
        raise ValueError(f"cost_model must be one of {sorted(COST_MODELS)} or a callable, got {cost_model!r}")
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 1 or sizes.is_floating_point():
        raise TypeError("sizes must be a 1-D integer tensor (one entry per fragment)")
    sizes = sizes.to("cpu", torch.int64)
    n = _check_world_size(world_size)
    if isinstance(cost_model, str):
        _check_local_k_args(norms, sizes, k_total)
        k, common, costs, bins = _C.plan_make(norms.detach(), sizes, k_total, n, cost_model)
        return DeftPlan(sizes=sizes, k=k, bins=bins, common=common, costs=costs)
    k = local_k(norms, sizes, k_total)
    costs = cost_model(sizes, k)
    if not isinstance(costs, torch.Tensor) or costs.shape != sizes.shape or costs.dtype == torch.bool:
        raise TypeError(f"cost_model must return a real tensor shaped like sizes {tuple(sizes.shape)}")
    costs = costs.double()
    selectable = torch.nonzero((k > 0) & (k < sizes)).flatten()
    return DeftPlan(sizes=sizes, k=k, bins=pack_bins(costs, n, selectable), common=common_fragments(k, sizes),
                    costs=costs)
