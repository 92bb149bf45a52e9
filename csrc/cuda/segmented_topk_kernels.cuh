// CUDA segmented top-k: radix select on the magnitude key, every listed segment in one fixed
// sequence of launches. Same semantics as the CPU op (csrc/cpu/segmented_topk.cpp): key = bit pattern
// of |x| (NaN above +inf, -0 ties +0), exactly k per segment, ties to the lower index, output
// ascending within a segment and segments in list order.
//
// STATUS: compiled with nvcc (tests/test_cuda_compile.py) and run, with its launch sequence, on the
// CPU emulation of CUDA (tests/cpp/test_topk_emulated.cpp); NEVER RUN ON A GPU yet (the first GPU run,
// at commit 8af8162, ran the kernel this one replaces). The cuda cases of tests/test_op_segmented_topk.py
// and tests/test_gpu_sync_free.py check it on the next machine with one (scripts/gpu_check.sh).
//
// Radix select as AIR top-k (Zhang et al., SC'23) and CUB's DeviceTopK do it: a histogram of the top
// digit (11 bits for fp32, 8 for 16-bit types) picks the bin holding the k-th largest key, the
// lower digits (10 bits, 7) are resolved on the surviving candidates only, and a last pass writes
// the winners. What differs is where the candidates come from: a block holds its tile in registers,
// so after the tile's own top-digit histogram it already knows which of its elements can plausibly
// win, and it stores those (the tile's bins from the one holding its (3 x its share of k)-th largest
// key up, at most `cap`; topk_plan.h) in its slot in the same pass. When the segment's bin turns out to be at or
// above the lowest bin a tile kept, the tile is *complete*: every element that can still win is in
// its slot and the data is never read again. A tile where the segment's bin lies lower (it holds
// far more than its share of the winners, or heavy ties) is *incomplete* and re-reads its data in
// each later pass. For a gradient whose large values are spread over its tensor that is one read of
// the data plus passes over a few percent of it.
//
// Launches (topk_plan.h has the terms; fp32 has three digits, 16-bit types two):
//   first_pass   one block per tile of a large segment: top-digit histogram into the segment's, the
//                slot; the last block of a segment picks its top bin. One block per group of small
//                segments: the whole select of each, in registers and shared memory.
//   refine<l>    one warp per tile, for each lower digit l: histogram of digit l over the candidates
//                (slot, or data if incomplete); level 1 also compacts the slot to the candidates and
//                the winners above them. The last warp of a segment picks its bin: after the last
//                digit the prefix is the threshold key T and `need` the ties at T to take.
//   count        one warp per tile: keys above T and equal to T; the last block of a segment turns
//                the tiles' counts into output offsets and ties taken (the lower tiles first).
//   write        one warp per tile: the winners in index order (warp scans), into the output.
// Per-segment steps use the "last block" pattern (a counter per segment; whoever finishes last
// does the step), so the number of launches is fixed whatever the number of segments.
#pragma once

#include <cstdint>

#include "cuda/device_util.cuh"
#include "cuda/topk_plan.h"

