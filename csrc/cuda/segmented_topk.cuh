// CUDA segmented top-k: the launcher the torch glue (ops_cuda.cpp) calls. Raw pointers and a
// stream only, so neither side needs the other's headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/topk_plan.h"

namespace deft_kernels::cuda {

enum class KeyWidth { k32, k16 };  // fp32 / 16-bit floats (bf16, fp16)

// Radix digits of the key: 11/10/10 bits for fp32's 31-bit key, 8/7 for the 15-bit keys.
inline int key_levels(KeyWidth w) { return w == KeyWidth::k32 ? 3 : 2; }

// Writes plan.total_out indices to `out`: for every segment of the plan, the positions of its k
// largest magnitude keys, plus index_base, ascending, ties to the lower index. `values` is the
// whole flat vector (contiguous), `plan_device` the plan's packed data copied to the device,
// `workspace` plan.workspace.bytes bytes (any content). Enqueues kernels on `stream` and returns
// the first launch error, if any.
cudaError_t segmented_topk_launch(KeyWidth width, const void* values, const TopkPlan& plan,
                                  const int64_t* plan_device, void* workspace, int64_t index_base, int64_t* out,
                                  cudaStream_t stream);

}  // namespace deft_kernels::cuda
