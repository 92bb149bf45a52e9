"""Triton kernels of the ops: the GPU implementation for builds of the extension without CUDA.

Where the extension was built with CUDA, ``segmented_topk``, ``accumulate_norms`` and
``threshold_select`` run its CUDA kernels and only ``sparse_pack``/``sparse_unpack`` come from here.
The Triton top-k is kept for builds without CUDA and as a simple cross-check; it is not a DEFT result
and the GPU benchmark reports it as "Triton fallback": on an H200 (first GPU run, commit 8af8162) it
was several times slower than the CUDA kernel of that time and slower than one ``torch.topk`` over the whole
vector. :mod:`deft_kernels.ops` registers these functions lazily (this module, and triton, are
imported on the first CUDA call that needs them).

Same semantics as the CPU ops (see :mod:`deft_kernels.ops` and :mod:`deft_kernels.reference`):

- ``accumulate_norms``: one read of ``grad`` and ``residual``, one write of ``a = grad + residual``
  (fp32 arithmetic, one rounding to the residual's dtype, which may be fp32 under a 16-bit
  ``grad``). Each block squares its values in float64 (exact for fp32
  inputs), sums them per fragment it overlaps, and adds the partial sums into a float64 vector with
  atomics, so the norm is as close to exact as the CPU kernel's whatever the layout.
- ``segmented_topk``: radix select on the magnitude key (bit pattern of ``|x|``: NaN above ``+inf``,
  ``-0`` ties ``+0``), every listed fragment in one launch sequence. Fragments are cut into tiles of
  ``block`` elements; per digit (11/10/10 bits for fp32, 8/7 for 16-bit types) one ``tl.histogram``
  pass over the tiles, restricted to the elements that share the key prefix resolved so far, adds
  into a per-fragment histogram, and a small kernel picks the digit holding the k-th largest key.
  Then each tile counts its keys above the threshold and equal to it, a prefix sum over the tiles
  gives each tile its output offset and how many threshold ties it takes (lower indices first), and
  a last pass writes the indices in order with ``tl.cumsum``. It re-reads the listed fragments on
  every pass (no candidate buffer).
- ``threshold_select``: the listed segments are cut into tiles; one pass counts each tile's
  selected elements (``|x| >= t`` in fp32 and ``x != 0``, or NaN), a prefix sum over the tiles gives
  each its output offset, and a second pass writes the indices in order with ``tl.cumsum``. The
  output size is read back to the host between the two passes (the one synchronisation).
- ``sparse_pack`` / ``sparse_unpack``: gather, and scatter into a zeroed output while zeroing the
  residual at the same indices, in one pass over the indices.

Host metadata as in :mod:`deft_kernels.ops`: ``offsets``, ``k`` and ``fragments`` may be CPU
tensors next to CUDA values; what the kernels need of them is built on the host and uploaded once,
non-blocking from pinned memory, and nothing is copied back but ``threshold_select``'s output size.

Every function here also runs on CPU tensors under ``TRITON_INTERPRET=1`` (how the test suite runs
them on machines without a GPU). The first GPU run (commit 8af8162) ran them on an H200.

Index and offset arguments that the ops layer validates (``validate=True``) are not re-checked on
the device here, since that needs a synchronisation: out-of-range indices are skipped (masked),
never read or written; ``segmented_topk`` and ``threshold_select`` copy their offsets, k, ids and
thresholds to the host anyway (they plan the tiles there) and check them there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks

__all__ = ["accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack", "sparse_unpack", "CUDA_IMPLS"]

# Bits of the magnitude key as a signed integer of the dtype's width, and the radix digits
# (shift, width) from the top. The top digit is histogrammed over the most elements, so it is widest.
_KEY = {torch.float32: (torch.int32, 0x7FFFFFFF, ((20, 11), (10, 10), (0, 10))),
        torch.bfloat16: (torch.int16, 0x7FFF, ((7, 8), (0, 7))),
        torch.float16: (torch.int16, 0x7FFF, ((7, 8), (0, 7)))}

NORM_BLOCK = 4096
PACK_BLOCK = 1024
TOPK_BLOCK = 4096
SELECT_BLOCK = 4096


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: one non-blocking copy from pinned memory (torch's caching host
    allocator keeps the pinned block until the copy is done), so the host never waits."""
    if t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _upload_all(arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host int64 arrays on ``device`` with one upload (see _upload): views of one packed tensor."""
    packed = _upload(torch.cat([a.to(torch.int64) for a in arrays]), device)
    return torch.split(packed, [a.numel() for a in arrays])


def _check_block(block) -> None:
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}")


# ---------------------------------------------------------------------------------------------
# accumulate_norms


@triton.jit
def _round_from_fp32(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even, bit for bit what torch's .to(dtype) does. For bf16
    the rounding is done on the bits: the interpreter truncates fp32 -> bf16 casts."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        hi = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN (quiet), sign and payload kept
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _accumulate_norms_kernel(g_ptr, g_stride, r_ptr, off_ptr, flo_ptr, fhi_ptr, sums_ptr, n, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    pos = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = pos < n
    g = tl.load(g_ptr + pos * g_stride, mask=valid, other=0).to(tl.float32)
    r = tl.load(r_ptr + pos, mask=valid, other=0).to(tl.float32)
    a = _round_from_fp32(g + r, r_ptr.dtype.element_ty)
    tl.store(r_ptr + pos, a, mask=valid)
    a64 = a.to(tl.float64)
    sq = a64 * a64
    # The fragments this block overlaps (usually one or two); each gets one atomic add.
    f_lo = tl.load(flo_ptr + b)
    f_hi = tl.load(fhi_ptr + b)
    for f in range(f_lo, f_hi + 1):
        lo = tl.load(off_ptr + f)
        hi = tl.load(off_ptr + f + 1)
        s = tl.sum(tl.where((pos >= lo) & (pos < hi), sq, 0.0), 0)
        tl.atomic_add(sums_ptr + f, s)


def _accumulate_norms(grad: torch.Tensor, residual: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    n = residual.numel()
    num_frags = offsets.numel() - 1
    offsets = _upload(offsets.contiguous(), residual.device)
    sums = torch.zeros(num_frags, dtype=torch.float64, device=residual.device)
    if n > 0 and num_frags > 0:
        starts = torch.arange(0, n, NORM_BLOCK, dtype=torch.int64, device=residual.device)
        ends = torch.clamp(starts + NORM_BLOCK, max=n) - 1
        # Clamped so that even invalid offsets (validate=False) never index outside them.
        f_lo = (torch.searchsorted(offsets, starts, right=True) - 1).clamp_(0, num_frags - 1)
        f_hi = (torch.searchsorted(offsets, ends, right=True) - 1).clamp_(0, num_frags - 1)
        _accumulate_norms_kernel[(starts.numel(),)](grad, grad.stride(0), residual, offsets, f_lo, f_hi, sums, n,
                                                    BLOCK=NORM_BLOCK)
    return sums.sqrt().to(torch.float32)


def accumulate_norms(grad: torch.Tensor, residual: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Triton ``accumulate_norms`` (see :func:`deft_kernels.ops.accumulate_norms`); ``grad`` may be
    strided (read in place, no copy)."""
    _checks.accumulate_norms_args(grad, residual, offsets, validate=True)
    return _accumulate_norms(grad, residual, offsets)


# ---------------------------------------------------------------------------------------------
# sparse_pack / sparse_unpack


@triton.jit
def _pack_kernel(x_ptr, x_stride, n, idx_ptr, m, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < m
    j = tl.load(idx_ptr + i, mask=live, other=0)
    ok = live & (j >= 0) & (j < n)
    tl.store(out_ptr + i, tl.load(x_ptr + j * x_stride, mask=ok, other=0), mask=live)


@triton.jit
def _unpack_kernel(r_ptr, n, idx_ptr, v_ptr, v_stride, m, scale, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < m
    j = tl.load(idx_ptr + i, mask=live, other=0)
    ok = live & (j >= 0) & (j < n)
    v = tl.load(v_ptr + i * v_stride, mask=live, other=0).to(tl.float32) * scale
    tl.store(out_ptr + j, _round_from_fp32(v, out_ptr.dtype.element_ty), mask=ok)
    tl.store(r_ptr + j, tl.zeros_like(v).to(r_ptr.dtype.element_ty), mask=ok)


def _sparse_pack(values: torch.Tensor, indices: torch.Tensor, validate: bool = True) -> torch.Tensor:
    if validate:  # a direct torch.ops call; deft_kernels.ops has checked and passes False
        _checks.check_indices(indices, values.numel(), True)
    indices = indices.contiguous()
    m = indices.numel()
    out = torch.empty(m, dtype=values.dtype, device=values.device)
    if m > 0:
        _pack_kernel[(triton.cdiv(m, PACK_BLOCK),)](values, values.stride(0), values.numel(), indices, m, out,
                                                    BLOCK=PACK_BLOCK)
    return out


def _sparse_unpack(residual: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float,
                   validate: bool = True) -> torch.Tensor:
    if validate:  # a direct torch.ops call; deft_kernels.ops has checked and passes False
        _checks.check_indices(indices, residual.numel(), True)
    indices = indices.contiguous()
    m = indices.numel()
    out = torch.zeros_like(residual, memory_format=torch.contiguous_format)
    if m > 0:
        _unpack_kernel[(triton.cdiv(m, PACK_BLOCK),)](residual, residual.numel(), indices, values, values.stride(0),
                                                      m, float(scale), out, BLOCK=PACK_BLOCK)
    return out


def sparse_pack(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Triton ``sparse_pack``: ``values[indices]`` (``values`` may be strided)."""
    _checks.sparse_pack_args(values, indices, validate=True)
    return _sparse_pack(values, indices, validate=False)


def sparse_unpack(residual: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton ``sparse_unpack``: zeros except ``out[indices] = values * scale``; ``residual[indices] = 0``."""
    _checks.sparse_unpack_args(residual, indices, values, scale, validate=True)
    return _sparse_unpack(residual, indices, values, scale, validate=False)


# ---------------------------------------------------------------------------------------------
# segmented_topk


@triton.jit
def _tile_positions(tile_seg_ptr, tile_begin_ptr, seg_end_ptr, BLOCK: tl.constexpr):
    """This program's tile: its id, its segment, the positions it covers and which of them are in
    the segment (see _tiles)."""
    t = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + t)
    pos = tl.load(tile_begin_ptr + t) + tl.arange(0, BLOCK)
    valid = pos < tl.load(seg_end_ptr + seg)
    return t, seg, pos, valid


@triton.jit
def _tile_keys(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, KEY_MASK: tl.constexpr,
               BLOCK: tl.constexpr):
    t, seg, pos, valid = _tile_positions(tile_seg_ptr, tile_begin_ptr, seg_end_ptr, BLOCK)
    key = tl.load(bits_ptr + pos * stride, mask=valid, other=0).to(tl.int32) & KEY_MASK
    return t, seg, pos, valid, key


@triton.jit
def _topk_hist_kernel(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, prefix_ptr, hist_ptr,
                      KEY_MASK: tl.constexpr, SHIFT: tl.constexpr, PREV_SHIFT: tl.constexpr, BINS: tl.constexpr,
                      BLOCK: tl.constexpr):
    t, seg, pos, valid, key = _tile_keys(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, KEY_MASK,
                                         BLOCK)
    if PREV_SHIFT >= 0:  # only keys sharing the digits resolved so far are still in the running
        valid = valid & ((key >> PREV_SHIFT) == tl.load(prefix_ptr + seg))
    h = tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=valid)
    tl.atomic_add(hist_ptr + seg.to(tl.int64) * BINS + tl.arange(0, BINS), h.to(tl.int64), mask=h > 0)


@triton.jit
def _topk_choose_kernel(hist_ptr, prefix_ptr, need_ptr, WIDTH: tl.constexpr, BINS: tl.constexpr):
    # The digit d holding the need-th largest key: above(d) < need <= above(d) + count(d).
    s = tl.program_id(0)
    d = tl.arange(0, BINS)
    h = tl.load(hist_ptr + s.to(tl.int64) * BINS + d)
    need = tl.load(need_ptr + s)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys in digits above d
    chosen = tl.sum((above + h >= need).to(tl.int32), 0) - 1
    tl.store(prefix_ptr + s, (tl.load(prefix_ptr + s) << WIDTH) | chosen)
    tl.store(need_ptr + s, need - tl.sum(tl.where(d == chosen, above, 0), 0))


@triton.jit
def _topk_count_kernel(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, thr_ptr, gt_ptr, eq_ptr,
                       KEY_MASK: tl.constexpr, BLOCK: tl.constexpr):
    t, seg, pos, valid, key = _tile_keys(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, KEY_MASK,
                                         BLOCK)
    thr = tl.load(thr_ptr + seg)
    tl.store(gt_ptr + t, tl.sum((valid & (key > thr)).to(tl.int64), 0))
    tl.store(eq_ptr + t, tl.sum((valid & (key == thr)).to(tl.int64), 0))


@triton.jit
def _topk_write_kernel(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, thr_ptr, take_ptr, tile_out_ptr,
                       out_ptr, index_base, KEY_MASK: tl.constexpr, BLOCK: tl.constexpr):
    t, seg, pos, valid, key = _tile_keys(bits_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, KEY_MASK,
                                         BLOCK)
    thr = tl.load(thr_ptr + seg)
    eq = (valid & (key == thr)).to(tl.int32)
    # Ties at the threshold: this tile takes its first `take` ones (lower indices win).
    tie_rank = tl.cumsum(eq, 0) - eq
    sel = valid & ((key > thr) | ((eq > 0) & (tie_rank < tl.load(take_ptr + t))))
    sel_i = sel.to(tl.int64)
    dst = tl.load(tile_out_ptr + t) + tl.cumsum(sel_i, 0) - 1
    tl.store(out_ptr + dst, pos + index_base, mask=sel)


def _tiles(seg_begin: torch.Tensor, seg_end: torch.Tensor, block: int):
    """Cuts each segment [seg_begin[s], seg_end[s]) into tiles of ``block`` elements, one program
    each. Returns the segment of every tile, the first tile of every segment and where each tile
    begins."""
    tiles_per_seg = (seg_end - seg_begin + block - 1) // block
    tile_seg = torch.repeat_interleave(torch.arange(seg_begin.numel()), tiles_per_seg)
    seg_first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg
    tile_begin = seg_begin[tile_seg] + (torch.arange(tile_seg.numel()) - seg_first_tile[tile_seg]) * block
    return tile_seg, seg_first_tile, tile_begin


def _exclusive_cumsum_within(x: torch.Tensor, tile_seg: torch.Tensor, seg_first_tile: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of per-tile ``x`` restarting at each segment's first tile."""
    excl = torch.cumsum(x, 0) - x
    return excl - excl[seg_first_tile][tile_seg]


def _host_layout(offsets, n: int, ids, ids_name: str):
    """Host copies of ``offsets`` and of the listed ids (all when ``ids`` is None), checked as far as
    memory safety needs: what an unvalidated call (``validate=False``, torch.ops) reaches."""
    off = offsets.cpu()
    count = off.numel() - 1
    if int(off[0]) != 0 or int(off[-1]) != n:
        raise ValueError(f"offsets must start at 0 and end at the vector length {n}")
    sizes = off[1:] - off[:-1]
    if count and bool((sizes < 0).any()):
        raise ValueError("offsets must be non-decreasing")
    listed = torch.arange(count) if ids is None else ids.cpu()
    if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= count):
        raise ValueError(f"{ids_name} must hold ids in [0, {count})")
    return off, sizes, listed


def _topk_plan(values, offsets, k, fragments):
    """Host copies of the small arrays, checked: the offsets, and the segments (listed fragments with
    k > 0) with their k and output offsets, and the total output size."""
    off, sizes, frag = _host_layout(offsets, values.numel(), fragments, "fragments")
    kk = k.cpu()
    num_frags = off.numel() - 1
    if kk.numel() != num_frags or (num_frags and bool(((kk < 0) | (kk > sizes)).any())):
        raise ValueError("k must have one entry per fragment, each in [0, fragment size]")
    seg_k = kk[frag]
    seg_out = torch.cumsum(seg_k, 0) - seg_k
    total = int(seg_k.sum())
    live = seg_k > 0
    frag, seg_k, seg_out = frag[live], seg_k[live], seg_out[live]
    return off, frag, seg_k, seg_out, total


def _segmented_topk(values, offsets, k, fragments=None, index_base: int = 0, block: int = TOPK_BLOCK):
    device = values.device
    off, frag, seg_k, seg_out, total = _topk_plan(values, offsets, k, fragments)
    out = torch.empty(total, dtype=torch.int64, device=device)
    num_segs = frag.numel()
    if num_segs == 0:
        return out
    seg_begin, seg_end = off[frag], off[frag + 1]
    tile_seg, seg_first_tile, tile_begin = _tiles(seg_begin, seg_end, block)
    num_tiles = tile_seg.numel()
    tile_seg, tile_begin, seg_first_tile, seg_end, seg_k, seg_out = _upload_all(
        (tile_seg, tile_begin, seg_first_tile, seg_end, seg_k, seg_out), device)

    int_dtype, key_mask, digits = _KEY[values.dtype]
    bits = values.view(int_dtype)
    tiles = (bits, values.stride(0), tile_seg, tile_begin, seg_end)
    prefix = torch.zeros(num_segs, dtype=torch.int64, device=device)  # digits resolved so far
    need = seg_k.clone()  # keys still to take among those sharing the prefix
    prev_shift = -1
    for shift, width in digits:
        hist = torch.zeros(num_segs, 1 << width, dtype=torch.int64, device=device)
        _topk_hist_kernel[(num_tiles,)](*tiles, prefix, hist, KEY_MASK=key_mask, SHIFT=shift, PREV_SHIFT=prev_shift,
                                        BINS=1 << width, BLOCK=block)
        _topk_choose_kernel[(num_segs,)](hist, prefix, need, WIDTH=width, BINS=1 << width)
        prev_shift = shift
    # prefix is now the threshold key, need how many keys equal to it to take.
    gt = torch.empty(num_tiles, dtype=torch.int64, device=device)
    eq = torch.empty(num_tiles, dtype=torch.int64, device=device)
    _topk_count_kernel[(num_tiles,)](*tiles, prefix, gt, eq, KEY_MASK=key_mask, BLOCK=block)
    take = torch.minimum((need[tile_seg] - _exclusive_cumsum_within(eq, tile_seg, seg_first_tile)).clamp_(min=0), eq)
    tile_out = seg_out[tile_seg] + _exclusive_cumsum_within(gt + take, tile_seg, seg_first_tile)
    _topk_write_kernel[(num_tiles,)](*tiles, prefix, take, tile_out, out, index_base, KEY_MASK=key_mask, BLOCK=block)
    return out


def segmented_topk(values: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
                   fragments: torch.Tensor | None = None, *, index_base: int = 0,
                   block: int = TOPK_BLOCK) -> torch.Tensor:
    """Triton ``segmented_topk`` (see :func:`deft_kernels.ops.segmented_topk`); ``values`` may be
    strided. ``block`` is the tile size in elements (a power of two), a tuning knob only."""
    _checks.segmented_topk_args(values, offsets, k, fragments, index_base, validate=True)
    _check_block(block)
    return _segmented_topk(values, offsets, k, fragments, index_base, block)


# ---------------------------------------------------------------------------------------------
# threshold_select


@triton.jit
def _widen_to_fp32(x, DTYPE: tl.constexpr):
    """x (of DTYPE) in fp32, exactly. bf16 widens by shifting its bits: the interpreter's bf16 cast
    flushes subnormals to zero."""
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _select_tile(x_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, seg_thr_ptr, BLOCK: tl.constexpr):
    t, seg, pos, valid = _tile_positions(tile_seg_ptr, tile_begin_ptr, seg_end_ptr, BLOCK)
    a = tl.abs(_widen_to_fp32(tl.load(x_ptr + pos * stride, mask=valid, other=0), x_ptr.dtype.element_ty))
    thr = tl.load(seg_thr_ptr + seg)
    return t, pos, valid & ((a != a) | ((a >= thr) & (a != 0)))


@triton.jit
def _select_count_kernel(x_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, seg_thr_ptr, count_ptr,
                         BLOCK: tl.constexpr):
    t, pos, sel = _select_tile(x_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, seg_thr_ptr, BLOCK)
    tl.store(count_ptr + t, tl.sum(sel.to(tl.int64), 0))


@triton.jit
def _select_write_kernel(x_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, seg_thr_ptr, tile_out_ptr,
                         out_ptr, index_base, BLOCK: tl.constexpr):
    t, pos, sel = _select_tile(x_ptr, stride, tile_seg_ptr, tile_begin_ptr, seg_end_ptr, seg_thr_ptr, BLOCK)
    dst = tl.load(tile_out_ptr + t) + tl.cumsum(sel.to(tl.int64), 0) - 1
    tl.store(out_ptr + dst, pos + index_base, mask=sel)


def _threshold_select(values, offsets, thresholds, segments=None, index_base: int = 0, block: int = SELECT_BLOCK):
    device = values.device
    off, _, seg = _host_layout(offsets, values.numel(), segments, "segments")
    thr = thresholds.cpu()
    if thr.numel() != off.numel() - 1:
        raise ValueError(f"thresholds must have one entry per segment ({off.numel() - 1}), got {thr.numel()}")
    tile_seg, _, tile_begin = _tiles(off[seg], off[seg + 1], block)
    num_tiles = tile_seg.numel()
    if num_tiles == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    tiles = (values, values.stride(0), *_upload_all((tile_seg, tile_begin, off[seg + 1]), device),
             _upload(thr[seg].float(), device))
    count = torch.empty(num_tiles, dtype=torch.int64, device=device)
    _select_count_kernel[(num_tiles,)](*tiles, count, BLOCK=block)
    tile_out = torch.cumsum(count, 0) - count
    out = torch.empty(int(count.sum()), dtype=torch.int64, device=device)  # the one read back: the output size
    if out.numel() > 0:
        _select_write_kernel[(num_tiles,)](*tiles, tile_out, out, index_base, BLOCK=block)
    return out


def threshold_select(values: torch.Tensor, offsets: torch.Tensor, thresholds: torch.Tensor,
                     segments: torch.Tensor | None = None, *, index_base: int = 0,
                     block: int = SELECT_BLOCK) -> torch.Tensor:
    """Triton ``threshold_select`` (see :func:`deft_kernels.ops.threshold_select`); ``values`` may be
    strided. ``block`` is the tile size in elements (a power of two), a tuning knob only."""
    _checks.threshold_select_args(values, offsets, thresholds, segments, index_base, validate=True)
    _check_block(block)
    return _threshold_select(values, offsets, thresholds, segments, index_base, block)


# ---------------------------------------------------------------------------------------------
# Registration: deft_kernels.ops registers these functions, by this table, as the CUDA implementation
# of each op the extension has no CUDA kernel for (on the first call that needs one; the names it
# registered are ops.TRITON_FALLBACK). Each takes the op's schema arguments, ``validate`` included.

CUDA_IMPLS = {"accumulate_norms": _accumulate_norms, "segmented_topk": _segmented_topk,
              "threshold_select": _threshold_select, "sparse_pack": _sparse_pack, "sparse_unpack": _sparse_unpack}
