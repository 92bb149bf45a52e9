#include <ATen/ops/zeros.h>

#include "cpu/kernels.h"

namespace deft_kernels::cpu {
namespace {

template <typename scalar_t>
void pack_impl(const scalar_t* x, const int64_t* idx, int64_t m, scalar_t* o) {
#pragma omp parallel for schedule(static) if (m > (1 << 16))
  for (int64_t i = 0; i < m; ++i) o[i] = x[idx[i]];
}

template <typename scalar_t>
void unpack_impl(scalar_t* r, const int64_t* idx, const scalar_t* v, float scale, int64_t m, scalar_t* o) {
#pragma omp parallel for schedule(static) if (m > (1 << 16))
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = idx[i];
    o[j] = static_cast<scalar_t>(static_cast<float>(v[i]) * scale);
    r[j] = scalar_t(0);
  }
}

}  // namespace

at::Tensor sparse_pack(const at::Tensor& values, const at::Tensor& indices) {
  at::Tensor out = at::empty({indices.numel()}, values.options());
  DEFT_DISPATCH_FLOATS(values.scalar_type(), "sparse_pack", [&] {
    pack_impl<scalar_t>(values.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(), indices.numel(),
                        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor sparse_unpack(at::Tensor& residual, const at::Tensor& indices, const at::Tensor& values,
                         double scale) {
  // A fresh dense buffer costs a page fault per page on first touch, whoever zeroes it; at::zeros
  // does that fastest (measured: an OpenMP fill loop here took twice as long).
  at::Tensor out = at::zeros({residual.numel()}, residual.options());
  DEFT_DISPATCH_FLOATS(residual.scalar_type(), "sparse_unpack", [&] {
    unpack_impl<scalar_t>(residual.mutable_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
                          values.const_data_ptr<scalar_t>(), static_cast<float>(scale), indices.numel(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace deft_kernels::cpu
