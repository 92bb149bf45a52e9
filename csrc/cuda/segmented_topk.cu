// CUDA segmented top-k: radix select on the magnitude key, every segment of a worker's bin in one
// launch sequence. Same semantics as the CPU op (csrc/cpu/segmented_topk.cpp): key = bit pattern of
// |x| (NaN above +inf, -0 ties +0), exactly k per segment, ties to the lower index, output
// ascending within a segment and segments in list order.
//
// STATUS: compiled (nvcc -std=c++20 -arch=sm_90, tests/test_cuda_compile.py) but NEVER RUN: it was
// written on a machine without a GPU. tests/test_gpu.py checks it against the reference on the
// first machine with one; until then treat it as untested.
//
// Plan (topk_plan.h): small segments (<= kTile elements) are packed into groups, one block per
// group; a block selects each of its segments alone (the segment stays in L1/L2 across passes).
// Large segments are cut into tiles of kTile elements, one block per tile:
//   1. hist<0>: every tile adds the histogram of its keys' top digit (11 bits for fp32) into its
//      segment's histogram; choose<0> (one block per segment) finds the digit holding the k-th
//      largest key, and whether that digit's elements fit the segment's candidate buffer.
//   2. gather: every tile counts its keys whose top digit is above the chosen one (all selected),
//      and appends the keys of the chosen digit, the candidates, with their positions.
//   3. hist<l>/choose<l> for the lower digits read only the candidates (heavy ties that overflow
//      the buffer: re-scan the segment's tiles with a prefix filter instead). The prefix is then
//      the threshold key T and `need` the number of keys equal to T to take.
//   4. count: per tile, keys above T and keys equal to T (from the candidates, with atomics into
//      the tiles' counters, or by re-scanning); scan (one block per segment): each tile's output
//      offset and how many ties it takes, the lower tiles first; write: each tile writes its
//      selected positions in index order (block scans).
// Passes over a large segment's data: hist<0>, gather and write (three reads), plus the reads of
// the candidates, which are a few percent of the data for a typical gradient.
#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/segmented_topk.cuh"

