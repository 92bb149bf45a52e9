// What the torch glue of every CUDA op needs (ops_cuda.cpp, threshold_select_glue.cpp): the checks
// of the values, the host view of the small metadata, and the one upload of a launch plan.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstring>

namespace deft_kernels {

// A 1-D contiguous CUDA tensor of a supported dtype (fp32, bf16, fp16).
inline void check_cuda_values(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A host view of 1-D metadata of `dtype` that may live on the CPU (read in place: no
// synchronisation) or on the values' device (copied to the host: this synchronises).
inline at::Tensor host_metadata(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& values) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() || t.device() == values.device(), name, " is on ", t.device(),
              " but must be on the CPU (no synchronisation) or on the values' device ", values.device());
  return t.to(at::kCPU).contiguous();
}

// `count` int64 values copied to `device` once: staged in pinned memory, then a non-blocking copy on
// the current stream. The caching host allocator keeps the pinned block until that copy has run.
inline at::Tensor upload(const int64_t* data, int64_t count, const at::Device& device) {
  at::Tensor staged = at::empty({count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staged.mutable_data_ptr<int64_t>(), data, sizeof(int64_t) * static_cast<size_t>(count));
  return staged.to(device, at::kLong, /*non_blocking=*/true);
}

}  // namespace deft_kernels
