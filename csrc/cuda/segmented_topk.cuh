// CUDA segmented top-k: the launcher the torch glue (ops_cuda.cpp) calls. Raw pointers and a
// stream only, so neither side needs the other's headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/topk_plan.h"

namespace deft_kernels::cuda {

enum class KeyWidth { k32, k16 };  // fp32 / 16-bit floats (bf16, fp16)

inline KeyFormat key_format(KeyWidth w) { return w == KeyWidth::k32 ? kKey32Format : kKey16Format; }

// Writes plan.total_out indices to `out`: for every segment of the plan, the positions of its k
// largest magnitude keys, plus index_base, ascending, ties to the lower index. `values` is the
// whole flat vector (n contiguous elements) and must be the pointer the plan was made for (its
// vector_shift); `plan_device` the plan's packed data on the device, `workspace`
// plan.workspace.bytes bytes (any content). Enqueues everything on `stream` (no synchronisation)
// and returns the first launch error, if any.
cudaError_t segmented_topk_launch(KeyWidth width, const void* values, int64_t n, const TopkPlan& plan,
                                  const int64_t* plan_device, void* workspace, int64_t index_base, int64_t* out,
                                  cudaStream_t stream);

}  // namespace deft_kernels::cuda
