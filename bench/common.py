"""The op benchmark problem shared by bench/test_bench_ops.py and bench/ops_demo.py.

A ResNet-50 gradient (25,557,032 values in 161 fragments, one per parameter tensor) at density
d = 1%. Local k rule: ``k_f = max(1, int(d * size_f))``, so no fragment gets 0 and the total is
about d * N (255,513 for ResNet-50). The threshold select uses one threshold for every fragment,
the magnitude a standard normal exceeds with probability d (the residual is standard normal), so
it also selects about d * N. The torch alternatives produce the same output as the op (one int64
vector of global indices, one dense tensor, ...), so their cost is comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

from deft_kernels import ops, planning
from deft_kernels.benchmarks import layouts

DENSITY = 0.01


@dataclass
class Problem:
    sizes: list[int]
    offsets: torch.Tensor
    k: torch.Tensor
    grad: torch.Tensor
    residual: torch.Tensor
    indices: torch.Tensor
    packed: torch.Tensor
    threshold: float  # |x| >= threshold keeps about d of a standard normal
    thresholds: torch.Tensor  # that threshold per fragment, float32 on the CPU (the sync-free way)


def local_k(sizes: list[int], density: float) -> list[int]:
    return [min(s, max(1, int(density * s))) for s in sizes]


def resnet50_problem(device: str = "cpu", dtype: torch.dtype = torch.float32, density: float = DENSITY,
                     seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    sizes = [n for _, n in layouts.resnet50_layout()]
    n = sum(sizes)
    offsets = torch.tensor(planning.offsets_of(sizes), device=device)
    k = torch.tensor(local_k(sizes, density), device=device)
    grad = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    residual = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    indices = ops.segmented_topk(residual, offsets, k)
    threshold = normal_threshold(density)
    return Problem(sizes, offsets, k, grad, residual, indices, residual[indices], threshold,
                   torch.full((len(sizes),), threshold, dtype=torch.float32))


def normal_threshold(density: float) -> float:
    """The magnitude a standard normal value exceeds with probability ``density``."""
    return NormalDist().inv_cdf(1 - density / 2)


def topk_per_fragment(x: torch.Tensor, sizes: list[int], k: list[int]) -> torch.Tensor:
    """What users write today: one torch.topk per parameter tensor."""
    out, start = [], 0
    for size, kf in zip(sizes, k):
        out.append(torch.topk(x[start:start + size].abs(), kf, sorted=False).indices + start)
        start += size
    return torch.cat(out)


def topk_whole(x: torch.Tensor, k: int) -> torch.Tensor:
    """One torch.topk over the whole flat vector (the Top-k baseline's selection)."""
    return torch.topk(x.abs(), k, sorted=False).indices


def accumulate_norms_torch(grad: torch.Tensor, residual: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    residual.add_(grad)
    return torch.stack(torch._foreach_norm(list(torch.split(residual, sizes))))


def sparse_unpack_torch(residual: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                        scale: float) -> torch.Tensor:
    out = torch.zeros_like(residual).index_put_((indices,), values * scale)
    residual.index_fill_(0, indices, 0)
    return out


def indices_at_least_torch(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The threshold selection the sparsifiers (hard threshold, SIDCo, MiCRO) ran before
    ops.threshold_select: five elementwise passes and a nonzero."""
    mag = x.abs()
    return torch.nonzero(((mag >= threshold) & (mag > 0)) | torch.isnan(x)).flatten()
