// The CUDA segmented top-k (csrc/cuda/segmented_topk_kernels.cuh), its whole launch sequence, run on
// the CPU emulation of CUDA (cuda_emulator.h) against a sort-based reference: fp32 and 16-bit keys,
// values at every alignment, small / large / tiny segments, k = 0, 1, size, random, listed subsets
// (empty, permuted), heavy ties, NaN/inf/-0, and skewed data that leaves tiles incomplete; each
// with threads resuming after every barrier in a random order and in the two fixed lane orders
// (cuda_emulator.h: loads through Prefetched are performed as late as the memory model allows).
// Built and run by tests/test_cuda_compile.py; prints "topk_emulated: ok".
#include "cuda_emulator.h"
// clang-format off
#include "cuda/segmented_topk_kernels.cuh"
// clang-format on
#include "check.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace deft_kernels::cuda;

static std::mt19937_64 rng(2024);

// The reference: per listed fragment, the k largest keys (ties to the lower index), ascending.
template <class Bits>
std::vector<int64_t> reference(const Bits* x, const std::vector<int64_t>& off, const std::vector<int64_t>& k,
                               const FragmentList& frags, uint32_t mask, int64_t index_base) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < frags.count; ++i) {
    const int64_t f = frags[i];
    std::vector<int64_t> idx;
    for (int64_t e = off[f]; e < off[f + 1]; ++e) idx.push_back(e);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return (x[a] & mask) > (x[b] & mask); });
    idx.resize(k[f]);
    std::sort(idx.begin(), idx.end());
    for (int64_t e : idx) out.push_back(e + index_base);
  }
  return out;
}

enum class Kind { randn, ties, zeros, special, skewed };

float draw(Kind kind, int64_t i, int64_t n) {
  static std::normal_distribution<float> normal;
  switch (kind) {
    case Kind::randn:
      return normal(rng);
    case Kind::ties:  // few magnitudes, both signs, zeros of either sign
      return static_cast<float>(static_cast<int>(rng() % 5) - 2) * (rng() % 2 ? 1.f : -1.f);
    case Kind::zeros:
      return rng() % 2 ? 0.f : -0.f;
    case Kind::special: {
      const float pick[] = {NAN, -NAN, INFINITY, -INFINITY, 0.f, -0.f, 1.f, -1.f, 3.5f};
      return rng() % 3 ? normal(rng) : pick[rng() % 9];
    }
    case Kind::skewed:  // the large values crowd into the first tenth of every fragment
      return normal(rng) * (i < n / 10 ? 100.f : 1.f);
  }
  return 0.f;
}

template <class KT, class Bits>
void run_case(const std::vector<int64_t>& sizes, const std::vector<int64_t>& k, const std::vector<int64_t>* listed,
              Kind kind, int64_t shift, const char* name) {
  std::vector<int64_t> off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  const int64_t n = off.back();
  // The values sit `shift` elements past a 16-byte boundary inside a larger buffer.
  std::vector<uint4> storage(static_cast<size_t>((n + shift) * sizeof(Bits) / 16 + 2));
  Bits* x = reinterpret_cast<Bits*>(storage.data()) + shift;
  for (size_t f = 0; f < sizes.size(); ++f)
    for (int64_t e = off[f]; e < off[f + 1]; ++e) {
      const float v = draw(kind, e - off[f], sizes[f]);
      if constexpr (sizeof(Bits) == 4) {
        x[e] = std::bit_cast<uint32_t>(v);
      } else {
        x[e] = rng() % 2 ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
      }
    }
  const FragmentList frags = listed ? listed_fragments(listed->data(), static_cast<int64_t>(listed->size()))
                                    : all_fragments(static_cast<int64_t>(sizes.size()));
  const KeyFormat fmt = KT::kVec == 4 ? kKey32Format : kKey16Format;
  CHECK(vector_shift(x, fmt.vec) == shift);
  const TopkPlan plan = make_topk_plan(off.data(), k.data(), frags, fmt, shift);
  std::vector<uint64_t> workspace(static_cast<size_t>(plan.workspace.bytes / 8 + 1), 0xababababababababull);
  std::vector<int64_t> out(static_cast<size_t>(plan.total_out), -1);
  const int64_t index_base = rng() % 2 ? 0 : (int64_t{1} << 33) + 7;
  CHECK(topk::launch<KT>(x, n, plan, plan.data.data(), workspace.data(), index_base, out.data(), nullptr) ==
        cudaSuccess);
  const std::vector<int64_t> expected = reference(x, off, k, frags, KT::kMask, index_base);
  if (out != expected) {
    std::fprintf(stderr, "%s: mismatch (%zu indices, %lld large segments, %lld tiles)\n", name, expected.size(),
                 static_cast<long long>(plan.layout.num_large), static_cast<long long>(plan.layout.num_tiles));
    for (size_t i = 0, shown = 0; i < out.size() && shown < 10; ++i)
      if (out[i] != expected[i]) {
        std::fprintf(stderr, "  out[%zu] = %lld, expected %lld\n", i, static_cast<long long>(out[i]),
                     static_cast<long long>(expected[i]));
        ++shown;
      }
    std::exit(1);
  }
}