namespace deft_kernels::cuda::topk {

// The key of a dtype: TOTAL bits, a top digit of W0 bits, lower digits of W1 bits, VEC elements per
// 16-byte vector.
template <int TOTAL, int W0, int W1, int LEVELS, int VEC>
struct KeyTraits {
  static constexpr int kVec = VEC;
  static constexpr int kLevels = LEVELS;
  static constexpr uint32_t kMask = (1u << TOTAL) - 1u;
  static constexpr int kRows = 8;  // vectors per thread in a register tile
  static constexpr int kTileVectors = kRows * kThreads;
  static constexpr int64_t kTile = int64_t{kTileVectors} * VEC;
  template <int L>
  __host__ __device__ static constexpr int width() {
    return L == 0 ? W0 : W1;
  }
  template <int L>
  __host__ __device__ static constexpr int shift() {
    return TOTAL - W0 - L * W1;
  }
  template <int L>
  __host__ __device__ static constexpr int bins() {
    return 1 << width<L>();
  }
  template <int L>
  __device__ static uint32_t digit(uint32_t key) {
    return (key >> shift<L>()) & static_cast<uint32_t>(bins<L>() - 1);
  }
};

using Key32 = KeyTraits<31, 11, 10, 3, 4>;
using Key16 = KeyTraits<15, 8, 7, 2, 8>;
static_assert(Key32::kLevels == kKey32Format.levels && Key32::width<0>() == kKey32Format.top_bits &&
              Key32::width<1>() == kKey32Format.low_bits && Key32::kVec == kKey32Format.vec &&
              Key32::kTile == kKey32Format.tile);
static_assert(Key16::kLevels == kKey16Format.levels && Key16::width<0>() == kKey16Format.top_bits &&
              Key16::width<1>() == kKey16Format.low_bits && Key16::kVec == kKey16Format.vec &&
              Key16::kTile == kKey16Format.tile);
static_assert(Key32::shift<2>() == 0 && Key16::shift<1>() == 0, "the digits cover the key");

// The values: `x` as given, `aligned` the 16-byte boundary at or below it (vector v holds the
// elements v * VEC - shift ... + VEC - 1), n elements.
struct Input {
  const void* x;
  const uint4* aligned;
  int64_t n;
  int64_t shift;
};

template <class KT>
__device__ __forceinline__ uint32_t scalar_key(const Input& in, int64_t i) {
  if constexpr (KT::kVec == 4)
    return static_cast<const uint32_t*>(in.x)[i] & KT::kMask;
  else
    return static_cast<const uint16_t*>(in.x)[i] & KT::kMask;
}

// The keys of vector v; elements outside [0, n) read as 0 (callers mask them by position). Whole
// vectors are one 16-byte load; a vector straddling either end of the values is read element by
// element, so nothing outside the tensor is touched.
template <class KT>
__device__ __forceinline__ void load_vector(const Input& in, int64_t v, uint32_t (&key)[KT::kVec]) {
  const int64_t first = v * KT::kVec - in.shift;
  if (first >= 0 && first + KT::kVec <= in.n) {
    const uint4 w = in.aligned[v];
    if constexpr (KT::kVec == 4) {
      key[0] = w.x & KT::kMask, key[1] = w.y & KT::kMask, key[2] = w.z & KT::kMask, key[3] = w.w & KT::kMask;
    } else {
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) key[2 * i] = words[i] & KT::kMask, key[2 * i + 1] = (words[i] >> 16) & KT::kMask;
    }
  } else {
#pragma unroll
    for (int j = 0; j < KT::kVec; ++j)
      key[j] = first + j >= 0 && first + j < in.n ? scalar_key<KT>(in, first + j) : 0u;
  }
}

// Device views of the plan (topk_plan.h) and of the workspace.
struct PlanView {
  int64_t num_large, num_tiles;
  const int64_t *sm_begin, *sm_end, *sm_k, *sm_out, *group_first;
  const int64_t *lg_begin, *lg_end, *lg_k, *lg_out, *lg_tile_first, *lg_slot_base, *lg_cap, *lg_quota, *tile_seg;
};

struct WorkView {
  uint32_t* hist[3];
  uint32_t* done;
  uint32_t* seg_top;
  uint32_t* seg_prefix;
  int64_t* seg_need;
  int32_t* tile_local;
  uint32_t* tile_count;
  uint32_t* tile_gt;
  uint32_t* tile_eq;
  uint32_t* tile_take;
  int64_t* tile_out;
  uint32_t* slot_key;
  uint16_t* slot_pos;
};

// A tile of a large segment: its segment, rank in it, first vector and element range.
struct Tile {
  int64_t seg, rank, tiles, vec0, begin, end;
  int64_t first_index;  // index of position 0 of the tile (may lie before `begin`)
  int64_t slot;         // first entry of its slot
  int64_t cap;
};

template <class KT>
__device__ __forceinline__ Tile tile_of(const Input& in, const PlanView& p, int64_t t) {
  const int64_t lo = p.tile_seg[t];
  Tile tl;
  tl.seg = lo;
  tl.rank = t - p.lg_tile_first[lo];
  tl.tiles = p.lg_tile_first[lo + 1] - p.lg_tile_first[lo];
  tl.begin = p.lg_begin[lo];
  tl.end = p.lg_end[lo];
  tl.vec0 = (tl.begin + in.shift) / KT::kVec + tl.rank * KT::kTileVectors;
  tl.first_index = tl.vec0 * KT::kVec - in.shift;
  tl.cap = p.lg_cap[lo];
  tl.slot = p.lg_slot_base[lo] + tl.rank * tl.cap;
  return tl;
}

