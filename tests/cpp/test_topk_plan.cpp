// Host unit test of the CUDA top-k launch plan (csrc/cuda/topk_plan.h): every listed fragment with
// k > 0 becomes exactly one small or large segment, in list order, with the right output offset; a
// segment is small exactly when it fits one tile at the values' alignment; groups cover the small
// segments; tiles and slots cover the large ones; workspace regions are aligned, ordered and large
// enough; an empty list selects nothing. Built and run by tests/test_cuda_compile.py (no GPU needed).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "check.h"
#include "cuda/topk_plan.h"

using namespace deft_kernels::cuda;

static void check_plan(const std::vector<int64_t>& sizes, const std::vector<int64_t>& k,
                       const std::vector<int64_t>* frags, const KeyFormat& fmt, int64_t shift) {
  std::vector<int64_t> off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  const int64_t F = static_cast<int64_t>(sizes.size());
  const FragmentList listed =
      frags ? listed_fragments(frags->data(), static_cast<int64_t>(frags->size())) : all_fragments(F);
  const TopkPlan plan = make_topk_plan(off.data(), k.data(), listed, fmt, shift);
  const PlanLayout& L = plan.layout;
  const int64_t* d = plan.data.data();
  CHECK(static_cast<int64_t>(plan.data.size()) == L.size);

  // Walk the listed fragments in order; small and large segments must appear in the same order.
  int64_t out = 0, si = 0, li = 0, slots = 0, largest = 0;
  for (int64_t i = 0; i < listed.count; ++i) {
    const int64_t f = listed[i];
    const int64_t n = sizes[f];
    if (k[f] > 0) {
      // The vectors holding the segment, numbered from the 16-byte boundary below the values.
      const int64_t first_vec = (off[f] + shift) / fmt.vec, last_vec = (off[f + 1] - 1 + shift) / fmt.vec;
      const int64_t vectors_per_tile = fmt.tile / fmt.vec;
      const int64_t tiles = (last_vec - first_vec) / vectors_per_tile + 1;
      if (tiles == 1) {
        CHECK(n <= fmt.tile);
        CHECK(si < L.num_small);
        CHECK(d[L.sm_begin + si] == off[f] && d[L.sm_end + si] == off[f + 1]);
        CHECK(d[L.sm_k + si] == k[f] && d[L.sm_out + si] == out);
        ++si;
      } else {
        CHECK(n > fmt.tile - fmt.vec);
        CHECK(li < L.num_large);
        CHECK(d[L.lg_begin + li] == off[f] && d[L.lg_end + li] == off[f + 1]);
        CHECK(d[L.lg_k + li] == k[f] && d[L.lg_out + li] == out);
        CHECK(d[L.lg_tile_first + li + 1] - d[L.lg_tile_first + li] == tiles);
        for (int64_t t = d[L.lg_tile_first + li]; t < d[L.lg_tile_first + li + 1]; ++t) CHECK(d[L.tile_seg + t] == li);
        // Its tiles' vectors cover exactly the segment's vectors.
        CHECK(tiles * vectors_per_tile > last_vec - first_vec && (tiles - 1) * vectors_per_tile <= last_vec - first_vec);
        const int64_t cap = d[L.lg_cap + li], quota = d[L.lg_quota + li];
        const int64_t share = (k[f] * fmt.tile + n - 1) / n;
        CHECK(quota >= 1 && quota <= cap && cap <= fmt.tile);
        CHECK(quota >= std::min(fmt.tile, share));  // a tile keeps at least its share of k
        CHECK(d[L.lg_slot_base + li] == slots);
        slots += tiles * cap;
        largest = std::max(largest, n);
        ++li;
      }
    }
    out += k[f];
  }
  CHECK(si == L.num_small && li == L.num_large && out == plan.total_out && largest == plan.largest);
  CHECK(d[L.lg_tile_first] == 0 && d[L.lg_tile_first + L.num_large] == L.num_tiles);

  // Groups: consecutive, covering every small segment once, none empty.
  CHECK(d[L.group_first] == 0 && d[L.group_first + L.num_groups] == L.num_small);
  for (int64_t g = 0; g < L.num_groups; ++g) {
    const int64_t a = d[L.group_first + g], b = d[L.group_first + g + 1];
    CHECK(a < b && b - a <= kGroupSegments);
    int64_t elems = 0;
    for (int64_t s = a; s < b - 1; ++s) elems += d[L.sm_end + s] - d[L.sm_begin + s];
    CHECK(elems < fmt.tile);  // a group is closed as soon as it holds a tile's worth of elements
  }

  // Workspace: aligned, in order, the zeroed part first, each region large enough.
  const WorkspaceLayout& W = plan.workspace;
  const int64_t regions[] = {W.hist[0],   W.hist[1],    W.hist[2],     W.done,       W.zeroed_bytes,
                             W.seg_top,   W.seg_prefix, W.seg_need,    W.tile_local, W.tile_count,
                             W.tile_gt,   W.tile_eq,    W.tile_take,   W.tile_out,   W.slot_key,
                             W.slot_pos,  W.bytes};
  const int64_t need[] = {4 * L.num_large << fmt.top_bits,
                          fmt.levels > 1 ? 4 * L.num_large << fmt.low_bits : 0,
                          fmt.levels > 2 ? 4 * L.num_large << fmt.low_bits : 0,
                          4 * L.num_large * kDoneCounters,
                          0,
                          4 * L.num_large, 4 * L.num_large, 8 * L.num_large,
                          4 * L.num_tiles, 4 * L.num_tiles, 4 * L.num_tiles, 4 * L.num_tiles, 4 * L.num_tiles,
                          8 * L.num_tiles,
                          4 * slots, 2 * slots};
  for (size_t i = 0; i + 1 < sizeof(regions) / sizeof(regions[0]); ++i) {
    CHECK(regions[i] % 256 == 0);
    CHECK(regions[i + 1] - regions[i] >= need[i]);
  }
  CHECK(W.slots == slots);
}

