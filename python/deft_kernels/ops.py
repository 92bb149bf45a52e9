"""The ops layer: typed, validated entry points to the kernels.

Each function checks its arguments (raising ``TypeError``/``ValueError`` with the argument's name),
then calls the ``torch.ops.deft_kernels`` op, which dispatches on the tensors' device: the C++/OpenMP
kernels on CPU, the CUDA/Triton kernels on GPU where they are registered. ``deft_kernels.reference``
holds the plain-PyTorch oracle of each op with the same signature.

Fragments are described by ``offsets``: int64, length ``F + 1``, ``offsets[0] == 0``,
non-decreasing, ``offsets[-1] == N``; fragment ``f`` is ``[offsets[f], offsets[f+1])`` and may be
empty. All index arithmetic is int64, so vectors past 2**31 elements are fine.

``threshold_select`` cuts the vector the same way and calls the pieces segments: the whole vector
for the hard threshold and SIDCo, one partition per worker for MiCRO.

**Host metadata (no hidden synchronisation).** The small index vectors that describe a call
(``offsets``, ``k``, ``fragments``, ``thresholds``, ``segments``) may be CPU tensors next to CUDA
values, as ``torch.topk`` takes ``k`` as a host int; that is the sync-free way to call the ops on a
GPU. The op is picked from the values' device; the kernel's glue reads the metadata on the host,
uploads what the launch needs once (a non-blocking copy from pinned memory) and copies nothing
back, and the validation here reads only the metadata, never the values. Metadata on the values' device is accepted too, but reading
it (validation, or ``segmented_topk``'s launch plan) copies it to the host, which synchronises.
Any other device is an error. (``threshold_select``'s output size depends on the data, so its CUDA
kernel reads one count back however the metadata is passed.)

**Input checks, one layer.** The checks live in ``deft_kernels._checks``, shared with the Triton
kernels. Those that read tensor data (offsets increasing, k in range, indices in bounds) cost a
pass over small tensors; on CPU metadata they never touch the GPU. ``sparse_pack``/``sparse_unpack``
check their ``indices``, which are data on the values' device: that check synchronises, so pass
``validate=False`` in hot loops whose inputs come from the planner, which builds them valid by
construction. Either way the op below is told not to scan the indices again (its schema's
``validate``, which a direct ``torch.ops.deft_kernels`` call leaves at ``True``), and an
out-of-range index that reaches a kernel unchecked is skipped, never read or written. The C++ ops
re-check the host metadata (O(F), read there anyway to plan the launch) so that a direct call with
bad metadata raises instead of reading out of bounds.

On CUDA tensors, ``accumulate_norms``, ``segmented_topk`` and ``threshold_select`` run the CUDA
kernels of the extension (``csrc/cuda``) when it was built with CUDA. Every op with no CUDA kernel
there (all of them in a build without CUDA) gets a thin CUDA implementation that imports the Triton
kernels (:mod:`deft_kernels.triton_ops`) on its first call, so ``import deft_kernels`` never imports
triton.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.deft_kernels.*)
from . import _checks
from ._checks import SUPPORTED_DTYPES

__all__ = ["accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack", "sparse_unpack", "SUPPORTED_DTYPES"]

def accumulate_norms(grad: torch.Tensor, residual: torch.Tensor, offsets: torch.Tensor, *,
                     validate: bool = True) -> torch.Tensor:
    """Error-feedback accumulation fused with per-fragment L2 norms, in one pass over the data.

    ``residual`` is updated in place to ``a = grad + residual`` (fp32 arithmetic, one rounding to
    the residual's dtype) and the fp32 norm ``||a[offsets[f]:offsets[f+1]]||_2`` of every fragment
    is returned. ``grad`` may be non-contiguous; ``residual`` must be contiguous (it is written in
    place), have ``grad``'s length, and either ``grad``'s dtype or float32 under a bfloat16 or
    float16 ``grad``: a 16-bit gradient accumulates into its fp32 residual in place, with no fp32
    copy of the gradient (4 bytes per element less than copying it to fp32 first), and ``a`` is
    then the fp32 sum, unrounded. A NaN or inf in ``a`` (in either input, or the sum overflowing the
    residual's dtype) gives a NaN or inf norm for its fragment. ``offsets`` may be a CPU tensor next
    to CUDA data (uploaded without synchronising).
    """
    _checks.accumulate_norms_args(grad, residual, offsets, validate)
    return torch.ops.deft_kernels.accumulate_norms(grad.contiguous(), residual, offsets)


def segmented_topk(values: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
                   fragments: torch.Tensor | None = None, *, index_base: int = 0,
                   validate: bool = True) -> torch.Tensor:
    """Partitioned top-k by magnitude with its own ``k`` per fragment, all fragments in one call.

    Returns int64 indices ``index_base + i`` of the ``k[f]`` largest ``|values[i]|`` in each fragment
    ``f`` of ``fragments`` (default: every fragment, in order), concatenated in that order and
    ascending within a fragment: exactly ``sum(k[fragments])`` indices. Magnitude order is that of
    ``|x|``'s bit pattern: NaN ranks above ``+inf``, ``-0`` ties ``+0``; ties go to the lower index, so
    the result is a pure function of the input. Only the listed fragments' data is read.

    ``k`` (int64, one entry per fragment, ``0 <= k[f] <= size_f``) is indexed by fragment id, so a
    worker passes the full ``k`` and the ids of the fragments in its bin. ``index_base`` shifts
    every returned index, for a vector that is a slice of a larger flat gradient.

    On CUDA values pass ``offsets``, ``k`` and ``fragments`` as CPU tensors: the call then never
    waits for the GPU (metadata on the GPU is copied to the host first, which synchronises).
    """
    _checks.segmented_topk_args(values, offsets, k, fragments, index_base, validate)
    return torch.ops.deft_kernels.segmented_topk(values.contiguous(), offsets, k, fragments, index_base)


def threshold_select(values: torch.Tensor, offsets: torch.Tensor, thresholds: torch.Tensor,
                     segments: torch.Tensor | None = None, *, index_base: int = 0,
                     validate: bool = True) -> torch.Tensor:
    """Indices of the elements whose magnitude reaches their segment's threshold, every segment in
    one pass over the data with a compaction (the selection of the hard threshold, SIDCo and MiCRO).

    ``offsets`` cuts ``values`` into segments like fragments; ``thresholds`` (float32, one per
    segment) gives segment ``s`` its threshold ``t_s``. Returns int64 indices ``index_base + i`` of
    every element ``i`` of each segment in ``segments`` (default: all, in order) with
    ``|values[i]| >= t_s`` compared in fp32 and ``values[i] != 0``, and of every NaN; concatenated in
    that order, ascending within a segment. Zeros are never selected (sending them changes nothing)
    and NaNs always are (the package's NaN policy, as in :func:`segmented_topk`). Any threshold
    but NaN is allowed: ``0`` or below selects every non-zero element, ``+inf`` the infinities and
    NaNs; a NaN threshold is rejected (with ``validate=False`` it selects only the NaNs).

    On CUDA values, ``offsets``, ``thresholds`` and ``segments`` may be CPU tensors (the way without
    synchronisations: the launch plan is built from them on the host) or tensors on the values'
    device (copied to the host first). The output size depends on the data, so the CUDA kernel
    reads one count back from the device before it allocates the output.
    """
    _checks.threshold_select_args(values, offsets, thresholds, segments, index_base, validate)
    return torch.ops.deft_kernels.threshold_select(values.contiguous(), offsets, thresholds, segments, index_base)


def sparse_pack(values: torch.Tensor, indices: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Gather: ``values[indices]`` into a new contiguous buffer (the values to all-reduce)."""
    _checks.sparse_pack_args(values, indices, validate)
    # checked above (or vouched for): the op does not scan the indices again
    return torch.ops.deft_kernels.sparse_pack(values.contiguous(), indices.contiguous(), False)


def sparse_unpack(residual: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float, *,
                  validate: bool = True) -> torch.Tensor:
    """Scatter the reduced values back and clear what was sent, in one pass over the indices.

    Returns a new dense tensor shaped like ``residual``: zero except ``out[indices] = values * scale``
    (fp32 product, one rounding). ``residual[indices]`` is set to zero in place. Indices should be
    distinct (DEFT's are by construction); with repeats, which value lands is unspecified.
    """
    _checks.sparse_unpack_args(residual, indices, values, scale, validate)
    return torch.ops.deft_kernels.sparse_unpack(residual, indices.contiguous(), values.contiguous(), float(scale),
                                                False)


@torch.library.register_fake("deft_kernels::accumulate_norms")
def _(grad, residual, offsets):
    return grad.new_empty(offsets.shape[0] - 1, dtype=torch.float32)


@torch.library.register_fake("deft_kernels::segmented_topk")
def _(values, offsets, k, fragments=None, index_base=0):
    n = torch.library.get_ctx().new_dynamic_size()
    return values.new_empty(n, dtype=torch.int64)


@torch.library.register_fake("deft_kernels::threshold_select")
def _(values, offsets, thresholds, segments=None, index_base=0):
    n = torch.library.get_ctx().new_dynamic_size()
    return values.new_empty(n, dtype=torch.int64)


@torch.library.register_fake("deft_kernels::sparse_pack")
def _(values, indices, validate=True):
    return values.new_empty(indices.shape[0])


@torch.library.register_fake("deft_kernels::sparse_unpack")
def _(residual, indices, values, scale, validate=True):
    return torch.empty_like(residual)


# The ops whose CUDA implementation falls back to the Triton kernels when the extension has no CUDA
# kernel for them, and those it does serve that way in this process.
_TRITON_FALLBACK_OPS = ("accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack", "sparse_unpack")
TRITON_FALLBACK: list[str] = []
_FALLBACK_LIB = None


def _triton_fallback(name: str):
    def impl(*args):
        try:
            from . import triton_ops  # first use: import deft_kernels never imports triton
        except ImportError as e:
            raise RuntimeError(f"deft_kernels.{name} on CUDA tensors needs the Triton kernels (pip install triton): "
                               f"this build of the extension has no CUDA kernel for it") from e
        return triton_ops.CUDA_IMPLS[name](*args)

    impl.__name__ = f"{name}_triton_fallback"
    return impl


def _register_triton_fallbacks() -> list[str]:
    """Registers, under the CUDA dispatch key, a thin implementation that calls the Triton kernel
    (imported on first use) for every op that has no CUDA kernel. Returns the names it registered;
    calling it again registers nothing."""
    global _FALLBACK_LIB
    missing = [name for name in _TRITON_FALLBACK_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"deft_kernels::{name}", "CUDA")]
    if missing and _FALLBACK_LIB is None:
        _FALLBACK_LIB = torch.library.Library("deft_kernels", "IMPL")
    for name in missing:
        _FALLBACK_LIB.impl(name, _triton_fallback(name), "CUDA")
        TRITON_FALLBACK.append(name)
    return missing


_register_triton_fallbacks()