// ---------------------------------------------------------------------------------------------
// Register tiles (first_pass): warp w holds vectors [w * kRows * 32, (w + 1) * kRows * 32) of the
// tile, row r of it in lanes 0..31, so index order is (warp, row, lane, element) and every row is
// one coalesced 512-byte load.

template <class KT>
struct RegTile {
  uint32_t key[KT::kRows][KT::kVec];
  int64_t first;  // index of this thread's row-0 element 0
  __device__ __forceinline__ int64_t index(int r, int j) const { return first + (r * 32) * KT::kVec + j; }
};

template <class KT>
__device__ __forceinline__ void load_tile(const Input& in, int64_t vec0, int64_t begin, int64_t end, RegTile<KT>& tile) {
  const int64_t v0 = vec0 + static_cast<int64_t>(warp_id()) * KT::kRows * 32 + lane_id();
  tile.first = v0 * KT::kVec - in.shift;
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r) {
    const int64_t first = tile.index(r, 0);
    if (first + KT::kVec > begin && first < end) {
      load_vector<KT>(in, v0 + r * 32, tile.key[r]);
    } else {
#pragma unroll
      for (int j = 0; j < KT::kVec; ++j) tile.key[r][j] = 0;
    }
  }
}

// Block-wide ranks, in index order, of the flagged elements of a register tile: element (r, j) of
// this thread, if flagged, has rank row_base[r] + (flagged elements before j in its row). Returns the
// number flagged in the block. `scratch`: kWarps shared values.
template <class KT>
__device__ __forceinline__ uint32_t block_rank(const uint32_t (&flags)[KT::kRows], uint32_t (&row_base)[KT::kRows],
                                               uint32_t* scratch) {
  uint32_t carry = 0;
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r) {
    uint32_t row_total;
    row_base[r] = carry + warp_exclusive_sum(static_cast<uint32_t>(__popc(flags[r])), row_total);
    carry += row_total;
  }
  uint32_t total;
  const uint32_t below = block_exclusive_over_warps(carry, scratch, total);
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r) row_base[r] += below;
  return total;
}

__device__ __forceinline__ uint32_t rank_in_row(uint32_t flags, int j) {
  return static_cast<uint32_t>(__popc(flags & ((1u << j) - 1u)));
}

// flags[r] bit j: element (r, j) lies in [begin, end) and pick(key, r, j) holds.
template <class KT, class Pick>
__device__ __forceinline__ void flag_tile(const RegTile<KT>& tile, int64_t begin, int64_t end,
                                          uint32_t (&flags)[KT::kRows], Pick&& pick) {
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r) {
    flags[r] = 0;
#pragma unroll
    for (int j = 0; j < KT::kVec; ++j) {
      const int64_t i = tile.index(r, j);
      if (i >= begin && i < end && pick(tile.key[r][j], r, j)) flags[r] |= 1u << j;
    }
  }
}

// Calls put(rank, r, j) for every flagged element, rank from block_rank's row_base.
template <class KT, class Put>
__device__ __forceinline__ void for_flagged(const uint32_t (&flags)[KT::kRows], const uint32_t (&row_base)[KT::kRows],
                                            Put&& put) {
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r)
#pragma unroll
    for (int j = 0; j < KT::kVec; ++j)
      if ((flags[r] >> j) & 1u) put(row_base[r] + rank_in_row(flags[r], j), r, j);
}

struct Shared {
  uint32_t hist[2048];
  uint32_t scratch[kWarps];
  int64_t scratch64[kWarps];
  BinChoice answer[2];
  int last;
};

// The shared histogram of digit L over the tile's elements in [begin, end) whose higher digits equal
// `prefix` (all of them at level 0).
template <class KT, int L>
__device__ __forceinline__ void tile_histogram(const RegTile<KT>& tile, int64_t begin, int64_t end, uint32_t prefix,
                                               Shared& sh) {
  for (int b = static_cast<int>(threadIdx.x); b < KT::template bins<L>(); b += kThreads) sh.hist[b] = 0;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r)
#pragma unroll
    for (int j = 0; j < KT::kVec; ++j) {
      const int64_t i = tile.index(r, j);
      const uint32_t key = tile.key[r][j];
      if (i >= begin && i < end && (L == 0 || (key >> KT::template shift<(L > 0 ? L - 1 : 0)>()) == prefix))
        atomicAdd(&sh.hist[KT::template digit<L>(key)], 1u);
    }
  __syncthreads();
}