int main() {
  std::mt19937_64 rng(7);
  for (const KeyFormat& fmt : {kKey32Format, kKey16Format}) {
    const int64_t T = fmt.tile;
    // Layouts: empty, tiny fragments only, one huge, mixed around the tile size, k = 0 / 1 / size.
    const std::vector<std::vector<int64_t>> layouts = {
        {},
        {0, 0, 3},
        {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 8000, 9000, 300},
        {T, T + 1, T - 1, T - fmt.vec + 1, 5 * T - 1, 5 * T, 0, 1},
        {3, 10 * T + 17, 0, 2 * T, 4096, 1},
    };
    for (const auto& sizes : layouts)
      for (int rule = 0; rule < 4; ++rule) {
        std::vector<int64_t> k;
        for (int64_t s : sizes) k.push_back(rule == 0 ? 0 : rule == 1 ? (s > 0) : rule == 2 ? s : s / 3);
        for (int64_t shift = 0; shift < fmt.vec; ++shift) {
          check_plan(sizes, k, nullptr, fmt, shift);
          std::vector<int64_t> frags;
          for (size_t f = sizes.size(); f-- > 0;)
            if (rng() % 2) frags.push_back(static_cast<int64_t>(f));
          check_plan(sizes, k, &frags, fmt, shift);
        }
      }
    // Thousands of tiny fragments share blocks.
    std::vector<int64_t> tiny(5000), k(5000);
    for (size_t i = 0; i < tiny.size(); ++i) tiny[i] = 1 + static_cast<int64_t>(rng() % 9), k[i] = 1;
    check_plan(tiny, k, nullptr, fmt, 0);
    std::vector<int64_t> off{0};
    for (int64_t s : tiny) off.push_back(off.back() + s);
    const TopkPlan plan = make_topk_plan(off.data(), k.data(), all_fragments(5000), fmt, 0);
    CHECK(plan.layout.num_groups == (5000 + kGroupSegments - 1) / kGroupSegments);
    // An empty list selects nothing (an empty tensor's data pointer is null: not "all").
    const std::vector<int64_t> none;
    CHECK(make_topk_plan(off.data(), k.data(), listed_fragments(none.data(), 0), fmt, 0).total_out == 0);
    check_plan(tiny, k, &none, fmt, 0);
  }
  // vector_shift: elements past the 16-byte boundary.
  alignas(16) float f32[8];
  alignas(16) uint16_t f16[16];
  CHECK(vector_shift(f32, 4) == 0 && vector_shift(f32 + 3, 4) == 3 && vector_shift(f32 + 5, 4) == 1);
  CHECK(vector_shift(f16 + 7, 8) == 7 && vector_shift(f16 + 8, 8) == 0);
  std::puts("topk_plan: ok");
  return 0;
}
