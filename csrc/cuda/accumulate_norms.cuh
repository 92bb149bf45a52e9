// CUDA accumulate_norms: the launcher the torch glue (ops_cuda.cpp) calls. Raw pointers and a
// stream only, so neither side needs the other's headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deft_kernels::cuda {

enum class FloatType { f32, bf16, f16 };

// Bytes of workspace accumulate_norms_launch needs for num_frags fragments.
int64_t accumulate_norms_workspace_bytes(int64_t num_frags);

// residual <- grad + residual (n contiguous elements each, fp32 arithmetic, one rounding to the
// residual's dtype) and norms[f] = the fp32 L2 norm of residual[offsets[f], offsets[f + 1]) for
// num_frags fragments; grad and residual of one type, or a 16-bit grad with an f32 residual (any
// other pair: cudaErrorInvalidValue, nothing enqueued). offsets and norms on the device, `workspace`
// accumulate_norms_workspace_bytes(num_frags) bytes (any content). Enqueues everything on `stream`
// and returns the first launch error.
cudaError_t accumulate_norms_launch(FloatType grad_type, FloatType residual_type, const void* grad, void* residual,
                                    int64_t n, const int64_t* offsets, int64_t num_frags, void* workspace,
                                    float* norms, cudaStream_t stream);

}  // namespace deft_kernels::cuda
