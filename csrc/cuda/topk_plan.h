// Host-side planning of the CUDA segmented top-k (segmented_topk.cu): which block does what, and
// how much workspace the launch needs. Plain C++ (no CUDA, no torch), so the glue can size the
// torch-allocated buffers from it and a host unit test can check it without a GPU.
//
// Terms. A *segment* is a listed fragment with 0 < k (fragments with k == 0 produce nothing).
// Segments of at most kTile elements are *small*: one block selects a whole small segment, and
// consecutive small segments are packed into *groups* of about kTile elements (at most
// kGroupSegments segments), one block per group, so thousands of tiny fragments share blocks.
// Larger segments are cut into *tiles* of kTile elements, one block per tile, and cooperate
// through per-segment histograms in the workspace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace deft_kernels::cuda {

constexpr int kThreads = 256;           // threads per block in every kernel
constexpr int kItems = 16;              // elements per thread per chunk
constexpr int kChunk = kThreads * kItems;
constexpr int64_t kTile = 4 * kChunk;   // elements per block of a large segment
constexpr int kMaxBins = 2048;          // widest radix digit (11 bits)
// A block selects the segments of its group one after the other, each costing a few block-wide
// synchronisations per digit whatever its size: groups of many tiny segments are capped so that
// those chains stay short and the groups run in parallel instead.
constexpr int64_t kGroupSegments = 16;
// A large segment keeps the elements of its top-digit bin as candidates when they are at most
// this share of it (or kMinCandidates); otherwise (heavy ties: zeros, a constant layer) the lower
// digits are resolved by re-scanning the segment instead.
constexpr int64_t kCandidateShare = 16;
constexpr int64_t kMinCandidates = 4096;

// Offsets (in int64 elements) of each array inside the packed plan vector uploaded to the device.
struct PlanLayout {
  int64_t num_small = 0, num_groups = 0, num_large = 0, num_tiles = 0;
  // small segments: begin, end, k, out (output start); group_first has num_groups + 1 entries
  int64_t sm_begin = 0, sm_end = 0, sm_k = 0, sm_out = 0, group_first = 0;
  // large segments: begin, end, k, out, tile_first (num_large + 1 entries), candidate cap and base
  int64_t lg_begin = 0, lg_end = 0, lg_k = 0, lg_out = 0, lg_tile_first = 0, lg_cap = 0, lg_cand_base = 0;
  // large tiles: the segment of each
  int64_t tile_seg = 0;
  int64_t size = 0;
};

// Byte offsets of the workspace regions; [0, zeroed_bytes) must be zero before the launch.
struct WorkspaceLayout {
  int64_t hist = 0;        // uint64 [levels][num_large][kMaxBins]
  int64_t cand_count = 0;  // uint64 [num_large]
  int64_t tile_gt = 0;     // int32 [num_tiles]
  int64_t tile_eq = 0;     // int32 [num_tiles]
  int64_t zeroed_bytes = 0;
  int64_t prefix = 0;      // uint32 [num_large]: key digits resolved so far, then the threshold key
  int64_t need = 0;        // int64 [num_large]: keys still to take among those sharing the prefix
  int64_t mode = 0;        // int32 [num_large]: kModeCandidates or kModeRescan
  int64_t tile_take = 0;   // int32 [num_tiles]: threshold ties the tile takes
  int64_t tile_out = 0;    // int64 [num_tiles]: output offset of the tile within its segment
  int64_t cand_key = 0;    // uint32 [total cap]
  int64_t cand_pos = 0;    // int64 [total cap]: position relative to the segment's begin
  int64_t bytes = 0;
};

constexpr int kModeCandidates = 0;
constexpr int kModeRescan = 1;

struct TopkPlan {
  std::vector<int64_t> data;  // packed arrays, see layout
  PlanLayout layout;
  WorkspaceLayout workspace;
  int64_t total_out = 0;      // number of indices returned
};

inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

inline int64_t candidate_cap(int64_t size) { return std::min(size, std::max(size / kCandidateShare, kMinCandidates)); }

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

