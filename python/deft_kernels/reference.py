"""Plain-PyTorch reference of every op: the oracle of the test suite.

Written for clarity, not speed (per-fragment Python loops, full sorts). Each function has the
same signature and the same semantics as its op in :mod:`deft_kernels.ops`, so tests compare them
bit for bit on indices and to fp32 rounding on norms.

Magnitude order (shared by every top-k in the package): the IEEE bit pattern of ``|x|`` read as an
unsigned integer. That is the numeric order of ``|x|`` for finite values and infinities, ranks
every NaN above ``+inf`` (a NaN gradient is always selected, so it reaches the averaged gradient
where the user's NaN check sees it, instead of hiding in the residual), and ties ``-0`` with
``+0``. Ties go to the lower index.
"""

from __future__ import annotations

import heapq
import math

import torch

__all__ = ["magnitude_key", "accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack", "sparse_unpack",
           "local_k", "pack_bins"]

_INT_VIEW = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.bfloat16: (torch.int16, 0x7FFF),
             torch.float16: (torch.int16, 0x7FFF)}


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """int64 key whose order is the package's magnitude order of ``x`` (see module docstring)."""
    int_dtype, mask = _INT_VIEW[x.dtype]
    return x.contiguous().view(int_dtype).to(torch.int64) & mask


def accumulate_norms(grad: torch.Tensor, residual: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``residual <- grad + residual`` (fp32 arithmetic, one rounding to the residual's dtype, which
    is the gradient's or float32 under a 16-bit gradient); returns the fp32 L2 norm of the updated
    residual over each fragment ``[offsets[f], offsets[f+1])``."""
    acc = (grad.float() + residual.float()).to(residual.dtype)
    residual.copy_(acc)
    sq = acc.float().square()
    bounds = offsets.tolist()
    sums = [sq[lo:hi].sum() for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.stack(sums).sqrt() if sums else sq.new_zeros(0)


def segmented_topk(values: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
                   fragments: torch.Tensor | None = None, index_base: int = 0) -> torch.Tensor:
    """Indices (int64, ``index_base`` + position) of the ``k[f]`` largest magnitudes of each
    fragment ``f`` in ``fragments`` (default: all, in order), concatenated in that order and
    ascending within a fragment; ties go to the lower index."""
    key = magnitude_key(values)
    bounds = offsets.tolist()
    ks = k.tolist()
    frag_ids = range(len(bounds) - 1) if fragments is None else fragments.tolist()
    out = []
    for f in frag_ids:
        lo, hi = bounds[f], bounds[f + 1]
        pos = torch.arange(lo, hi, dtype=torch.int64, device=values.device)
        # Sort by index first, then stably by descending key: equal keys keep index order.
        order = torch.sort(key[lo:hi], descending=True, stable=True).indices
        out.append(torch.sort(pos[order[: ks[f]]]).values)
    if not out:
        return torch.zeros(0, dtype=torch.int64, device=values.device)
    return torch.cat(out) + index_base


def threshold_select(values: torch.Tensor, offsets: torch.Tensor, thresholds: torch.Tensor,
                     segments: torch.Tensor | None = None, index_base: int = 0) -> torch.Tensor:
    """Indices (int64, ``index_base`` + position) of the elements of each segment ``s`` in
    ``segments`` (default: all, in order) with ``|x| >= thresholds[s]`` in fp32 and ``x != 0``, and
    of every NaN; concatenated in that order, ascending within a segment."""
    mag = values.float().abs()  # exact for bf16 and fp16
    bounds = offsets.tolist()
    seg_ids = range(len(bounds) - 1) if segments is None else segments.tolist()
    out = [torch.zeros(0, dtype=torch.int64, device=values.device)]
    for s in seg_ids:
        lo, hi = bounds[s], bounds[s + 1]
        part = mag[lo:hi]
        t = thresholds[s].to(device=values.device, dtype=torch.float32)
        keep = ((part >= t) & (part != 0)) | torch.isnan(part)
        out.append(torch.nonzero(keep).flatten() + lo)
    return torch.cat(out) + index_base


def sparse_pack(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values[indices]``."""
    return values[indices]


def sparse_unpack(residual: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense output, zero except ``out[indices] = values * scale`` (fp32 product, one rounding);
    ``residual[indices] = 0`` in place."""
    out = torch.zeros_like(residual)
    out[indices] = (values.float() * scale).to(residual.dtype)
    residual[indices] = 0
    return out


# --------------------------------------------------------------------------------------------------
# The leader's planning rules (docs/algorithm.md, steps 4 and 5), which deft_kernels.planning runs
# in C++.


def local_k(norms: torch.Tensor, sizes: torch.Tensor, k_total: int) -> torch.Tensor:
    """Per-fragment k sharing ``k_total`` by norm (:func:`deft_kernels.planning.local_k`): fragments
    by descending norm (ties: lower id) each take ``min(remaining_k, int(remaining_k * norm /
    remaining_norm))``, clamped to ``[1, size]``; then a second pass in the same order gives what is
    still unassigned to the fragments with room, each up to its size. A NaN or inf norm sends its
    fragment whole. ``remaining_norm`` starts as the sum of the finite norms in fragment order
    (float64, left to right)."""
    norm = [float(v) for v in norms.tolist()]
    size = [int(s) for s in sizes.tolist()]
    finite = [math.isfinite(v) for v in norm]
    norm = [v if ok else 0.0 for v, ok in zip(norm, finite)]
    k = [0 if ok else s for s, ok in zip(size, finite)]
    remaining_k, remaining_norm = max(0, k_total - sum(k)), 0.0
    for v in norm:
        remaining_norm += v
    order = sorted((f for f in range(len(norm)) if finite[f]), key=lambda f: (-norm[f], f))
    for f in order:
        share = 0
        if remaining_k > 0 and remaining_norm > 0:
            share = min(remaining_k, int(remaining_k * norm[f] / remaining_norm))
        k[f] = min(size[f], max(1, share))
        remaining_k -= k[f]
        remaining_norm -= norm[f]
    for f in order:
        if remaining_k <= 0:
            break
        add = min(remaining_k, size[f] - k[f])
        k[f] += add
        remaining_k -= add
    return torch.tensor(k, dtype=torch.int64)


def pack_bins(costs: torch.Tensor, world_size: int, candidates: torch.Tensor) -> list[torch.Tensor]:
    """LPT (:func:`deft_kernels.planning.pack_bins`): candidates by descending cost (ties: lower
    id), each into the lightest bin (ties: lowest bin id); each bin's ids ascending."""
    cost = costs.double().tolist()
    heap = [(0.0, b) for b in range(world_size)]
    bins: list[list[int]] = [[] for _ in range(world_size)]
    for f in sorted(candidates.tolist(), key=lambda f: (-cost[f], f)):
        load, b = heapq.heappop(heap)
        bins[b].append(f)
        heapq.heappush(heap, (load + cost[f], b))
    return [torch.tensor(sorted(b), dtype=torch.int64) for b in bins]
