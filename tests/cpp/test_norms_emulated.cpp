// The CUDA accumulate_norms (csrc/cuda/accumulate_norms_kernels.cuh), memset and launch, run on the
// CPU emulation of CUDA (cuda_emulator.h) against a plain loop: fp32, bf16 and fp16; grad and
// residual at equal and at different alignments (vectorised and element-wise kernels); layouts with
// empty, tiny and block-spanning fragments, no fragments, no elements; NaN and inf.
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

template <class DT>
typename DT::Raw encode(float v) {
  return DT::round(v);
}

// At most one ulp of fp32 apart (the float64 sums differ in order only), NaN equal to NaN.
bool close(float got, float want) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= std::fabs(want) * 1.2e-7f;
}

template <class DT>
void run_case(const std::vector<int64_t>& sizes, int64_t gshift, int64_t rshift, bool special, const char* name) {
  using Raw = typename DT::Raw;
  std::vector<int64_t> off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  const int64_t n = off.back(), F = static_cast<int64_t>(sizes.size());
  std::vector<uint4> gbuf(static_cast<size_t>((n + gshift) * sizeof(Raw) / 16 + 2));
  std::vector<uint4> rbuf(static_cast<size_t>((n + rshift) * sizeof(Raw) / 16 + 2));
  Raw* g = reinterpret_cast<Raw*>(gbuf.data()) + gshift;
  Raw* r = reinterpret_cast<Raw*>(rbuf.data()) + rshift;
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = encode<DT>(normal(rng));
    r[i] = encode<DT>(normal(rng) * 3.f);
  }
  if (special && n > 2) {
    r[n - 1] = encode<DT>(NAN);
    r[0] = encode<DT>(INFINITY);
  }
  // The reference: the same rounding, squares summed in float64 in index order.
  std::vector<Raw> want_r(r, r + n);
  std::vector<float> want(static_cast<size_t>(F));
  for (int64_t f = 0; f < F; ++f) {
    double s = 0.0;
    for (int64_t i = off[f]; i < off[f + 1]; ++i) {
      want_r[i] = DT::round(DT::to_float(g[i]) + DT::to_float(r[i]));
      const double a = DT::to_float(want_r[i]);
      s += a * a;
    }
    want[f] = static_cast<float>(std::sqrt(s));
  }
  std::vector<uint64_t> workspace(static_cast<size_t>(norms::workspace_bytes(F) / 8), 0xababababababababull);
  std::vector<float> got(static_cast<size_t>(F), -1.f);
  CHECK(norms::launch<DT>(g, r, n, off.data(), F, workspace.data(), got.data(), nullptr) == cudaSuccess);
  for (int64_t i = 0; i < n; ++i)
    if (r[i] != want_r[i]) {
      std::fprintf(stderr, "%s: residual[%lld] = %x, expected %x\n", name, static_cast<long long>(i), r[i], want_r[i]);
      std::exit(1);
    }
  for (int64_t f = 0; f < F; ++f)
    if (!close(got[f], want[f])) {
      std::fprintf(stderr, "%s: norm[%lld] = %.9g, expected %.9g\n", name, static_cast<long long>(f), got[f], want[f]);
      std::exit(1);
    }
}

template <class DT>
void run_all(const char* dtype) {
  const int64_t vec = DT::kVec;
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
  for (size_t l = 0; l < layouts.size(); ++l)
    for (int64_t gshift : {int64_t{0}, vec - 1})
      for (int64_t rshift : {int64_t{0}, vec - 1}) {
        std::snprintf(name, sizeof name, "%s layout %zu shifts %lld/%lld", dtype, l, static_cast<long long>(gshift),
                      static_cast<long long>(rshift));
        run_case<DT>(layouts[l], gshift, rshift, l == 3, name);
      }
}

int main() {
  run_all<norms::Fp32>("fp32");
  run_all<norms::Bf16>("bf16");
  run_all<norms::Fp16>("fp16");
  std::puts("norms_emulated: ok");
  return 0;
}