namespace deft_kernels::cuda {
namespace {

struct Key32 {
  using Raw = uint32_t;
  static constexpr int kLevels = 3;
  __host__ __device__ static constexpr int shift(int level) { return level == 0 ? 20 : (level == 1 ? 10 : 0); }
  __host__ __device__ static constexpr int width(int level) { return level == 0 ? 11 : 10; }
  __device__ static uint32_t of(Raw r) { return r & 0x7fffffffu; }
};

struct Key16 {
  using Raw = uint16_t;
  static constexpr int kLevels = 2;
  __host__ __device__ static constexpr int shift(int level) { return level == 0 ? 7 : 0; }
  __host__ __device__ static constexpr int width(int level) { return level == 0 ? 8 : 7; }
  __device__ static uint32_t of(Raw r) { return static_cast<uint32_t>(r) & 0x7fffu; }
};

template <class KT>
__device__ __forceinline__ uint32_t load_key(const typename KT::Raw* x, int64_t i) {
  return KT::of(__ldg(x + i));
}

template <class KT>
__device__ __forceinline__ uint32_t digit(uint32_t key, int level) {
  return (key >> KT::shift(level)) & ((1u << KT::width(level)) - 1u);
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Device views of the plan (topk_plan.h) and of the workspace.
struct Plan {
  int64_t num_large;
  const int64_t *sm_begin, *sm_end, *sm_k, *sm_out, *group_first;
  const int64_t *lg_begin, *lg_end, *lg_k, *lg_out, *lg_tile_first, *lg_cap, *lg_cand_base, *tile_seg;
};

struct Work {
  unsigned long long* hist;
  unsigned long long* cand_count;
  int* tile_gt;
  int* tile_eq;
  uint32_t* prefix;
  int64_t* need;
  int* mode;
  int* tile_take;
  int64_t* tile_out;
  uint32_t* cand_key;
  int64_t* cand_pos;
};

using ScanI64 = cub::BlockScan<int64_t, kThreads>;

struct BinChoice {
  uint32_t bin;  // the digit holding the need-th largest key
  int64_t need;  // how many keys of that digit are still to take, 1 <= need <= count[bin]
};

// Block-wide: the digit of `hist` (bins counters, shared or global) holding the need-th largest
// key, 1 <= need <= sum(hist). Thread t sums a run of digits from the top; a scan of the run sums
// tells the one thread whose run holds the answer, which walks its run.
template <class Count>
__device__ BinChoice choose_bin(const Count* hist, int bins, int64_t need, ScanI64::TempStorage& scan,
                                BinChoice& result) {
  const int per = (bins + kThreads - 1) / kThreads;
  const int r0 = static_cast<int>(threadIdx.x) * per;  // rank from the top
  const int r1 = r0 + per < bins ? r0 + per : bins;
  int64_t mine = 0;
  for (int r = r0; r < r1; ++r) mine += static_cast<int64_t>(hist[bins - 1 - r]);
  int64_t above;
  ScanI64(scan).ExclusiveSum(mine, above);
  if (above < need && above + mine >= need) {
    for (int r = r0; r < r1; ++r) {
      const int64_t c = static_cast<int64_t>(hist[bins - 1 - r]);
      if (above + c >= need) {
        result = BinChoice{static_cast<uint32_t>(bins - 1 - r), need - above};
        break;
      }
      above += c;
    }
  }
  __syncthreads();
  const BinChoice out = result;
  __syncthreads();  // `result` and `scan` may be reused by the caller
  return out;
}

template <class KT>
using LoadRaw = cub::BlockLoad<typename KT::Raw, kThreads, kItems, cub::BLOCK_LOAD_TRANSPOSE>;

template <class KT>
union WriteStorage {
  typename LoadRaw<KT>::TempStorage load;
  ScanI64::TempStorage scan;
};

// Block-wide: writes index_base + i for every i in [begin, end) with key > thr, and for the first
// `take` (in index order) with key == thr, to out[0, ...) ascending. Each thread owns kItems
// consecutive elements of a chunk (blocked arrangement, loaded coalesced through shared memory);
// two block scans give each thread its tie rank and its output offset.
template <class KT>
__device__ void ordered_write(const typename KT::Raw* x, int64_t begin, int64_t end, uint32_t thr, int64_t take,
                              int64_t* out, int64_t index_base, WriteStorage<KT>& smem) {
  int64_t eq_carry = 0, out_carry = 0;
  for (int64_t c = begin; c < end; c += kChunk) {
    const int valid = static_cast<int>(imin(kChunk, end - c));
    typename KT::Raw raw[kItems];
    LoadRaw<KT>(smem.load).Load(x + c, raw, valid, typename KT::Raw(0));
    __syncthreads();
    const int first = static_cast<int>(threadIdx.x) * kItems;  // offset of this thread's items in the chunk
    int64_t eq_n = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (first + i < valid && KT::of(raw[i]) == thr) ++eq_n;
    int64_t eq_before, eq_total;
    ScanI64(smem.scan).ExclusiveSum(eq_n, eq_before, eq_total);
    __syncthreads();
    int64_t tie_rank = eq_carry + eq_before;
    uint32_t selected = 0;
    int64_t sel_n = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (first + i >= valid) continue;
      const uint32_t key = KT::of(raw[i]);
      bool take_it = key > thr;
      if (key == thr) take_it = tie_rank++ < take;
      if (take_it) {
        selected |= 1u << i;
        ++sel_n;
      }
    }
    int64_t sel_before, sel_total;
    ScanI64(smem.scan).ExclusiveSum(sel_n, sel_before, sel_total);
    __syncthreads();
    int64_t w = out_carry + sel_before;
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (selected & (1u << i)) out[w++] = index_base + c + first + i;
    eq_carry += eq_total;
    out_carry += sel_total;
  }
}

// ---------------------------------------------------------------------------------------------
// Small segments: one block per group, the whole select per segment.

template <class KT>
__global__ void __launch_bounds__(kThreads)
    small_select_kernel(const typename KT::Raw* x, Plan p, int64_t index_base, int64_t* out) {
  __shared__ int hist[kMaxBins];
  __shared__ ScanI64::TempStorage scan;
  __shared__ BinChoice choice;
  __shared__ WriteStorage<KT> ws;
  const int64_t g = blockIdx.x;
  for (int64_t s = p.group_first[g]; s < p.group_first[g + 1]; ++s) {
    const int64_t begin = p.sm_begin[s], end = p.sm_end[s];
    uint32_t prefix = 0;
    int64_t need = p.sm_k[s];
    for (int level = 0; level < KT::kLevels; ++level) {
      const int bins = 1 << KT::width(level);
      for (int b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0;
      __syncthreads();
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
        const uint32_t key = load_key<KT>(x, i);
        if (level == 0 || (key >> KT::shift(level - 1)) == prefix) atomicAdd(&hist[digit<KT>(key, level)], 1);
      }
      __syncthreads();
      const BinChoice c = choose_bin(hist, bins, need, scan, choice);
      prefix = (prefix << KT::width(level)) | c.bin;
      need = c.need;
    }
    ordered_write<KT>(x, begin, end, prefix, need, out + p.sm_out[s], index_base, ws);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Large segments: one block per tile, cooperating through the workspace.

struct TileInfo {
  int64_t t, s, r, tiles, begin, lo, hi;  // tile, segment, rank in segment, tiles in segment, ranges
};

__device__ __forceinline__ TileInfo tile_info(const Plan& p) {
  TileInfo i;
  i.t = blockIdx.x;
  i.s = p.tile_seg[i.t];
  i.r = i.t - p.lg_tile_first[i.s];
  i.tiles = p.lg_tile_first[i.s + 1] - p.lg_tile_first[i.s];
  i.begin = p.lg_begin[i.s];
  i.lo = i.begin + i.r * kTile;
  i.hi = imin(p.lg_end[i.s], i.lo + kTile);
  return i;
}

// The share of its segment's candidates a tile's block works on: [lo, hi).
__device__ __forceinline__ void candidate_range(const Plan& p, const Work& w, const TileInfo& ti, int64_t& lo,
                                                int64_t& hi) {
  const int64_t per = (p.lg_cap[ti.s] + ti.tiles - 1) / ti.tiles;
  lo = ti.r * per;
  hi = imin(static_cast<int64_t>(w.cand_count[ti.s]), lo + per);
}

template <class KT, int LEVEL>
__global__ void __launch_bounds__(kThreads) large_hist_kernel(const typename KT::Raw* x, Plan p, Work w) {
  constexpr int bins = 1 << KT::width(LEVEL);
  __shared__ unsigned int hist[bins];
  for (int b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0;
  __syncthreads();
  const TileInfo ti = tile_info(p);
  const uint32_t prefix = LEVEL > 0 ? w.prefix[ti.s] : 0u;
  if (LEVEL > 0 && w.mode[ti.s] == kModeCandidates) {
    int64_t lo, hi;
    candidate_range(p, w, ti, lo, hi);
    const uint32_t* keys = w.cand_key + p.lg_cand_base[ti.s];
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const uint32_t key = keys[i];
      if ((key >> KT::shift(LEVEL > 0 ? LEVEL - 1 : 0)) == prefix) atomicAdd(&hist[digit<KT>(key, LEVEL)], 1u);
    }
  } else {
    for (int64_t i = ti.lo + threadIdx.x; i < ti.hi; i += kThreads) {
      const uint32_t key = load_key<KT>(x, i);
      if (LEVEL == 0 || (key >> KT::shift(LEVEL > 0 ? LEVEL - 1 : 0)) == prefix)
        atomicAdd(&hist[digit<KT>(key, LEVEL)], 1u);
    }
  }
  __syncthreads();
  unsigned long long* g = w.hist + (LEVEL * p.num_large + ti.s) * kMaxBins;
  for (int b = threadIdx.x; b < bins; b += kThreads)
    if (hist[b] != 0) atomicAdd(g + b, static_cast<unsigned long long>(hist[b]));
}

template <class KT, int LEVEL>
__global__ void __launch_bounds__(kThreads) large_choose_kernel(Plan p, Work w) {
  __shared__ ScanI64::TempStorage scan;
  __shared__ BinChoice choice;
  const int64_t s = blockIdx.x;
  const unsigned long long* h = w.hist + (LEVEL * p.num_large + s) * kMaxBins;
  const int64_t need = LEVEL == 0 ? p.lg_k[s] : w.need[s];
  const BinChoice c = choose_bin(h, 1 << KT::width(LEVEL), need, scan, choice);
  if (threadIdx.x == 0) {
    const uint32_t prefix = LEVEL == 0 ? 0u : w.prefix[s];
    w.prefix[s] = (prefix << KT::width(LEVEL)) | c.bin;
    w.need[s] = c.need;
    if (LEVEL == 0)
      w.mode[s] = static_cast<int64_t>(h[c.bin]) <= p.lg_cap[s] ? kModeCandidates : kModeRescan;
  }
}

template <class KT>
__global__ void __launch_bounds__(kThreads) large_gather_kernel(const typename KT::Raw* x, Plan p, Work w) {
  using ScanInt = cub::BlockScan<int, kThreads>;
  using SumInt = cub::BlockReduce<int, kThreads>;
  __shared__ union {
    typename ScanInt::TempStorage scan;
    typename SumInt::TempStorage sum;
  } tmp;
  __shared__ unsigned long long base;
  const TileInfo ti = tile_info(p);
  const uint32_t top = w.prefix[ti.s];
  const bool gather = w.mode[ti.s] == kModeCandidates;  // the same for the whole block
  uint32_t* cand_key = w.cand_key + p.lg_cand_base[ti.s];
  int64_t* cand_pos = w.cand_pos + p.lg_cand_base[ti.s];
  int above = 0;
  for (int64_t c = ti.lo; c < ti.hi; c += kChunk) {
    uint32_t keys[kItems];
    int n_cand = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t pos = c + i * kThreads + threadIdx.x;  // striped: coalesced loads
      keys[i] = pos < ti.hi ? load_key<KT>(x, pos) : 0u;
      const uint32_t d = keys[i] >> KT::shift(0);
      if (pos < ti.hi) {
        above += d > top;
        n_cand += d == top;
      }
    }
    if (gather) {
      int offset, total;
      ScanInt(tmp.scan).ExclusiveSum(n_cand, offset, total);
      if (threadIdx.x == 0) base = total > 0 ? atomicAdd(w.cand_count + ti.s, static_cast<unsigned long long>(total)) : 0;
      __syncthreads();
      int64_t slot = static_cast<int64_t>(base) + offset;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t pos = c + i * kThreads + threadIdx.x;
        if (pos < ti.hi && (keys[i] >> KT::shift(0)) == top) {
          cand_key[slot] = keys[i];
          cand_pos[slot] = pos - ti.begin;
          ++slot;
        }
      }
      __syncthreads();  // tmp.scan and base are reused by the next chunk
    }
  }
  const int tile_above = SumInt(tmp.sum).Sum(above);
  if (threadIdx.x == 0) w.tile_gt[ti.t] = tile_above;
}

template <class KT>
__global__ void __launch_bounds__(kThreads) large_count_kernel(const typename KT::Raw* x, Plan p, Work w) {
  using SumInt = cub::BlockReduce<int, kThreads>;
  __shared__ typename SumInt::TempStorage sum;
  const TileInfo ti = tile_info(p);
  const uint32_t thr = w.prefix[ti.s];
  if (w.mode[ti.s] == kModeCandidates) {
    // tile_gt already holds the tiles' keys above the top digit; add the candidates above T.
    int64_t lo, hi;
    candidate_range(p, w, ti, lo, hi);
    const uint32_t* keys = w.cand_key + p.lg_cand_base[ti.s];
    const int64_t* pos = w.cand_pos + p.lg_cand_base[ti.s];
    const int64_t first_tile = p.lg_tile_first[ti.s];
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const uint32_t key = keys[i];
      const int64_t tile = first_tile + pos[i] / kTile;
      if (key > thr)
        atomicAdd(w.tile_gt + tile, 1);
      else if (key == thr)
        atomicAdd(w.tile_eq + tile, 1);
    }
  } else {
    int gt = 0, eq = 0;
    for (int64_t i = ti.lo + threadIdx.x; i < ti.hi; i += kThreads) {
      const uint32_t key = load_key<KT>(x, i);
      gt += key > thr;
      eq += key == thr;
    }
    gt = SumInt(sum).Sum(gt);
    __syncthreads();
    eq = SumInt(sum).Sum(eq);
    if (threadIdx.x == 0) {
      w.tile_gt[ti.t] = gt;
      w.tile_eq[ti.t] = eq;
    }
  }
}

// One block per large segment: walks its tiles in order, giving each the number of threshold ties
// it takes (the lower tiles first) and its output offset.
__global__ void __launch_bounds__(kThreads) large_scan_kernel(Plan p, Work w) {
  __shared__ ScanI64::TempStorage scan;
  const int64_t s = blockIdx.x;
  const int64_t t0 = p.lg_tile_first[s], t1 = p.lg_tile_first[s + 1];
  const int64_t need = w.need[s];
  int64_t eq_carry = 0, out_carry = 0;
  for (int64_t c = t0; c < t1; c += kThreads) {
    const int64_t t = c + threadIdx.x;
    const int64_t gt = t < t1 ? w.tile_gt[t] : 0;
    const int64_t eq = t < t1 ? w.tile_eq[t] : 0;
    int64_t eq_before, eq_total;
    ScanI64(scan).ExclusiveSum(eq, eq_before, eq_total);
    __syncthreads();
    const int64_t take = imin(eq, imax(0, need - eq_carry - eq_before));
    int64_t out_before, out_total;
    ScanI64(scan).ExclusiveSum(gt + take, out_before, out_total);
    __syncthreads();
    if (t < t1) {
      w.tile_take[t] = static_cast<int>(take);
      w.tile_out[t] = out_carry + out_before;
    }
    eq_carry += eq_total;
    out_carry += out_total;
  }
}

template <class KT>
__global__ void __launch_bounds__(kThreads)
    large_write_kernel(const typename KT::Raw* x, Plan p, Work w, int64_t index_base, int64_t* out) {
  __shared__ WriteStorage<KT> ws;
  const TileInfo ti = tile_info(p);
  ordered_write<KT>(x, ti.lo, ti.hi, w.prefix[ti.s], w.tile_take[ti.t], out + p.lg_out[ti.s] + w.tile_out[ti.t],
                    index_base, ws);
}

template <class KT, int LEVEL>
void lower_level(const typename KT::Raw* x, const Plan& p, const Work& w, unsigned tiles, unsigned segs,
                 cudaStream_t stream) {
  large_hist_kernel<KT, LEVEL><<<tiles, kThreads, 0, stream>>>(x, p, w);
  large_choose_kernel<KT, LEVEL><<<segs, kThreads, 0, stream>>>(p, w);
}

template <class KT>
cudaError_t launch(const void* values, const TopkPlan& plan, const int64_t* d, void* workspace, int64_t index_base,
                   int64_t* out, cudaStream_t stream) {
  const PlanLayout& L = plan.layout;
  const WorkspaceLayout& W = plan.workspace;
  const auto* x = static_cast<const typename KT::Raw*>(values);
  const Plan p{L.num_large,
               d + L.sm_begin, d + L.sm_end, d + L.sm_k, d + L.sm_out, d + L.group_first,
               d + L.lg_begin, d + L.lg_end, d + L.lg_k, d + L.lg_out, d + L.lg_tile_first, d + L.lg_cap,
               d + L.lg_cand_base, d + L.tile_seg};
  char* ws = static_cast<char*>(workspace);
  const Work w{reinterpret_cast<unsigned long long*>(ws + W.hist),
               reinterpret_cast<unsigned long long*>(ws + W.cand_count),
               reinterpret_cast<int*>(ws + W.tile_gt),
               reinterpret_cast<int*>(ws + W.tile_eq),
               reinterpret_cast<uint32_t*>(ws + W.prefix),
               reinterpret_cast<int64_t*>(ws + W.need),
               reinterpret_cast<int*>(ws + W.mode),
               reinterpret_cast<int*>(ws + W.tile_take),
               reinterpret_cast<int64_t*>(ws + W.tile_out),
               reinterpret_cast<uint32_t*>(ws + W.cand_key),
               reinterpret_cast<int64_t*>(ws + W.cand_pos)};
  if (L.num_groups > 0)
    small_select_kernel<KT><<<static_cast<unsigned>(L.num_groups), kThreads, 0, stream>>>(x, p, index_base, out);
  if (L.num_large > 0) {
    const auto tiles = static_cast<unsigned>(L.num_tiles);
    const auto segs = static_cast<unsigned>(L.num_large);
    cudaError_t err = cudaMemsetAsync(workspace, 0, static_cast<size_t>(W.zeroed_bytes), stream);
    if (err != cudaSuccess) return err;
    large_hist_kernel<KT, 0><<<tiles, kThreads, 0, stream>>>(x, p, w);
    large_choose_kernel<KT, 0><<<segs, kThreads, 0, stream>>>(p, w);
    large_gather_kernel<KT><<<tiles, kThreads, 0, stream>>>(x, p, w);
    if constexpr (KT::kLevels > 1) lower_level<KT, 1>(x, p, w, tiles, segs, stream);
    if constexpr (KT::kLevels > 2) lower_level<KT, 2>(x, p, w, tiles, segs, stream);
    large_count_kernel<KT><<<tiles, kThreads, 0, stream>>>(x, p, w);
    large_scan_kernel<<<segs, kThreads, 0, stream>>>(p, w);
    large_write_kernel<KT><<<tiles, kThreads, 0, stream>>>(x, p, w, index_base, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t segmented_topk_launch(KeyWidth width, const void* values, const TopkPlan& plan, const int64_t* plan_device,
                                  void* workspace, int64_t index_base, int64_t* out, cudaStream_t stream) {
  return width == KeyWidth::k32 ? launch<Key32>(values, plan, plan_device, workspace, index_base, out, stream)
                                : launch<Key16>(values, plan, plan_device, workspace, index_base, out, stream);
}

}  // namespace deft_kernels::cuda
