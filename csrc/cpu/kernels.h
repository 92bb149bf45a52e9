// CPU kernels of deft_kernels. Each function assumes its arguments were validated by
// check_* in bindings.cpp (dtype, device, contiguity, lengths); the kernels only compute.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <numeric>
#include <vector>

// The dtypes every op accepts: fp32, bf16, fp16 (fp32 arithmetic inside for the 16-bit ones).
#define DEFT_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace deft_kernels::cpu {

// The ids an op works on: those in `ids` (fragments, segments) in their order, or all `count` in order.
inline std::vector<int64_t> listed_ids(const c10::optional<at::Tensor>& ids, int64_t count) {
  std::vector<int64_t> out;
  if (ids.has_value()) {
    const int64_t* p = ids->const_data_ptr<int64_t>();
    out.assign(p, p + ids->numel());
  } else {
    out.resize(count);
    std::iota(out.begin(), out.end(), int64_t{0});
  }
  return out;
}

// a = grad + residual (fp32 arithmetic, one rounding to residual's dtype), written into residual;
// returns the fp32 L2 norm of a per fragment. residual has grad's dtype, or is fp32 (any grad dtype;
// the bindings allow it under a 16-bit grad: check_accumulate_dtypes).
at::Tensor accumulate_norms(const at::Tensor& grad, at::Tensor& residual, const at::Tensor& offsets);

// Global indices (index_base + position) of the k[f] largest |values| of every fragment f in
// `fragments` (all fragments when undefined), concatenated in that order, ascending within a
// fragment. Magnitude order is the order of |x|'s bit pattern (NaN above +inf); ties go to the
// lower index.
at::Tensor segmented_topk(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& k,
                          const c10::optional<at::Tensor>& fragments, int64_t index_base);

// Global indices (index_base + position) of the elements x of every segment s in `segments` (all
// segments when undefined) with |x| >= thresholds[s] (fp32) and x != 0, and of every NaN;
// concatenated in that order, ascending within a segment.
at::Tensor threshold_select(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& thresholds,
                            const c10::optional<at::Tensor>& segments, int64_t index_base);

// values[indices]
at::Tensor sparse_pack(const at::Tensor& values, const at::Tensor& indices);

// out = zeros_like(residual); out[indices] = values * scale; residual[indices] = 0.
at::Tensor sparse_unpack(at::Tensor& residual, const at::Tensor& indices, const at::Tensor& values,
                         double scale);

}  // namespace deft_kernels::cpu
