// Torch glue of the CUDA kernels: registers segmented_topk (segmented_topk.cu) under the CUDA
// dispatch key of torch.ops.deft_kernels. The other ops get their CUDA implementation from the
// Triton kernels (python/deft_kernels/triton_ops.py), registered from Python.
//
// Built only when the installed torch has CUDA (CMake option DEFT_WITH_CUDA). STATUS: it has not
// been built against a CUDA torch nor run yet (written on a machine with a CPU torch and no GPU;
// tests/test_cuda_compile.py only syntax-checks it there against torch's headers). The .cu side
// takes raw pointers and a stream, so this file is the only one that sees both torch and CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "cuda/segmented_topk.cuh"

namespace deft_kernels {
namespace {

// A host copy of a small int64 vector (offsets, k, fragment ids), checked like the CPU op checks it.
at::Tensor host_index_vector(const at::Tensor& t, const char* name, const at::Tensor& values) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == values.device(), name, " is on ", t.device(), " but values is on ", values.device());
  return t.to(at::kCPU).contiguous();
}

at::Tensor segmented_topk_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& k,
                               const c10::optional<at::Tensor>& fragments, int64_t index_base) {
  TORCH_CHECK(values.is_cuda(), "values must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(values.dim() == 1, "values must be 1-D, got shape ", values.sizes());
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "values must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(index_base >= 0, "index_base must be non-negative, got ", index_base);

  // The output size depends on k, so the small index vectors are read on the host (one
  // synchronisation) and the launch plan is built there.
  const at::Tensor off = host_index_vector(offsets, "offsets", values);
  const at::Tensor kk = host_index_vector(k, "k", values);
  const int64_t n = values.numel();
  const int64_t num_frags = off.numel() - 1;
  TORCH_CHECK(num_frags >= 0, "offsets must have at least one element (F + 1 for F fragments)");
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(o[num_frags] == n, "offsets[-1] must equal the vector length ", n, ", got ", o[num_frags]);
  for (int64_t f = 0; f < num_frags; ++f)
    TORCH_CHECK(o[f + 1] >= o[f], "offsets must be non-decreasing, but offsets[", f + 1, "] = ", o[f + 1],
                " < offsets[", f, "] = ", o[f]);
  TORCH_CHECK(kk.numel() == num_frags, "k must have one entry per fragment (", num_frags, "), got ", kk.numel());
  const int64_t* kp = kk.const_data_ptr<int64_t>();
  for (int64_t f = 0; f < num_frags; ++f)
    TORCH_CHECK(kp[f] >= 0 && kp[f] <= o[f + 1] - o[f], "k[", f, "] = ", kp[f], " must lie in [0, ", o[f + 1] - o[f],
                "] (the size of fragment ", f, ")");
  at::Tensor fr;
  cuda::FragmentList listed = cuda::all_fragments(num_frags);
  if (fragments.has_value()) {
    fr = host_index_vector(*fragments, "fragments", values);
    listed = cuda::listed_fragments(fr.const_data_ptr<int64_t>(), fr.numel());
    for (int64_t i = 0; i < listed.count; ++i)
      TORCH_CHECK(listed[i] >= 0 && listed[i] < num_frags, "fragments[", i, "] = ", listed[i],
                  " is not a fragment id in [0, ", num_frags, ")");
  }

  const auto width = dtype == at::kFloat ? cuda::KeyWidth::k32 : cuda::KeyWidth::k16;
  const cuda::TopkPlan plan = cuda::make_topk_plan(o, kp, listed, cuda::key_levels(width));
  at::Tensor out = at::empty({plan.total_out}, values.options().dtype(at::kLong));
  if (plan.total_out == 0) return out;

  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t plan_size = static_cast<int64_t>(plan.data.size());
  at::Tensor plan_host = at::empty({plan_size}, off.options());
  std::memcpy(plan_host.mutable_data_ptr<int64_t>(), plan.data.data(), sizeof(int64_t) * plan_size);
  const at::Tensor plan_device = plan_host.to(values.device());  // blocking copy: plan_host may go
  at::Tensor workspace = at::empty({std::max<int64_t>(plan.workspace.bytes, 1)}, values.options().dtype(at::kByte));
  const cudaError_t err = cuda::segmented_topk_launch(
      width, values.const_data_ptr(), plan, plan_device.const_data_ptr<int64_t>(), workspace.mutable_data_ptr(),
      index_base, out.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "segmented_topk: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deft_kernels, CUDA, m) { m.impl("segmented_topk", &segmented_topk_cuda); }

}  // namespace deft_kernels
