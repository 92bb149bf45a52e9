// Warp and block building blocks shared by the kernel headers (segmented_topk_kernels.cuh,
// accumulate_norms_kernels.cuh).
//
// The kernel headers are written in a small subset of CUDA (built-in indices, __syncthreads, warp
// shuffles and ballots, atomics, raw pointers; no CUB, no <<<>>>), plus Prefetched<T> (a register
// loaded ahead of its use), and include no CUDA header: the file that includes them provides the
// subset first. The .cu files include the CUDA runtime and
// define launch_kernel / memset_async with real launches (launch.cuh); the host tests under
// tests/cpp include a CPU emulation of the subset instead (tests/cpp/cuda_emulator.h), which is how
// the kernels' logic runs in CI on machines without a GPU.
#pragma once

#include <cstdint>

namespace deft_kernels::cuda {

constexpr int kThreads = 256;  // threads per block in every kernel
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ unsigned warp_id() { return threadIdx.x >> 5; }
__device__ __forceinline__ unsigned lanes_below() { return (1u << lane_id()) - 1u; }

template <class T>
__device__ __forceinline__ T warp_inclusive_sum(T v) {
#pragma unroll
  for (unsigned d = 1; d < 32; d <<= 1) {
    const T u = __shfl_up_sync(kFullMask, v, d);
    if (lane_id() >= d) v += u;
  }
  return v;
}

// The sum of `v` over the lanes below this one; `total` gets the sum over the warp.
template <class T>
__device__ __forceinline__ T warp_exclusive_sum(T v, T& total) {
  const T inclusive = warp_inclusive_sum(v);
  total = __shfl_sync(kFullMask, inclusive, 31);
  return inclusive - v;
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (unsigned d = 16; d > 0; d >>= 1) v += __shfl_down_sync(kFullMask, v, d);
  return __shfl_sync(kFullMask, v, 0);
}

// Block-wide: the sum of `warp_total` over the warps below this thread's warp (each warp passes
// its own total, the same in all its lanes); `total` gets the block's sum. `scratch` is kWarps
// shared values, free again when this returns.
template <class T>
__device__ __forceinline__ T block_exclusive_over_warps(T warp_total, T* scratch, T& total) {
  if (lane_id() == 0) scratch[warp_id()] = warp_total;
  __syncthreads();
  T below = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const T v = scratch[w];
    if (static_cast<unsigned>(w) < warp_id()) below += v;
    total += v;
  }
  __syncthreads();
  return below;
}

// Block-wide exclusive prefix sum of one value per thread, in thread order.
template <class T>
__device__ __forceinline__ T block_exclusive_sum(T v, T* scratch, T& total) {
  T warp_total;
  const T in_warp = warp_exclusive_sum(v, warp_total);
  return block_exclusive_over_warps(warp_total, scratch, total) + in_warp;
}

// The bin holding the need-th largest entry of a histogram (1 <= need <= its sum) and how many of
// that bin's entries are still to be taken. One warp: lane l owns kBins / 32 consecutive bins from
// the top; a warp scan of the lanes' sums says which lane's run holds the answer, and that lane
// walks its run again. `count(b)` reads bin b (shared or global memory).
struct BinChoice {
  unsigned bin;
  int64_t need;
};

template <int kBins, class Count>
__device__ __forceinline__ BinChoice warp_choose_bin(Count count, int64_t need) {
  static_assert(kBins % 32 == 0, "a histogram of whole runs per lane");
  constexpr int kRun = kBins / 32;
  const int top = kBins - 1 - static_cast<int>(lane_id()) * kRun;  // this lane's highest bin
  int64_t mine = 0;
#pragma unroll 8
  for (int r = 0; r < kRun; ++r) mine += static_cast<int64_t>(count(top - r));
  int64_t total;
  int64_t above = warp_exclusive_sum(mine, total);
  const bool here = above < need && above + mine >= need;
  const unsigned owner = static_cast<unsigned>(__ffs(__ballot_sync(kFullMask, here)) - 1) & 31u;
  unsigned bin = 0;
  int64_t left = 0;
  if (here) {
    for (int r = 0; r < kRun; ++r) {
      const int64_t c = static_cast<int64_t>(count(top - r));
      if (above + c >= need) {
        bin = static_cast<unsigned>(top - r);
        left = need - above;
        break;
      }
      above += c;
    }
  }
  return BinChoice{__shfl_sync(kFullMask, bin, owner), __shfl_sync(kFullMask, left, owner)};
}

// Block-wide, for each of N needs (1 <= need <= the histogram's sum): the bin holding the need-th
// largest entry and how many of its entries are still to be taken. Thread t owns kRun consecutive
// bins from the top (threads past the bins own none); one block scan of the runs' sums tells each
// need's owner, which walks its run in registers. Every thread of the block calls it and gets the
// answers. `scratch`: kWarps shared values; `answer`: N shared BinChoices.
template <int kBins, int N, class Count>
__device__ __forceinline__ void block_choose_bins(Count count, const int64_t (&need)[N], BinChoice (&out)[N],
                                                  int64_t* scratch, BinChoice* answer) {
  constexpr int kRun = kBins >= kThreads ? kBins / kThreads : 1;
  const int rank0 = static_cast<int>(threadIdx.x) * kRun;  // ranks from the top
  uint32_t run[kRun];
  int64_t mine = 0;
#pragma unroll
  for (int r = 0; r < kRun; ++r) {
    run[r] = rank0 + r < kBins ? static_cast<uint32_t>(count(kBins - 1 - (rank0 + r))) : 0u;
    mine += run[r];
  }
  int64_t total;
  const int64_t above = block_exclusive_sum(mine, scratch, total);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (above < need[i] && above + mine >= need[i]) {
      int64_t a = above;
#pragma unroll
      for (int r = 0; r < kRun; ++r) {
        if (a < need[i] && a + run[r] >= need[i]) answer[i] = BinChoice{static_cast<unsigned>(kBins - 1 - (rank0 + r)), need[i] - a};
        a += run[r];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = answer[i];
  __syncthreads();  // `answer` may be reused
}

}  // namespace deft_kernels::cuda
