// The CUDA segmented top-k's entry point: the kernels (segmented_topk_kernels.cuh) with real launches.
#include "cuda/launch.cuh"
// clang-format off
#include "cuda/segmented_topk_kernels.cuh"
// clang-format on
#include "cuda/segmented_topk.cuh"

namespace deft_kernels::cuda {

cudaError_t segmented_topk_launch(KeyWidth width, const void* values, int64_t n, const TopkPlan& plan,
                                  const int64_t* plan_device, void* workspace, int64_t index_base, int64_t* out,
                                  cudaStream_t stream) {
  return width == KeyWidth::k32
             ? topk::launch<topk::Key32>(values, n, plan, plan_device, workspace, index_base, out, stream)
             : topk::launch<topk::Key16>(values, n, plan, plan_device, workspace, index_base, out, stream);
}

}  // namespace deft_kernels::cuda
