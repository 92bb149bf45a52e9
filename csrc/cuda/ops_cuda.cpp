// Torch glue of the CUDA kernels: registers segmented_topk (segmented_topk.cu) and accumulate_norms
// (accumulate_norms.cu) under the CUDA dispatch key of torch.ops.deft_kernels. sparse_pack and
// sparse_unpack get their CUDA implementation from the Triton kernels (deft_kernels.ops registers
// them lazily, see there).
//
// Host metadata. offsets, k and fragments are small index vectors that the launch needs on the host
// (the output size is sum(k), the launch plan depends on the sizes), so the sync-free way to call
// these ops on CUDA values is with that metadata on the CPU, as torch.topk takes k as a host int:
// the plan is built on the host, uploaded once with a non-blocking copy from pinned memory, and
// nothing is copied back. Metadata on the values' device is accepted too; segmented_topk then
// copies it to the host, which synchronises with the device (accumulate_norms reads device
// offsets in place, unvalidated: its kernel never indexes outside them, see
// accumulate_norms_kernels.cuh).
//
// Built only when the installed torch has CUDA (CMake option DEFT_WITH_CUDA). STATUS: the glue of
// the first CUDA top-k was built and ran on an H200 at commit 8af8162; this version (host
// metadata, new kernels, accumulate_norms) has only been compiled against torch's headers on a
// machine without a GPU (tests/test_cuda_compile.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/accumulate_norms.cuh"
#include "cuda/glue.h"
#include "cuda/segmented_topk.cuh"
#include "metadata_checks.h"

namespace deft_kernels {
namespace {

at::Tensor segmented_topk_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& k,
                               const c10::optional<at::Tensor>& fragments, int64_t index_base) {
  check_cuda_values(values, "values");
  TORCH_CHECK(index_base >= 0, "index_base must be non-negative, got ", index_base);
  const at::Tensor off = host_metadata(offsets, "offsets", at::kLong, values);
  const at::Tensor kk = host_metadata(k, "k", at::kLong, values);
  const int64_t n = values.numel();
  const int64_t* o = off.const_data_ptr<int64_t>();
  check_offsets_data(o, off.numel(), n);
  const int64_t num_frags = off.numel() - 1;
  const int64_t* kp = kk.const_data_ptr<int64_t>();
  check_k_data(o, num_frags, kp, kk.numel());
  at::Tensor fr;
  cuda::FragmentList listed = cuda::all_fragments(num_frags);
  if (fragments.has_value()) {
    fr = host_metadata(*fragments, "fragments", at::kLong, values);
    listed = cuda::listed_fragments(fr.const_data_ptr<int64_t>(), fr.numel());
    check_ids_data(listed.ids, listed.count, "fragments", "fragment", num_frags);
  }

  const c10::cuda::CUDAGuard guard(values.device());
  const auto width = values.scalar_type() == at::kFloat ? cuda::KeyWidth::k32 : cuda::KeyWidth::k16;
  const cuda::KeyFormat fmt = cuda::key_format(width);
  const void* x = values.const_data_ptr();
  const cuda::TopkPlan plan = cuda::make_topk_plan(o, kp, listed, fmt, cuda::vector_shift(x, fmt.vec));
  TORCH_CHECK(plan.largest < (int64_t{1} << 32), "segmented_topk: a selected fragment has ", plan.largest,
              " elements; the CUDA kernel counts a fragment's elements in 32 bits (at most 2^32 - 1)");
  at::Tensor out = at::empty({plan.total_out}, values.options().dtype(at::kLong));
  if (plan.total_out == 0) return out;

  const at::Tensor plan_device = upload(plan.data.data(), static_cast<int64_t>(plan.data.size()), values.device());
  at::Tensor workspace = at::empty({std::max<int64_t>(plan.workspace.bytes, 1)}, values.options().dtype(at::kByte));
  const cudaError_t err =
      cuda::segmented_topk_launch(width, x, n, plan, plan_device.const_data_ptr<int64_t>(),
                                  workspace.mutable_data_ptr(), index_base, out.mutable_data_ptr<int64_t>(),
                                  c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "segmented_topk: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor accumulate_norms_cuda(const at::Tensor& grad, at::Tensor& residual, const at::Tensor& offsets) {
  check_cuda_values(grad, "grad");
  check_cuda_values(residual, "residual");
  TORCH_CHECK(grad.device() == residual.device(), "residual is on ", residual.device(), " but grad is on ",
              grad.device());
  check_accumulate_dtypes(grad.scalar_type(), residual.scalar_type());
  TORCH_CHECK(grad.numel() == residual.numel(), "residual length ", residual.numel(), " must match grad length ",
              grad.numel());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, "offsets must be a 1-D int64 tensor");
  TORCH_CHECK(offsets.numel() >= 1, "offsets must have at least one element (F + 1 for F fragments)");
  TORCH_CHECK(offsets.device().is_cpu() || offsets.device() == grad.device(), "offsets is on ", offsets.device(),
              " but must be on the CPU (no synchronisation) or on grad's device ", grad.device());
  const int64_t num_frags = offsets.numel() - 1;

  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor device_offsets;
  if (offsets.device().is_cpu()) {
    const at::Tensor off = offsets.contiguous();
    check_offsets_data(off.const_data_ptr<int64_t>(), off.numel(), grad.numel());
    device_offsets = upload(off.const_data_ptr<int64_t>(), off.numel(), grad.device());
  } else {
    device_offsets = offsets.contiguous();
  }
  at::Tensor norms = at::empty({num_frags}, grad.options().dtype(at::kFloat));
  at::Tensor workspace =
      at::empty({cuda::accumulate_norms_workspace_bytes(num_frags)}, grad.options().dtype(at::kByte));
  auto type_of = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat      ? cuda::FloatType::f32
           : t.scalar_type() == at::kBFloat16 ? cuda::FloatType::bf16
                                              : cuda::FloatType::f16;
  };
  const cudaError_t err = cuda::accumulate_norms_launch(
      type_of(grad), type_of(residual), grad.const_data_ptr(), residual.mutable_data_ptr(), grad.numel(),
      device_offsets.const_data_ptr<int64_t>(), num_frags, workspace.mutable_data_ptr(),
      norms.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "accumulate_norms: CUDA launch failed: ", cudaGetErrorString(err));
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(deft_kernels, CUDA, m) {
  m.impl("segmented_topk", &segmented_topk_cuda);
  m.impl("accumulate_norms", &accumulate_norms_cuda);
}

}  // namespace deft_kernels