// offsets: F + 1 entries; k: F entries. `levels` is the number of radix digits of the dtype's key
// (3 for fp32, 2 for 16-bit types). Arguments must already be valid (see ops_cuda.cpp).
inline TopkPlan make_topk_plan(const int64_t* offsets, const int64_t* k, FragmentList frags, int levels) {
  const int64_t num_listed = frags.count;
  std::vector<int64_t> sm_begin, sm_end, sm_k, sm_out, group_first;
  std::vector<int64_t> lg_begin, lg_end, lg_k, lg_out, lg_tile_first{0}, lg_cap, lg_cand_base, tile_seg;
  int64_t out = 0, group_size = 0, cand_total = 0;
  for (int64_t i = 0; i < num_listed; ++i) {
    const int64_t f = frags[i];
    const int64_t begin = offsets[f], end = offsets[f + 1], kf = k[f];
    if (kf > 0) {
      if (end - begin <= kTile) {
        const int64_t in_group = static_cast<int64_t>(sm_begin.size()) - (group_first.empty() ? 0 : group_first.back());
        if (sm_begin.empty() || group_size >= kTile || in_group >= kGroupSegments) {
          group_first.push_back(static_cast<int64_t>(sm_begin.size()));
          group_size = 0;
        }
        group_size += end - begin;
        sm_begin.push_back(begin), sm_end.push_back(end), sm_k.push_back(kf), sm_out.push_back(out);
      } else {
        const int64_t s = static_cast<int64_t>(lg_begin.size());
        const int64_t tiles = (end - begin + kTile - 1) / kTile;
        lg_begin.push_back(begin), lg_end.push_back(end), lg_k.push_back(kf), lg_out.push_back(out);
        lg_tile_first.push_back(lg_tile_first.back() + tiles);
        lg_cap.push_back(candidate_cap(end - begin));
        lg_cand_base.push_back(cand_total);
        cand_total += lg_cap.back();
        tile_seg.insert(tile_seg.end(), tiles, s);
      }
    }
    out += kf;
  }
  group_first.push_back(static_cast<int64_t>(sm_begin.size()));

  TopkPlan plan;
  plan.total_out = out;
  PlanLayout& L = plan.layout;
  L.num_small = static_cast<int64_t>(sm_begin.size());
  L.num_groups = static_cast<int64_t>(group_first.size()) - 1;
  L.num_large = static_cast<int64_t>(lg_begin.size());
  L.num_tiles = static_cast<int64_t>(tile_seg.size());
  auto append = [&](int64_t& field, const std::vector<int64_t>& v) {
    field = static_cast<int64_t>(plan.data.size());
    plan.data.insert(plan.data.end(), v.begin(), v.end());
  };
  append(L.sm_begin, sm_begin), append(L.sm_end, sm_end), append(L.sm_k, sm_k), append(L.sm_out, sm_out);
  append(L.group_first, group_first);
  append(L.lg_begin, lg_begin), append(L.lg_end, lg_end), append(L.lg_k, lg_k), append(L.lg_out, lg_out);
  append(L.lg_tile_first, lg_tile_first), append(L.lg_cap, lg_cap), append(L.lg_cand_base, lg_cand_base);
  append(L.tile_seg, tile_seg);
  L.size = static_cast<int64_t>(plan.data.size());

  WorkspaceLayout& W = plan.workspace;
  int64_t at = 0;
  auto region = [&](int64_t& field, int64_t bytes) {
    field = at;
    at = align_up(at + bytes, 256);
  };
  region(W.hist, 8 * static_cast<int64_t>(levels) * L.num_large * kMaxBins);
  region(W.cand_count, 8 * L.num_large);
  region(W.tile_gt, 4 * L.num_tiles);
  region(W.tile_eq, 4 * L.num_tiles);
  W.zeroed_bytes = at;
  region(W.prefix, 4 * L.num_large);
  region(W.need, 8 * L.num_large);
  region(W.mode, 4 * L.num_large);
  region(W.tile_take, 4 * L.num_tiles);
  region(W.tile_out, 8 * L.num_tiles);
  region(W.cand_key, 4 * cand_total);
  region(W.cand_pos, 8 * cand_total);
  W.bytes = at;
  return plan;
}

}  // namespace deft_kernels::cuda
