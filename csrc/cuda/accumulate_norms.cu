// The CUDA accumulate_norms's entry point: the kernel (accumulate_norms_kernels.cuh) with real launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launch.cuh"
// clang-format off
#include "cuda/accumulate_norms_kernels.cuh"
// clang-format on
#include "cuda/accumulate_norms.cuh"

namespace deft_kernels::cuda {

int64_t accumulate_norms_workspace_bytes(int64_t num_frags) { return norms::workspace_bytes(num_frags); }

cudaError_t accumulate_norms_launch(FloatType grad_type, FloatType residual_type, const void* grad, void* residual,
                                    int64_t n, const int64_t* offsets, int64_t num_frags, void* workspace,
                                    float* norms, cudaStream_t stream) {
  using norms::Bf16, norms::Fp16, norms::Fp32;
  if (grad_type == residual_type) {
    switch (grad_type) {
      case FloatType::f32:
        return norms::launch<Fp32, Fp32>(grad, residual, n, offsets, num_frags, workspace, norms, stream);
      case FloatType::bf16:
        return norms::launch<Bf16, Bf16>(grad, residual, n, offsets, num_frags, workspace, norms, stream);
      case FloatType::f16:
        return norms::launch<Fp16, Fp16>(grad, residual, n, offsets, num_frags, workspace, norms, stream);
    }
  } else if (residual_type == FloatType::f32) {
    if (grad_type == FloatType::bf16)
      return norms::launch<Bf16, Fp32>(grad, residual, n, offsets, num_frags, workspace, norms, stream);
    if (grad_type == FloatType::f16)
      return norms::launch<Fp16, Fp32>(grad, residual, n, offsets, num_frags, workspace, norms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace deft_kernels::cuda