// One level of a small segment's select: the bin of digit L holding the need-th largest key among
// those sharing the digits resolved so far.
template <class KT, int L>
__device__ __forceinline__ void small_level(const RegTile<KT>& tile, int64_t begin, int64_t end, uint32_t& prefix,
                                            int64_t& need, Shared& sh) {
  tile_histogram<KT, L>(tile, begin, end, prefix, sh);
  const int64_t needs[1] = {need};
  BinChoice c[1];
  block_choose_bins<KT::template bins<L>()>([&](int b) { return sh.hist[b]; }, needs, c, sh.scratch64, sh.answer);
  prefix = (prefix << KT::template width<L>()) | c[0].bin;
  need = c[0].need;
}

// A whole small segment in one block: its keys in registers, each digit resolved from a shared
// histogram, then the winners written in index order.
template <class KT>
__device__ void small_segment(const Input& in, int64_t begin, int64_t end, int64_t k, int64_t index_base, int64_t* out,
                              Shared& sh) {
  RegTile<KT> tile;
  load_tile<KT>(in, (begin + in.shift) / KT::kVec, begin, end, tile);
  uint32_t thr = 0;
  int64_t take = k;
  small_level<KT, 0>(tile, begin, end, thr, take, sh);
  if constexpr (KT::kLevels > 1) small_level<KT, 1>(tile, begin, end, thr, take, sh);
  if constexpr (KT::kLevels > 2) small_level<KT, 2>(tile, begin, end, thr, take, sh);
  // thr is now the threshold key T, take the number of keys equal to T to select (the first ones).
  uint32_t tie[KT::kRows], sel[KT::kRows], base[KT::kRows];
  flag_tile<KT>(tile, begin, end, tie, [&](uint32_t key, int, int) { return key == thr; });
  block_rank<KT>(tie, base, sh.scratch);
  flag_tile<KT>(tile, begin, end, sel, [&](uint32_t key, int r, int j) {
    return key > thr || (((tie[r] >> j) & 1u) && base[r] + rank_in_row(tie[r], j) < take);
  });
  block_rank<KT>(sel, base, sh.scratch);
  for_flagged<KT>(sel, base, [&](uint32_t rank, int r, int j) { out[rank] = index_base + tile.index(r, j); });
}

// The first pass over a tile of a large segment.
template <class KT>
__device__ void large_tile_first_pass(const Input& in, const PlanView& p, const WorkView& w, int64_t t, Shared& sh) {
  constexpr int kBins = KT::template bins<0>();
  const Tile tl = tile_of<KT>(in, p, t);
  RegTile<KT> tile;
  load_tile<KT>(in, tl.vec0, tl.begin, tl.end, tile);
  tile_histogram<KT, 0>(tile, tl.begin, tl.end, 0u, sh);
  uint32_t* seg_hist = w.hist[0] + tl.seg * kBins;
  for (int b = static_cast<int>(threadIdx.x); b < kBins; b += kThreads)
    if (sh.hist[b] != 0) atomicAdd(seg_hist + b, sh.hist[b]);
  // The slot keeps the bins from the one holding the tile's quota-th largest key up, but no more
  // than cap elements: not below the bin after the one holding the (cap + 1)-th largest.
  const int64_t lo = tl.begin > tl.first_index ? tl.begin : tl.first_index;
  const int64_t hi = tl.end < tl.first_index + KT::kTile ? tl.end : tl.first_index + KT::kTile;
  const int64_t valid = hi - lo;
  const bool over_cap = valid > tl.cap;
  const int64_t needs[2] = {p.lg_quota[tl.seg] < valid ? p.lg_quota[tl.seg] : valid, over_cap ? tl.cap + 1 : 1};
  BinChoice c[2];
  block_choose_bins<kBins>([&](int b) { return sh.hist[b]; }, needs, c, sh.scratch64, sh.answer);
  const int by_quota = static_cast<int>(c[0].bin);
  const int by_cap = over_cap ? static_cast<int>(c[1].bin) + 1 : 0;
  const int local_bin = by_quota > by_cap ? by_quota : by_cap;
  uint32_t keep[KT::kRows], base[KT::kRows];
  flag_tile<KT>(tile, tl.begin, tl.end, keep,
                [&](uint32_t key, int, int) { return static_cast<int>(KT::template digit<0>(key)) >= local_bin; });
  const uint32_t kept = block_rank<KT>(keep, base, sh.scratch);
  for_flagged<KT>(keep, base, [&](uint32_t rank, int r, int j) {
    w.slot_key[tl.slot + rank] = tile.key[r][j];
    w.slot_pos[tl.slot + rank] = static_cast<uint16_t>(tile.index(r, j) - tl.first_index);
  });
  if (threadIdx.x == 0) {
    w.tile_local[t] = local_bin;
    w.tile_count[t] = kept;
  }
  // The last block of the segment picks the top bin from the segment's histogram.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    sh.last = atomicAdd(w.done + tl.seg * kDoneCounters, 1u) == static_cast<uint32_t>(tl.tiles - 1);
  __syncthreads();
  if (sh.last) {
    __threadfence();
    const int64_t k[1] = {p.lg_k[tl.seg]};
    BinChoice top[1];
    block_choose_bins<kBins>([&](int b) { return __ldcg(seg_hist + b); }, k, top, sh.scratch64, sh.answer);
    if (threadIdx.x == 0) {
      w.seg_top[tl.seg] = top[0].bin;
      w.seg_prefix[tl.seg] = top[0].bin;
      w.seg_need[tl.seg] = top[0].need;
    }
  }
}

