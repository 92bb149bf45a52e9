#include <ATen/core/Tensor.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/kernels.h"

namespace deft_kernels::cpu {
namespace {

// Work is cut into fixed-size chunks of the flat vector, independent of the fragment layout, so
// one huge fragment and thousands of tiny ones balance the same way across threads. Each chunk
// adds its sums of squares into a per-thread row of partials, reduced at the end.
constexpr int64_t kChunk = 1 << 15;

constexpr int kLanes = 8;

// acc[j] = grad[j] + acc[j] (fp32 arithmetic, one rounding to acc's dtype); returns its square.
template <typename grad_t, typename acc_t>
inline double accumulate_one(const grad_t* grad, acc_t* acc, int64_t j) {
  const acc_t a = static_cast<acc_t>(static_cast<float>(grad[j]) + static_cast<float>(acc[j]));
  acc[j] = a;
  const double ad = static_cast<float>(a);
  return ad * ad;
}

template <typename grad_t, typename acc_t>
void accumulate_norms_impl(const grad_t* grad, acc_t* acc, const int64_t* offsets, int64_t num_frags,
                           int64_t n, float* norms) {
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  const int threads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(num_chunks)));
  std::vector<double> partial(static_cast<size_t>(threads) * num_frags, 0.0);

#pragma omp parallel num_threads(threads)
  {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * num_frags;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t lo = c * kChunk;
      const int64_t hi = std::min(n, lo + kChunk);
      // First fragment whose end lies past lo (empty fragments are skipped by the loop below).
      int64_t f = std::upper_bound(offsets + 1, offsets + num_frags + 1, lo) - (offsets + 1);
      int64_t i = lo;
      while (i < hi) {
        const int64_t end = std::min(hi, offsets[f + 1]);
        // Squares of fp32 values are exact in double and their double sum errs far below fp32
        // rounding, so the returned norm is within an ulp or so whatever the layout and thread
        // count; independent lanes keep the adds off one long dependency chain.
        double lane[kLanes] = {};
        int64_t j = i;
        for (; j + kLanes <= end; j += kLanes)
          for (int l = 0; l < kLanes; ++l) lane[l] += accumulate_one(grad, acc, j + l);
        for (; j < end; ++j) lane[0] += accumulate_one(grad, acc, j);
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l) s += lane[l];
        mine[f] += s;
        i = end;
        ++f;
      }
    }
  }
  for (int64_t f = 0; f < num_frags; ++f) {
    double s = 0.0;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * num_frags + f];
    norms[f] = static_cast<float>(std::sqrt(s));
  }
}

}  // namespace

at::Tensor accumulate_norms(const at::Tensor& grad, at::Tensor& residual, const at::Tensor& offsets) {
  const int64_t num_frags = offsets.numel() - 1;
  at::Tensor norms = at::empty({num_frags}, grad.options().dtype(at::kFloat));
  const bool fp32_residual = residual.scalar_type() == at::kFloat;
  DEFT_DISPATCH_FLOATS(grad.scalar_type(), "accumulate_norms", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* o = offsets.const_data_ptr<int64_t>();
    float* out = norms.mutable_data_ptr<float>();
    if (fp32_residual)
      accumulate_norms_impl(g, residual.mutable_data_ptr<float>(), o, num_frags, grad.numel(), out);
    else
      accumulate_norms_impl(g, residual.mutable_data_ptr<scalar_t>(), o, num_frags, grad.numel(), out);
  });
  return norms;
}

}  // namespace deft_kernels::cpu
