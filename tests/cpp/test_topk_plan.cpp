// Host unit test of the CUDA top-k launch plan (csrc/cuda/topk_plan.h): every listed fragment with
// k > 0 becomes exactly one small or large segment, in list order, with the right output offset;
// groups and tiles cover their segments; workspace regions are aligned and do not overlap.
// Built and run by tests/test_cuda_compile.py with the host C++ compiler (no GPU needed).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/topk_plan.h"

using namespace deft_kernels::cuda;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

static void check_plan(const std::vector<int64_t>& sizes, const std::vector<int64_t>& k,
                       const std::vector<int64_t>* frags, int levels) {
  std::vector<int64_t> off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  const int64_t F = static_cast<int64_t>(sizes.size());
  const FragmentList listed =
      frags ? listed_fragments(frags->data(), static_cast<int64_t>(frags->size())) : all_fragments(F);
  const TopkPlan plan = make_topk_plan(off.data(), k.data(), listed, levels);
  const PlanLayout& L = plan.layout;
  const int64_t* d = plan.data.data();
  CHECK(static_cast<int64_t>(plan.data.size()) == L.size);

  // Walk the listed fragments in order; small and large segments must appear in the same order.
  int64_t out = 0, si = 0, li = 0, cand = 0;
  for (int64_t i = 0; i < listed.count; ++i) {
    const int64_t f = listed[i];
    const int64_t n = sizes[f];
    if (k[f] > 0) {
      if (n <= kTile) {
        CHECK(si < L.num_small);
        CHECK(d[L.sm_begin + si] == off[f] && d[L.sm_end + si] == off[f + 1]);
        CHECK(d[L.sm_k + si] == k[f] && d[L.sm_out + si] == out);
        ++si;
      } else {
        CHECK(li < L.num_large);
        CHECK(d[L.lg_begin + li] == off[f] && d[L.lg_end + li] == off[f + 1]);
        CHECK(d[L.lg_k + li] == k[f] && d[L.lg_out + li] == out);
        const int64_t t0 = d[L.lg_tile_first + li], t1 = d[L.lg_tile_first + li + 1];
        CHECK((t1 - t0) * kTile >= n && (t1 - t0 - 1) * kTile < n);
        for (int64_t t = t0; t < t1; ++t) CHECK(d[L.tile_seg + t] == li);
        CHECK(d[L.lg_cand_base + li] == cand);
        CHECK(d[L.lg_cap + li] >= n / kCandidateShare && d[L.lg_cap + li] <= n);
        cand += d[L.lg_cap + li];
        ++li;
      }
    }
    out += k[f];
  }
  CHECK(si == L.num_small && li == L.num_large && out == plan.total_out);
  CHECK(d[L.lg_tile_first] == 0 && d[L.lg_tile_first + L.num_large] == L.num_tiles);

  // Groups: consecutive, covering every small segment once, none empty.
  CHECK(d[L.group_first] == 0 && d[L.group_first + L.num_groups] == L.num_small);
  for (int64_t g = 0; g < L.num_groups; ++g) {
    const int64_t a = d[L.group_first + g], b = d[L.group_first + g + 1];
    CHECK(a < b && b - a <= kGroupSegments);
    int64_t elems = 0;
    for (int64_t s = a; s < b - 1; ++s) elems += d[L.sm_end + s] - d[L.sm_begin + s];
    CHECK(elems < kTile);  // a group is closed as soon as it holds kTile elements
  }

  // Workspace: aligned, in order, the zeroed part first and large enough.
  const WorkspaceLayout& W = plan.workspace;
  const int64_t regions[] = {W.hist, W.cand_count, W.tile_gt, W.tile_eq, W.zeroed_bytes, W.prefix, W.need,
                             W.mode, W.tile_take, W.tile_out, W.cand_key, W.cand_pos, W.bytes};
  for (size_t i = 0; i + 1 < sizeof(regions) / sizeof(regions[0]); ++i) {
    CHECK(regions[i] % 256 == 0);
    CHECK(regions[i] <= regions[i + 1]);
  }
  CHECK(W.cand_count - W.hist >= 8 * levels * L.num_large * kMaxBins);
  CHECK(W.tile_eq - W.tile_gt >= 4 * L.num_tiles && W.zeroed_bytes - W.tile_eq >= 4 * L.num_tiles);
  CHECK(W.cand_pos - W.cand_key >= 4 * cand && W.bytes - W.cand_pos >= 8 * cand);
}

int main() {
  std::mt19937_64 rng(7);
  // Layouts: empty, tiny fragments only, one huge, mixed around the tile size, with k = 0 / 1 / size.
  const std::vector<std::vector<int64_t>> layouts = {
      {},
      {0, 0, 3},
      {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 8000, 9000, 300},
      {kTile, kTile + 1, 5 * kTile - 1, 5 * kTile, 0, 1},
      {3, 10 * kTile + 17, 0, 2 * kTile, 4096, 1},
  };
  for (const auto& sizes : layouts) {
    for (int rule = 0; rule < 4; ++rule) {
      std::vector<int64_t> k;
      for (int64_t s : sizes) k.push_back(rule == 0 ? 0 : rule == 1 ? (s > 0) : rule == 2 ? s : s / 3);
      for (int levels : {2, 3}) {
        check_plan(sizes, k, nullptr, levels);
        std::vector<int64_t> frags;
        for (size_t f = sizes.size(); f-- > 0;)
          if (rng() % 2) frags.push_back(static_cast<int64_t>(f));
        check_plan(sizes, k, &frags, levels);
      }
    }
  }
  // Thousands of tiny fragments must share blocks.
  std::vector<int64_t> tiny(5000), k(5000);
  for (size_t i = 0; i < tiny.size(); ++i) tiny[i] = 1 + static_cast<int64_t>(rng() % 9), k[i] = 1;
  check_plan(tiny, k, nullptr, 3);
  std::vector<int64_t> off{0};
  for (int64_t s : tiny) off.push_back(off.back() + s);
  const TopkPlan plan = make_topk_plan(off.data(), k.data(), all_fragments(5000), 3);
  CHECK(plan.layout.num_groups == (5000 + kGroupSegments - 1) / kGroupSegments);
  // An empty list selects nothing (an empty tensor's data pointer is null: not "all").
  const std::vector<int64_t> none;
  CHECK(make_topk_plan(off.data(), k.data(), listed_fragments(none.data(), 0), 3).total_out == 0);
  check_plan(tiny, k, &none, 3);
  std::puts("topk_plan: ok");
  return 0;
}