template <class KT>
__global__ void __launch_bounds__(kThreads, 2)
    first_pass_kernel(Input in, PlanView p, WorkView w, int64_t index_base, int64_t* out) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  if (b < p.num_tiles) {
    large_tile_first_pass<KT>(in, p, w, b, sh);
    return;
  }
  const int64_t g = b - p.num_tiles;
  for (int64_t s = p.group_first[g]; s < p.group_first[g + 1]; ++s) {
    small_segment<KT>(in, p.sm_begin[s], p.sm_end[s], p.sm_k[s], index_base, out + p.sm_out[s], sh);
    __syncthreads();  // the next segment reuses the shared histogram
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-per-tile passes. A tile's elements are visited in index order, 32 at a time from its slot
// (one per lane) or kBatch x 32 vectors at a time from the data (loads issued before use).

constexpr int kBatch = 4;

// Calls visit(keys, first, flags_valid) for every vector of an incomplete tile: keys[j] is the key of
// element first + j, valid where bit j of flags_valid is set. Every lane calls it the same number of
// times (warp collectives may be used inside).
template <class KT, class Visit>
__device__ __forceinline__ void for_tile_vectors(const Input& in, const Tile& tl, Visit&& visit) {
  for (int base = 0; base < KT::kTileVectors; base += kBatch * 32) {
    uint32_t key[kBatch][KT::kVec];
    int64_t first[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t v = tl.vec0 + base + u * 32 + lane_id();
      first[u] = v * KT::kVec - in.shift;
      if (first[u] + KT::kVec > tl.begin && first[u] < tl.end) {
        load_vector<KT>(in, v, key[u]);
      } else {
#pragma unroll
        for (int j = 0; j < KT::kVec; ++j) key[u][j] = 0;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      uint32_t valid = 0;
#pragma unroll
      for (int j = 0; j < KT::kVec; ++j)
        if (first[u] + j >= tl.begin && first[u] + j < tl.end) valid |= 1u << j;
      visit(key[u], first[u], valid);
    }
  }
}

// A slot entry as a lane holds it: key and position in the tile, loaded ahead of use.
using SlotKey = Prefetched<uint32_t>;
using SlotPos = Prefetched<uint16_t>;

// Calls visit(key, pos, has) for the entries of a complete tile's slot in order, 32 at a time (kBatch
// x 32 loaded before use); `has` is false past the last entry. Every lane calls it the same number
// of times. An entry may be overwritten by visit at an index at most its own: a __syncwarp orders
// every lane's loads of the batch before any lane's visit (the ballots inside visits synchronise
// execution but order no memory, and the compiler may sink a load to its first use).
template <class Visit>
__device__ __forceinline__ void for_slot_entries(const WorkView& w, const Tile& tl, uint32_t count, Visit&& visit) {
  for (uint32_t c = 0; c < count; c += kBatch * 32) {
    SlotKey key[kBatch];
    SlotPos pos[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const uint32_t i = c + u * 32 + lane_id();
      if (i < count) {
        key[u].load(w.slot_key + tl.slot + i);
        pos[u].load(w.slot_pos + tl.slot + i);
      } else {
        key[u].set(0);
        pos[u].set(0);
      }
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kBatch; ++u) visit(key[u], pos[u], c + u * 32 + lane_id() < count);
  }
}

// Signals that this warp finished its tile; true in every lane of the warp that finished the
// segment's last tile.
__device__ __forceinline__ bool warp_finished_last(uint32_t* counter, int64_t tiles) {
  __threadfence();
  __syncwarp();
  uint32_t last = 0;
  if (lane_id() == 0) last = atomicAdd(counter, 1u) == static_cast<uint32_t>(tiles - 1);
  last = __shfl_sync(kFullMask, last, 0);
  if (last) __threadfence();
  return last != 0;
}

// Digit L (>= 1) of the keys whose higher digits equal the segment's prefix, into the segment's
// histogram; level 1 also compacts a complete tile's slot to the keys whose top digit is at least
// the segment's top bin (the winners above it and the candidates in it).
template <class KT, int L>
__global__ void __launch_bounds__(kThreads) refine_kernel(Input in, PlanView p, WorkView w) {
  static_assert(L >= 1 && L < KT::kLevels);
  constexpr int kBins = KT::template bins<L>();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id();
  if (t >= p.num_tiles) return;  // a whole warp; no block-wide barrier below
  const Tile tl = tile_of<KT>(in, p, t);
  const uint32_t top = w.seg_top[tl.seg];
  const uint32_t prefix = w.seg_prefix[tl.seg];
  uint32_t* seg_hist = w.hist[L] + tl.seg * kBins;
  auto in_running = [&](uint32_t key) { return (key >> KT::template shift<L - 1>()) == prefix; };
  if (w.tile_local[t] <= static_cast<int32_t>(top)) {
    const uint32_t count = w.tile_count[t];
    uint32_t kept = 0;
    for_slot_entries(w, tl, count, [&](const SlotKey& key, const SlotPos& pos, bool has) {
      if (has && in_running(key.get())) atomicAdd(seg_hist + KT::template digit<L>(key.get()), 1u);
      if constexpr (L == 1) {
        // In place: entry i moves to kept + (kept entries before it in this chunk) <= i, and every
        // lane's loads of the batch precede the stores (the __syncwarp in for_slot_entries).
        const bool keep = has && KT::template digit<0>(key.get()) >= top;
        const unsigned ballot = __ballot_sync(kFullMask, keep);
        if (keep) {
          const uint32_t e = kept + static_cast<uint32_t>(__popc(ballot & lanes_below()));
          w.slot_key[tl.slot + e] = key.get();
          w.slot_pos[tl.slot + e] = pos.get();
        }
        kept += static_cast<uint32_t>(__popc(ballot));
      }
    });
    if (L == 1 && lane_id() == 0) w.tile_count[t] = kept;
  } else {
    for_tile_vectors<KT>(in, tl, [&](const uint32_t(&key)[KT::kVec], int64_t, uint32_t valid) {
#pragma unroll
      for (int j = 0; j < KT::kVec; ++j)
        if (((valid >> j) & 1u) && in_running(key[j])) atomicAdd(seg_hist + KT::template digit<L>(key[j]), 1u);
    });
  }
  if (warp_finished_last(w.done + tl.seg * kDoneCounters + L, tl.tiles)) {
    const BinChoice c = warp_choose_bin<kBins>([&](int b) { return __ldcg(seg_hist + b); }, w.seg_need[tl.seg]);
    if (lane_id() == 0) {
      w.seg_prefix[tl.seg] = (prefix << KT::template width<L>()) | c.bin;
      w.seg_need[tl.seg] = c.need;
    }
  }
}

// Keys above and equal to the threshold T per tile; then, for every segment whose last tile this
// block counted, the whole block turns the tiles' counts into output offsets and ties taken:
// with gt/eq the tiles' counts before tile t (in index order), tile t takes
// min(eq_t, max(0, need - eq_before)) ties and starts at gt_before + min(eq_before, need).
template <class KT>
__global__ void __launch_bounds__(kThreads) count_kernel(Input in, PlanView p, WorkView w) {
  __shared__ int64_t finished[kWarps];
  __shared__ uint64_t scratch[kWarps];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id();
  int64_t done_seg = -1;
  if (t < p.num_tiles) {
    const Tile tl = tile_of<KT>(in, p, t);
    const uint32_t thr = w.seg_prefix[tl.seg];
    uint32_t gt = 0, eq = 0;
    if (w.tile_local[t] <= static_cast<int32_t>(w.seg_top[tl.seg])) {
      for_slot_entries(w, tl, w.tile_count[t], [&](const SlotKey& key, const SlotPos&, bool has) {
        gt += has && key.get() > thr;
        eq += has && key.get() == thr;
      });
    } else {
      for_tile_vectors<KT>(in, tl, [&](const uint32_t(&key)[KT::kVec], int64_t, uint32_t valid) {
#pragma unroll
        for (int j = 0; j < KT::kVec; ++j) {
          gt += ((valid >> j) & 1u) && key[j] > thr;
          eq += ((valid >> j) & 1u) && key[j] == thr;
        }
      });
    }
    gt = warp_sum(gt);
    eq = warp_sum(eq);
    if (lane_id() == 0) {
      w.tile_gt[t] = gt;
      w.tile_eq[t] = eq;
    }
    if (warp_finished_last(w.done + tl.seg * kDoneCounters + 3, tl.tiles)) done_seg = tl.seg;
  }
  if (lane_id() == 0) finished[warp_id()] = done_seg;
  __syncthreads();
  for (int i = 0; i < kWarps; ++i) {
    const int64_t s = finished[i];
    if (s < 0) continue;
    __threadfence();
    const int64_t t0 = p.lg_tile_first[s], tiles = p.lg_tile_first[s + 1] - t0;
    const int64_t need = w.seg_need[s];
    const int64_t per = (tiles + kThreads - 1) / kThreads;
    const int64_t a = t0 + threadIdx.x * per;
    const int64_t b = a + per < t0 + tiles ? a + per : t0 + tiles;
    // Counts of a segment fit 32 bits each (the glue checks the size), so one 64-bit scan
    // carries both: gt in the high half, eq in the low half.
    uint64_t mine = 0;
    for (int64_t u = a; u < b; ++u)
      mine += (static_cast<uint64_t>(__ldcg(w.tile_gt + u)) << 32) | __ldcg(w.tile_eq + u);
    uint64_t total;
    const uint64_t before = block_exclusive_sum(mine, scratch, total);
    int64_t gt_before = static_cast<int64_t>(before >> 32), eq_before = static_cast<int64_t>(before & 0xffffffffu);
    for (int64_t u = a; u < b; ++u) {
      const int64_t gt = __ldcg(w.tile_gt + u), eq = __ldcg(w.tile_eq + u);
      const int64_t left = need - eq_before > 0 ? need - eq_before : 0;
      w.tile_take[u] = static_cast<uint32_t>(eq < left ? eq : left);
      w.tile_out[u] = gt_before + (eq_before < need ? eq_before : need);
      gt_before += gt;
      eq_before += eq;
    }
  }
}

// The winners of each tile, in index order: keys above T, and the first `take` keys equal to T.
template <class KT>
__global__ void __launch_bounds__(kThreads)
    write_kernel(Input in, PlanView p, WorkView w, int64_t index_base, int64_t* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id();
  if (t >= p.num_tiles) return;
  const Tile tl = tile_of<KT>(in, p, t);
  const uint32_t thr = w.seg_prefix[tl.seg];
  const uint32_t take = w.tile_take[t];
  int64_t* dst = out + p.lg_out[tl.seg] + w.tile_out[t];
  const int64_t first = index_base + tl.first_index;
  uint32_t ties = 0, written = 0;  // ties seen and indices written by the chunks before
  if (w.tile_local[t] <= static_cast<int32_t>(w.seg_top[tl.seg])) {
    for_slot_entries(w, tl, w.tile_count[t], [&](const SlotKey& key, const SlotPos& pos, bool has) {
      const bool tie = has && key.get() == thr;
      const unsigned tie_ballot = __ballot_sync(kFullMask, tie);
      const bool sel = (has && key.get() > thr) || (tie && ties + __popc(tie_ballot & lanes_below()) < take);
      const unsigned sel_ballot = __ballot_sync(kFullMask, sel);
      if (sel) dst[written + __popc(sel_ballot & lanes_below())] = first + pos.get();
      ties += __popc(tie_ballot);
      written += __popc(sel_ballot);
    });
  } else {
    for_tile_vectors<KT>(in, tl, [&](const uint32_t(&key)[KT::kVec], int64_t at, uint32_t valid) {
      uint32_t tie = 0, sel = 0;
#pragma unroll
      for (int j = 0; j < KT::kVec; ++j)
        if (((valid >> j) & 1u) && key[j] == thr) tie |= 1u << j;
      uint32_t tie_total;
      const uint32_t tie_base = ties + warp_exclusive_sum(static_cast<uint32_t>(__popc(tie)), tie_total);
#pragma unroll
      for (int j = 0; j < KT::kVec; ++j) {
        const bool above = ((valid >> j) & 1u) && key[j] > thr;
        if (above || (((tie >> j) & 1u) && tie_base + rank_in_row(tie, j) < take)) sel |= 1u << j;
      }
      uint32_t sel_total;
      const uint32_t sel_base = written + warp_exclusive_sum(static_cast<uint32_t>(__popc(sel)), sel_total);
#pragma unroll
      for (int j = 0; j < KT::kVec; ++j)
        if ((sel >> j) & 1u) dst[sel_base + rank_in_row(sel, j)] = index_base + at + j;
      ties += tie_total;
      written += sel_total;
    });
  }
}

// The whole launch sequence on `stream`. `plan_device` is plan.data on the device, `workspace`
// plan.workspace.bytes bytes (any content). Returns the first launch error.
template <class KT>
cudaError_t launch(const void* values, int64_t n, const TopkPlan& plan, const int64_t* plan_device, void* workspace,
                   int64_t index_base, int64_t* out, cudaStream_t stream) {
  const PlanLayout& L = plan.layout;
  const WorkspaceLayout& W = plan.workspace;
  const int64_t* d = plan_device;
  const int64_t elem = 16 / KT::kVec;
  const int64_t shift = vector_shift(values, KT::kVec);
  const Input in{values, reinterpret_cast<const uint4*>(static_cast<const char*>(values) - shift * elem), n, shift};
  const PlanView p{L.num_large,      L.num_tiles,       d + L.sm_begin,     d + L.sm_end,
                   d + L.sm_k,       d + L.sm_out,      d + L.group_first,  d + L.lg_begin,
                   d + L.lg_end,     d + L.lg_k,        d + L.lg_out,       d + L.lg_tile_first,
                   d + L.lg_slot_base, d + L.lg_cap,    d + L.lg_quota,     d + L.tile_seg};
  char* ws = static_cast<char*>(workspace);
  const WorkView w{{reinterpret_cast<uint32_t*>(ws + W.hist[0]), reinterpret_cast<uint32_t*>(ws + W.hist[1]),
                    reinterpret_cast<uint32_t*>(ws + W.hist[2])},
                   reinterpret_cast<uint32_t*>(ws + W.done),
                   reinterpret_cast<uint32_t*>(ws + W.seg_top),
                   reinterpret_cast<uint32_t*>(ws + W.seg_prefix),
                   reinterpret_cast<int64_t*>(ws + W.seg_need),
                   reinterpret_cast<int32_t*>(ws + W.tile_local),
                   reinterpret_cast<uint32_t*>(ws + W.tile_count),
                   reinterpret_cast<uint32_t*>(ws + W.tile_gt),
                   reinterpret_cast<uint32_t*>(ws + W.tile_eq),
                   reinterpret_cast<uint32_t*>(ws + W.tile_take),
                   reinterpret_cast<int64_t*>(ws + W.tile_out),
                   reinterpret_cast<uint32_t*>(ws + W.slot_key),
                   reinterpret_cast<uint16_t*>(ws + W.slot_pos)};
  cudaError_t err = cudaSuccess;
  auto check = [&err](cudaError_t e) {
    if (err == cudaSuccess) err = e;
  };
  if (L.num_large > 0) check(memset_async(workspace, 0, static_cast<size_t>(W.zeroed_bytes), stream));
  const auto first_blocks = static_cast<unsigned>(L.num_tiles + L.num_groups);
  if (first_blocks > 0)
    check(launch_kernel(first_pass_kernel<KT>, first_blocks, kThreads, stream, in, p, w, index_base, out));
  if (L.num_large > 0) {
    const auto warp_blocks = static_cast<unsigned>((L.num_tiles + kWarps - 1) / kWarps);
    check(launch_kernel(refine_kernel<KT, 1>, warp_blocks, kThreads, stream, in, p, w));
    if constexpr (KT::kLevels > 2) check(launch_kernel(refine_kernel<KT, 2>, warp_blocks, kThreads, stream, in, p, w));
    check(launch_kernel(count_kernel<KT>, warp_blocks, kThreads, stream, in, p, w));
    check(launch_kernel(write_kernel<KT>, warp_blocks, kThreads, stream, in, p, w, index_base, out));
  }
  return err;
}

}  // namespace deft_kernels::cuda::topk