std::vector<int64_t> random_k(const std::vector<int64_t>& sizes, int rule) {
  std::vector<int64_t> k;
  for (int64_t s : sizes) {
    const int64_t r = rule < 0 ? static_cast<int64_t>(rng() % 4) : rule;
    k.push_back(r == 0 ? 0 : r == 1 ? std::min<int64_t>(1, s) : r == 2 ? s : (s ? static_cast<int64_t>(rng() % (s + 1)) : 0));
  }
  return k;
}

std::vector<int64_t> density_k(const std::vector<int64_t>& sizes, double d) {
  std::vector<int64_t> k;
  for (int64_t s : sizes) k.push_back(std::min<int64_t>(s, std::max<int64_t>(1, static_cast<int64_t>(d * s))));
  return k;
}

template <class KT, class Bits>
void run_all(const char* dtype) {
  const int vec = KT::kVec;
  char name[128];
  // Large segments at gradient-like densities, every alignment.
  for (int64_t shift = 0; shift < vec; shift += vec / 2) {
    const std::vector<int64_t> sizes{3, 40'000, 0, 16'384, 700, 70'001};
    for (double d : {0.001, 0.01, 0.3}) {
      std::snprintf(name, sizeof name, "%s density %.3f shift %lld", dtype, d, static_cast<long long>(shift));
      run_case<KT, Bits>(sizes, density_k(sizes, d), nullptr, Kind::randn, shift, name);
    }
  }
  // Every kind of data with random k, including k = 0, 1 and size.
  for (Kind kind : {Kind::randn, Kind::ties, Kind::zeros, Kind::special, Kind::skewed}) {
    const std::vector<int64_t> sizes{17, 0, 1, 33'000, 2048, 5, 20'000};
    std::snprintf(name, sizeof name, "%s kind %d", dtype, static_cast<int>(kind));
    run_case<KT, Bits>(sizes, random_k(sizes, -1), nullptr, kind, 1 % vec, name);
    run_case<KT, Bits>(sizes, density_k(sizes, 0.01), nullptr, kind, 0, name);
  }
  // Small segments spanning every warp of their block, with ties whose ranks cross warps.
  for (int rep = 0; rep < 3; ++rep) {
    const std::vector<int64_t> sizes{12'000, 9'000, 15'000};
    run_case<KT, Bits>(sizes, random_k(sizes, 3), nullptr, Kind::ties, 0, "small segments, ties");
  }
  // Skewed data at a low density: tiles of the crowded tenth are incomplete, the others complete.
  {
    const std::vector<int64_t> sizes{100'000};
    run_case<KT, Bits>(sizes, density_k(sizes, 0.01), nullptr, Kind::skewed, 0, "skewed 1%");
  }
  // k = size everywhere, k = 1 everywhere.
  {
    const std::vector<int64_t> sizes{0, 9, 16'390, 3};
    run_case<KT, Bits>(sizes, random_k(sizes, 2), nullptr, Kind::randn, 0, "k = size");
    run_case<KT, Bits>(sizes, random_k(sizes, 1), nullptr, Kind::ties, 0, "k = 1");
  }
  // Listed fragments: a permuted subset, an empty list, repeated small segments in groups.
  {
    std::vector<int64_t> sizes;
    for (int i = 0; i < 60; ++i) sizes.push_back(static_cast<int64_t>(rng() % 9));
    sizes.push_back(30'000);
    sizes.push_back(4000);
    const std::vector<int64_t> k = random_k(sizes, -1);
    std::vector<int64_t> listed(sizes.size());
    std::iota(listed.begin(), listed.end(), int64_t{0});
    std::shuffle(listed.begin(), listed.end(), rng);
    listed.resize(40);
    run_case<KT, Bits>(sizes, k, &listed, Kind::randn, 0, "listed subset");
    const std::vector<int64_t> none;
    run_case<KT, Bits>(sizes, k, &none, Kind::randn, 0, "empty list");
    run_case<KT, Bits>(sizes, k, nullptr, Kind::ties, vec - 1, "tiny fragments");
  }
}

int main() {
  // Random lane order after every barrier, then the two fixed orders: highest lane first is the
  // adversary of refine<1>'s in-place compaction toward lower slot entries (a lane's late load of
  // its entry would see another lane's store without the __syncwarp after the batch loads).
  using cuda_emulator::LaneOrder;
  for (LaneOrder order : {LaneOrder::random, LaneOrder::descending, LaneOrder::ascending}) {
    cuda_emulator::set_lane_order(order);
    run_all<topk::Key32, uint32_t>("fp32");
    run_all<topk::Key16, uint16_t>("16-bit");
  }
  std::puts("topk_emulated: ok");
  return 0;
}
