// CUDA threshold select: the launcher the torch glue (threshold_select_glue.cpp) calls, and the
// host-side launch plan. Raw pointers and a stream only, so neither side needs the other's headers.
//
// Two passes, one launch each for all segments, one block per tile of kSelectTile elements:
//   count: every block reads its tile once, turns the selection of each 32 consecutive elements
//          into a 32-bit mask word (one warp ballot) and counts the selected elements; a CUB device
//          scan then gives every tile the end of its output range (tiles are in list order, so
//          the scan over all tiles is the output layout).
//   write: every block reads only its tile's mask words (1 bit per element) and writes the
//          indices of the set bits at its output offset, coalesced within each warp.
// The data is read once; the mask costs 1/32 of an fp32 read and write. The output size is data
// dependent: the glue reads the last tile's end back to the host between the passes (the one
// synchronisation) and allocates the output exactly.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace deft_kernels::cuda {

constexpr int kSelectThreads = 256;  // 8 warps
constexpr int64_t kSelectTile = 32 * 32 * (kSelectThreads / 32);  // a warp covers 32 words of 32 elements
constexpr int64_t kSelectTileWords = kSelectTile / 32;

// The plan: the listed segments that are not empty, in list order, packed into one int64 vector
// [begin[S], end[S], key_threshold[S], tile_first[S + 1]] for one upload. key_threshold is the
// segment's threshold on the magnitude key (cpu/magnitude_key.h, threshold_key): an element is
// selected when its key reaches it. Segment s owns tiles [tile_first[s], tile_first[s + 1]).
struct SelectPlan {
  std::vector<int64_t> data;
  int64_t num_segs = 0;
  int64_t num_tiles = 0;
};

// offsets: F + 1 entries; listed: the num_listed segment ids in order; key_threshold: one per
// listed segment. Arguments must already be valid (see threshold_select_glue.cpp).
inline SelectPlan make_select_plan(const int64_t* offsets, const int64_t* listed, int64_t num_listed,
                                   const uint32_t* key_threshold) {
  std::vector<int64_t> begin, end, key, tile_first{0};
  for (int64_t i = 0; i < num_listed; ++i) {
    const int64_t lo = offsets[listed[i]], hi = offsets[listed[i] + 1];
    if (hi == lo) continue;
    begin.push_back(lo), end.push_back(hi), key.push_back(key_threshold[i]);
    tile_first.push_back(tile_first.back() + (hi - lo + kSelectTile - 1) / kSelectTile);
  }
  SelectPlan plan;
  plan.num_segs = static_cast<int64_t>(begin.size());
  plan.num_tiles = tile_first.back();
  for (const auto* part : {&begin, &end, &key, &tile_first})
    plan.data.insert(plan.data.end(), part->begin(), part->end());
  return plan;
}

// Device buffers of one call (any content on entry): mask uint32 [num_tiles * kSelectTileWords],
// tile_count and tile_end int64 [num_tiles], scan_temp scan_bytes bytes.
struct SelectWorkspace {
  uint32_t* mask;
  int64_t* tile_count;
  int64_t* tile_end;
  void* scan_temp;
  size_t scan_bytes;
};

// Bytes of CUB scan storage a plan of num_tiles tiles needs (host only, launches nothing).
size_t threshold_select_scan_bytes(int64_t num_tiles);

// Pass 1 on `stream`: `values` is the whole flat vector (contiguous) of value_bytes-wide floats
// (4: fp32, 2: bf16 / fp16), plan_device the plan's data on the device. Afterwards
// tile_end[num_tiles - 1] is the number of selected elements. Returns the first launch error.
cudaError_t threshold_select_count(int value_bytes, const void* values, const int64_t* plan_device, int64_t num_segs,
                                   int64_t num_tiles, const SelectWorkspace& ws, cudaStream_t stream);

// Pass 2 on `stream`: writes index_base + i for every selected i to out (tile_end[num_tiles - 1]
// entries), in list order and ascending within a segment.
cudaError_t threshold_select_write(const int64_t* plan_device, int64_t num_segs, int64_t num_tiles,
                                   const SelectWorkspace& ws, int64_t index_base, int64_t* out, cudaStream_t stream);

}  // namespace deft_kernels::cuda
