// CUDA threshold select (the passes are described in threshold_select.cuh). Same semantics as the
// CPU op (csrc/cpu/threshold_select.cpp), with the same integer rule: an element is selected when
// its magnitude key (|x|'s bits) reaches its segment's key threshold, which the host computed from
// the fp32 threshold (cpu/magnitude_key.h), so NaNs always pass, zeros never, and subnormals compare
// by value whatever the device's flush-to-zero mode.
//
// STATUS: compiled (nvcc -std=c++20 -arch=sm_90, tests/test_cuda_compile.py) but NEVER RUN: it was
// written on a machine without a GPU. The "cuda" cases of tests/test_op_threshold_select.py check
// it against the reference on the first machine with one; until then treat it as untested.
#include <cub/device/device_scan.cuh>

#include "cuda/threshold_select.cuh"

namespace deft_kernels::cuda {
namespace {

constexpr int kWarps = kSelectThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Device view of the plan (threshold_select.cuh).
struct Segments {
  int64_t num;
  const int64_t *begin, *end, *key_threshold, *tile_first;
};

Segments view(const int64_t* d, int64_t num_segs) {
  return Segments{num_segs, d, d + num_segs, d + 2 * num_segs, d + 3 * num_segs};
}

struct Tile {
  int64_t lo, hi;  // the tile's elements [lo, hi)
  uint32_t key_threshold;
};

// Tile t of the plan: its segment is the last s with tile_first[s] <= t, found by bisection (every
// thread of the block computes the same, from cached loads).
__device__ Tile tile_of(const Segments& p, int64_t t) {
  int64_t lo = 0, hi = p.num - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.tile_first[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  Tile tile;
  tile.lo = p.begin[lo] + (t - p.tile_first[lo]) * kSelectTile;
  tile.hi = p.end[lo] < tile.lo + kSelectTile ? p.end[lo] : tile.lo + kSelectTile;
  tile.key_threshold = static_cast<uint32_t>(p.key_threshold[lo]);
  return tile;
}

// Warp w of a block covers the tile's elements [w * 1024, (w + 1) * 1024): its 32 words, word j
// holding elements j * 32 + lane. Loads are coalesced (a warp reads 32 consecutive elements per
// word) and all 32 are issued before the first ballot.
template <class Raw, uint32_t kKeyMask>
__global__ void __launch_bounds__(kSelectThreads)
    count_kernel(const Raw* x, Segments p, uint32_t* mask, int64_t* tile_count) {
  __shared__ int warp_count[kWarps];
  const Tile tile = tile_of(p, blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t first = tile.lo + static_cast<int64_t>(warp) * 32 * 32;
  Raw raw[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int64_t i = first + j * 32 + lane;
    raw[j] = i < tile.hi ? __ldg(x + i) : Raw(0);  // key 0 (zero) is never selected
  }
  uint32_t my_word = 0;
  int count = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const uint32_t word = __ballot_sync(kFullMask, (static_cast<uint32_t>(raw[j]) & kKeyMask) >= tile.key_threshold);
    if (lane == j) my_word = word;
    count += __popc(word);
  }
  mask[static_cast<int64_t>(blockIdx.x) * kSelectTileWords + warp * 32 + lane] = my_word;
  if (lane == 0) warp_count[warp] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_count[w];
    tile_count[blockIdx.x] = total;
  }
}

// Lane l of warp w holds mask word w * 32 + l. A warp scan of the words' bit counts and the warps'
// totals give every word its output offset within the tile; then the warp walks its 32 words, and
// the lanes of each non-zero word write their selected positions side by side (coalesced).
__global__ void __launch_bounds__(kSelectThreads)
    write_kernel(Segments p, const uint32_t* mask, const int64_t* tile_count, const int64_t* tile_end,
                 int64_t index_base, int64_t* out) {
  __shared__ int warp_total[kWarps];
  const Tile tile = tile_of(p, blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t word = mask[static_cast<int64_t>(blockIdx.x) * kSelectTileWords + warp * 32 + lane];
  const int bits = __popc(word);
  int inclusive = bits;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int below = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += below;
  }
  if (lane == 31) warp_total[warp] = inclusive;
  __syncthreads();
  int64_t at = tile_end[blockIdx.x] - tile_count[blockIdx.x];
  for (int w = 0; w < warp; ++w) at += warp_total[w];
  const int exclusive = inclusive - bits;
  const int64_t first = index_base + tile.lo + static_cast<int64_t>(warp) * 32 * 32;
  for (int j = 0; j < 32; ++j) {
    const uint32_t wj = __shfl_sync(kFullMask, word, j);
    if (wj == 0) continue;  // the same for the whole warp
    const int before = __shfl_sync(kFullMask, exclusive, j);
    if ((wj >> lane) & 1u) out[at + before + __popc(wj & ((1u << lane) - 1u))] = first + j * 32 + lane;
  }
}

}  // namespace

size_t threshold_select_scan_bytes(int64_t num_tiles) {
  size_t bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                static_cast<int>(num_tiles));
  return bytes;
}

cudaError_t threshold_select_count(int value_bytes, const void* values, const int64_t* plan_device, int64_t num_segs,
                                   int64_t num_tiles, const SelectWorkspace& ws, cudaStream_t stream) {
  const Segments p = view(plan_device, num_segs);
  const auto blocks = static_cast<unsigned>(num_tiles);
  if (value_bytes == 4)
    count_kernel<uint32_t, 0x7fffffffu>
        <<<blocks, kSelectThreads, 0, stream>>>(static_cast<const uint32_t*>(values), p, ws.mask, ws.tile_count);
  else
    count_kernel<uint16_t, 0x7fffu>
        <<<blocks, kSelectThreads, 0, stream>>>(static_cast<const uint16_t*>(values), p, ws.mask, ws.tile_count);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t bytes = ws.scan_bytes;
  return cub::DeviceScan::InclusiveSum(ws.scan_temp, bytes, ws.tile_count, ws.tile_end, static_cast<int>(num_tiles),
                                       stream);
}

cudaError_t threshold_select_write(const int64_t* plan_device, int64_t num_segs, int64_t num_tiles,
                                   const SelectWorkspace& ws, int64_t index_base, int64_t* out, cudaStream_t stream) {
  write_kernel<<<static_cast<unsigned>(num_tiles), kSelectThreads, 0, stream>>>(
      view(plan_device, num_segs), ws.mask, ws.tile_count, ws.tile_end, index_base, out);
  return cudaGetLastError();
}

}  // namespace deft_kernels::cuda
