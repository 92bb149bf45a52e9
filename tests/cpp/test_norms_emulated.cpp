// The CUDA accumulate_norms (csrc/cuda/accumulate_norms_kernels.cuh), memset and launch, run on the
// CPU emulation of CUDA (cuda_emulator.h) against a plain loop: every dtype pair (fp32, bf16, fp16
// alike, and a bf16 or fp16 grad into an fp32 residual); grad and residual at equal and at
// different alignments (vectorised and element-wise kernels); layouts with empty, tiny and
// block-spanning fragments, no fragments, no elements; NaN and inf, and 16-bit sums that overflow
// their dtype (inf in a 16-bit residual, finite in an fp32 one).
// Built and run by tests/test_cuda_compile.py; prints "norms_emulated: ok".
#include "cuda_emulator.h"
// clang-format off
#include "cuda/accumulate_norms_kernels.cuh"
// clang-format on
#include "check.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace deft_kernels::cuda;

static std::mt19937_64 rng(99);

// At most one ulp of fp32 apart (the float64 sums differ in order only), NaN equal to NaN.
bool close(float got, float want) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= std::fabs(want) * 1.2e-7f;
}

template <class G, class R>
void run_case(const std::vector<int64_t>& sizes, int64_t gshift, int64_t rshift, bool special, const char* name) {
  using GRaw = typename G::Raw;
  using RRaw = typename R::Raw;
  std::vector<int64_t> off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  const int64_t n = off.back(), F = static_cast<int64_t>(sizes.size());
  std::vector<uint4> gbuf(static_cast<size_t>((n + gshift) * sizeof(GRaw) / 16 + 2));
  std::vector<uint4> rbuf(static_cast<size_t>((n + rshift) * sizeof(RRaw) / 16 + 2));
  GRaw* g = reinterpret_cast<GRaw*>(gbuf.data()) + gshift;
  RRaw* r = reinterpret_cast<RRaw*>(rbuf.data()) + rshift;
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = G::round(normal(rng));
    r[i] = R::round(normal(rng) * 3.f);
  }
  if (special && n > 4) {
    r[n - 1] = R::round(NAN);
    r[0] = R::round(INFINITY);
    g[1] = G::round(-INFINITY);
    g[2] = G::round(65504.f), r[2] = R::round(65504.f);  // fp16's largest: the sum overflows fp16 only
  }
  // The reference: the same rounding, squares summed in float64 in index order.
  std::vector<RRaw> want_r(r, r + n);
  std::vector<float> want(static_cast<size_t>(F));
  for (int64_t f = 0; f < F; ++f) {
    double s = 0.0;
    for (int64_t i = off[f]; i < off[f + 1]; ++i) {
      want_r[i] = R::round(G::to_float(g[i]) + R::to_float(r[i]));
      const double a = R::to_float(want_r[i]);
      s += a * a;
    }
    want[f] = static_cast<float>(std::sqrt(s));
  }
  std::vector<uint64_t> workspace(static_cast<size_t>(norms::workspace_bytes(F) / 8), 0xababababababababull);
  std::vector<float> got(static_cast<size_t>(F), -1.f);
  CHECK((norms::launch<G, R>(g, r, n, off.data(), F, workspace.data(), got.data(), nullptr) == cudaSuccess));
  for (int64_t i = 0; i < n; ++i)
    if (r[i] != want_r[i]) {
      std::fprintf(stderr, "%s: residual[%lld] = %x, expected %x\n", name, static_cast<long long>(i),
                   static_cast<unsigned>(r[i]), static_cast<unsigned>(want_r[i]));
      std::exit(1);
    }
  for (int64_t f = 0; f < F; ++f)
    if (!close(got[f], want[f])) {
      std::fprintf(stderr, "%s: norm[%lld] = %.9g, expected %.9g\n", name, static_cast<long long>(f), got[f], want[f]);
      std::exit(1);
    }
}

template <class G, class R>
void run_all(const char* pair) {
  const int64_t vec = norms::kVecOf<G, R>;
  std::vector<int64_t> tiny(300);
  for (auto& s : tiny) s = static_cast<int64_t>(rng() % 9);
  const std::vector<std::vector<int64_t>> layouts = {
      {},                                      // no fragments
      {0, 0},                                  // no elements
      {5000},                                  // one fragment, several warps
      {3, 0, 40'000, 17, 0, 9000, 1},          // fragments spanning blocks, empty ones between
      tiny,                                    // many fragments per warp
      {70'000, 2, 70'000},                     // blocks inside one fragment, two fragments per warp
  };
  char name[96];
  // Shifts in elements: 0 and vec - 1 (aligned alike, or not); vec puts a 16-bit grad 8 bytes past a
  // 16-byte boundary, still on a vector boundary beside an fp32 residual.
  for (size_t l = 0; l < layouts.size(); ++l)
    for (int64_t gshift : {int64_t{0}, vec - 1, vec})
      for (int64_t rshift : {int64_t{0}, vec - 1}) {
        std::snprintf(name, sizeof name, "%s layout %zu shifts %lld/%lld", pair, l, static_cast<long long>(gshift),
                      static_cast<long long>(rshift));
        run_case<G, R>(layouts[l], gshift, rshift, l == 3, name);
      }
}

int main() {
  using norms::Bf16, norms::Fp16, norms::Fp32;
  run_all<Fp32, Fp32>("fp32");
  run_all<Bf16, Bf16>("bf16");
  run_all<Fp16, Fp16>("fp16");
  run_all<Bf16, Fp32>("bf16 grad, fp32 residual");
  run_all<Fp16, Fp32>("fp16 grad, fp32 residual");
  std::puts("norms_emulated: ok");
  return 0;
}
