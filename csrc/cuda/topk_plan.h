// Host-side planning of the CUDA segmented top-k (segmented_topk_kernels.cuh): which block does
// what, and the workspace the launches need. Plain C++ (no CUDA, no torch), so the glue can size the
// torch-allocated buffers from it and a host unit test (tests/cpp/test_topk_plan.cpp) checks it.
//
// Terms. A *segment* is a listed fragment with k > 0 (fragments with k == 0 produce nothing). The
// data is read in 16-byte vectors of `vec` elements, aligned in memory; a *tile* is `tile` elements
// (32 KiB of data) of one segment, the first one starting at the vector holding the segment's
// first element. A segment that fits in one tile is *small*: one block selects it whole in the first
// launch (consecutive small segments are packed into *groups*, one block per group, so thousands of
// tiny fragments share blocks). A larger segment is *large*: one block per tile in the first launch,
// then one warp per tile in the later ones, cooperating through per-segment histograms.
//
// Every tile of a large segment owns a *slot* of `cap` entries in the workspace, where the first
// launch leaves the tile's likely winners (see segmented_topk_kernels.cuh): the later passes read
// the slots instead of the data.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda/vectors.h"

namespace deft_kernels::cuda {

// The magnitude key of a dtype: its radix digits (the top one widest: it is histogrammed over every
// element), how many elements a 16-byte vector holds, and the tile, which a block holds in
// registers (32 elements per thread; positions in a tile fit 16 bits).
struct KeyFormat {
  int levels;    // radix digits
  int top_bits;  // width of the top digit
  int low_bits;  // width of each lower digit
  int vec;       // elements per 16-byte vector
  int64_t tile;  // elements per tile
};
inline constexpr KeyFormat kKey32Format{3, 11, 10, 4, 8192};   // fp32: 31-bit key = 11 + 10 + 10
inline constexpr KeyFormat kKey16Format{2, 8, 7, 8, 16384};    // bf16 / fp16: 15-bit key = 8 + 7

constexpr int64_t kGroupSegments = 16;  // small segments per group at most
// A tile's slot keeps its elements from the bin holding its (kQuotaFactor x its share of k)-th
// largest key upwards, and at most `cap` = kCapFactor x that share + kCapSlack of them: room for a
// tile holding up to about three times its share of the segment's winners, and for a wide bin.
// bench/topk_slot_study.py models this rule on real ResNet-50 gradients (results in
// bench/results/topk_slot_study_resnet50.txt): with 3, 0.2-1.0% of the tiles are incomplete at
// d = 1% and 0.9-1.7% at 0.1%, the slots hold 3.8% and 0.5% of the data, and the estimated extra
// traffic is 0.05-0.15 reads of the data, the least of the factors 2, 3 and 4.
constexpr int64_t kQuotaFactor = 3;
constexpr int64_t kCapFactor = 8;
constexpr int64_t kCapSlack = 128;
constexpr int kDoneCounters = 4;  // per large segment: tiles finished in launches 1, 2, 3 and the count launch

// The fragments a call selects from: every fragment in order, or an explicit list of ids. An empty
// list selects nothing; "all" is its own case, never inferred from a null pointer (an empty tensor
// has a null data pointer).
struct FragmentList {
  bool all;
  const int64_t* ids;  // the ids when !all (may be null when count == 0)
  int64_t count;
  int64_t operator[](int64_t i) const { return all ? i : ids[i]; }
};

inline FragmentList all_fragments(int64_t num_frags) { return {true, nullptr, num_frags}; }
inline FragmentList listed_fragments(const int64_t* ids, int64_t count) { return {false, ids, count}; }

// Offsets (in int64 elements) of each array inside the packed plan vector uploaded to the device.
struct PlanLayout {
  int64_t num_small = 0, num_groups = 0, num_large = 0, num_tiles = 0;
  // small segments: begin, end, k, out (output start); group_first has num_groups + 1 entries
  int64_t sm_begin = 0, sm_end = 0, sm_k = 0, sm_out = 0, group_first = 0;
  // large segments: begin, end, k, out, tile_first (num_large + 1 entries), slot_base (first slot
  // entry of the segment's first tile), cap (slot entries per tile), quota (see kQuotaFactor)
  int64_t lg_begin = 0, lg_end = 0, lg_k = 0, lg_out = 0, lg_tile_first = 0, lg_slot_base = 0, lg_cap = 0,
          lg_quota = 0;
  int64_t tile_seg = 0;  // the large segment of each tile (a lookup, not a search, in every launch)
  int64_t size = 0;
};

// Byte offsets of the workspace regions; [0, zeroed_bytes) must be zero before the first launch.
struct WorkspaceLayout {
  int64_t hist[3] = {0, 0, 0};  // uint32 [num_large][bins of the level], one per radix level
  int64_t done = 0;             // uint32 [num_large][kDoneCounters]
  int64_t zeroed_bytes = 0;
  int64_t seg_top = 0;     // uint32 [num_large]: the top digit of the threshold key
  int64_t seg_prefix = 0;  // uint32 [num_large]: the threshold key's digits resolved so far
  int64_t seg_need = 0;    // int64 [num_large]: keys still to take among those sharing the prefix
  int64_t tile_local = 0;  // int32 [num_tiles]: lowest top digit the tile's slot holds
  int64_t tile_count = 0;  // uint32 [num_tiles]: entries in the tile's slot
  int64_t tile_gt = 0;     // uint32 [num_tiles]: keys above the threshold
  int64_t tile_eq = 0;     // uint32 [num_tiles]: keys equal to the threshold
  int64_t tile_take = 0;   // uint32 [num_tiles]: threshold ties the tile takes
  int64_t tile_out = 0;    // int64 [num_tiles]: output offset of the tile within its segment
  int64_t slot_key = 0;    // uint32 [slots]
  int64_t slot_pos = 0;    // uint16 [slots]: position in the tile
  int64_t slots = 0;
  int64_t bytes = 0;
};

struct TopkPlan {
  std::vector<int64_t> data;  // packed arrays, see layout
  PlanLayout layout;
  WorkspaceLayout workspace;
  int64_t total_out = 0;  // number of indices returned
  int64_t largest = 0;    // elements of the largest large segment (its counts must fit 32 bits)
};

inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Tiles of the segment [begin, end) (end > begin) when the values' address lies `shift` elements
// past a 16-byte boundary: vectors are numbered from that boundary.
inline int64_t tiles_of(int64_t begin, int64_t end, int64_t shift, const KeyFormat& fmt) {
  const int64_t first = (begin + shift) / fmt.vec, last = (end - 1 + shift) / fmt.vec;
  const int64_t per_tile = fmt.tile / fmt.vec;
  return (last - first + per_tile) / per_tile;
}

// offsets: F + 1 entries; k: F entries. `shift` (0 <= shift < fmt.vec) is the values' address in
// elements past the previous 16-byte boundary. Arguments must already be valid (see ops_cuda.cpp).
inline TopkPlan make_topk_plan(const int64_t* offsets, const int64_t* k, FragmentList frags, KeyFormat fmt,
                               int64_t shift) {
  std::vector<int64_t> sm_begin, sm_end, sm_k, sm_out, group_first;
  std::vector<int64_t> lg_begin, lg_end, lg_k, lg_out, lg_tile_first{0}, lg_slot_base, lg_cap, lg_quota, tile_seg;
  int64_t out = 0, group_size = 0, slots = 0, largest = 0;
  for (int64_t i = 0; i < frags.count; ++i) {
    const int64_t f = frags[i];
    const int64_t begin = offsets[f], end = offsets[f + 1], kf = k[f];
    if (kf > 0) {
      const int64_t tiles = tiles_of(begin, end, shift, fmt);
      if (tiles == 1) {
        const int64_t in_group = static_cast<int64_t>(sm_begin.size()) - (group_first.empty() ? 0 : group_first.back());
        if (sm_begin.empty() || group_size >= fmt.tile || in_group >= kGroupSegments) {
          group_first.push_back(static_cast<int64_t>(sm_begin.size()));
          group_size = 0;
        }
        group_size += end - begin;
        sm_begin.push_back(begin), sm_end.push_back(end), sm_k.push_back(kf), sm_out.push_back(out);
      } else {
        const int64_t size = end - begin;
        const int64_t share = (kf * fmt.tile + size - 1) / size;  // the segment's k per full tile
        lg_begin.push_back(begin), lg_end.push_back(end), lg_k.push_back(kf), lg_out.push_back(out);
        lg_tile_first.push_back(lg_tile_first.back() + tiles);
        lg_cap.push_back(std::min(fmt.tile, kCapFactor * share + kCapSlack));
        lg_quota.push_back(std::min(fmt.tile, kQuotaFactor * share));
        lg_slot_base.push_back(slots);
        slots += tiles * lg_cap.back();
        tile_seg.insert(tile_seg.end(), tiles, static_cast<int64_t>(lg_begin.size()) - 1);
        largest = std::max(largest, size);
      }
    }
    out += kf;
  }
  group_first.push_back(static_cast<int64_t>(sm_begin.size()));

  TopkPlan plan;
  plan.total_out = out;
  plan.largest = largest;
  PlanLayout& L = plan.layout;
  L.num_small = static_cast<int64_t>(sm_begin.size());
  L.num_groups = static_cast<int64_t>(group_first.size()) - 1;
  L.num_large = static_cast<int64_t>(lg_begin.size());
  L.num_tiles = lg_tile_first.back();
  auto append = [&](int64_t& field, const std::vector<int64_t>& v) {
    field = static_cast<int64_t>(plan.data.size());
    plan.data.insert(plan.data.end(), v.begin(), v.end());
  };
  append(L.sm_begin, sm_begin), append(L.sm_end, sm_end), append(L.sm_k, sm_k), append(L.sm_out, sm_out);
  append(L.group_first, group_first);
  append(L.lg_begin, lg_begin), append(L.lg_end, lg_end), append(L.lg_k, lg_k), append(L.lg_out, lg_out);
  append(L.lg_tile_first, lg_tile_first), append(L.lg_slot_base, lg_slot_base), append(L.lg_cap, lg_cap);
  append(L.lg_quota, lg_quota), append(L.tile_seg, tile_seg);
  L.size = static_cast<int64_t>(plan.data.size());

  WorkspaceLayout& W = plan.workspace;
  int64_t at = 0;
  auto region = [&](int64_t& field, int64_t bytes) {
    field = at;
    at = align_up(at + bytes, 256);
  };
  for (int level = 0; level < 3; ++level) {
    const int bits = level == 0 ? fmt.top_bits : fmt.low_bits;
    region(W.hist[level], level < fmt.levels ? 4 * L.num_large * (int64_t{1} << bits) : 0);
  }
  region(W.done, 4 * L.num_large * kDoneCounters);
  W.zeroed_bytes = at;
  region(W.seg_top, 4 * L.num_large);
  region(W.seg_prefix, 4 * L.num_large);
  region(W.seg_need, 8 * L.num_large);
  region(W.tile_local, 4 * L.num_tiles);
  region(W.tile_count, 4 * L.num_tiles);
  region(W.tile_gt, 4 * L.num_tiles);
  region(W.tile_eq, 4 * L.num_tiles);
  region(W.tile_take, 4 * L.num_tiles);
  region(W.tile_out, 8 * L.num_tiles);
  region(W.slot_key, 4 * slots);
  region(W.slot_pos, 2 * slots);
  W.slots = slots;
  W.bytes = at;
  return plan;
}

}  // namespace deft_kernels::cuda
