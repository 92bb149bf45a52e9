#include <ATen/ops/zeros.h>

#include <cstdint>

#include "cpu/kernels.h"

namespace deft_kernels::cpu {
namespace {

// An index outside [0, n) (possible only when the caller skipped the check, validate=false) is
// skipped: never read or written; pack gives 0 for it. One unsigned compare per element.
template <typename scalar_t>
void pack_impl(const scalar_t* x, int64_t n, const int64_t* idx, int64_t m, scalar_t* o) {
#pragma omp parallel for schedule(static) if (m > (1 << 16))
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = idx[i];
    o[i] = static_cast<uint64_t>(j) < static_cast<uint64_t>(n) ? x[j] : scalar_t(0);
  }
}

template <typename scalar_t>
void unpack_impl(scalar_t* r, int64_t n, const int64_t* idx, const scalar_t* v, float scale, int64_t m,
                 scalar_t* o) {
#pragma omp parallel for schedule(static) if (m > (1 << 16))
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = idx[i];
    if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) continue;
    o[j] = static_cast<scalar_t>(static_cast<float>(v[i]) * scale);
    r[j] = scalar_t(0);
  }
}

}  // namespace

at::Tensor sparse_pack(const at::Tensor& values, const at::Tensor& indices) {
  at::Tensor out = at::empty({indices.numel()}, values.options());
  DEFT_DISPATCH_FLOATS(values.scalar_type(), "sparse_pack", [&] {
    pack_impl<scalar_t>(values.const_data_ptr<scalar_t>(), values.numel(), indices.const_data_ptr<int64_t>(),
                        indices.numel(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor sparse_unpack(at::Tensor& residual, const at::Tensor& indices, const at::Tensor& values,
                         double scale) {
  // A fresh dense buffer costs a page fault per page on first touch, whoever zeroes it; at::zeros
  // does that fastest (measured: an OpenMP fill loop here took twice as long).
  at::Tensor out = at::zeros({residual.numel()}, residual.options());
  DEFT_DISPATCH_FLOATS(residual.scalar_type(), "sparse_unpack", [&] {
    unpack_impl<scalar_t>(residual.mutable_data_ptr<scalar_t>(), residual.numel(), indices.const_data_ptr<int64_t>(),
                          values.const_data_ptr<scalar_t>(), static_cast<float>(scale), indices.numel(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace deft_kernels::cpu
