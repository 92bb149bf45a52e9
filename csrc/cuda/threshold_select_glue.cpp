// Torch glue of the CUDA threshold select (threshold_select.cu): registers threshold_select under
// the CUDA dispatch key of torch.ops.deft_kernels.
//
// Synchronisations: offsets, thresholds and segments are host data. Passed as CPU tensors (the
// sync-free way) they are read in place; on the device they are copied to the host first (one
// synchronisation each). The launch plan goes up with one non-blocking copy from pinned memory.
// The output size is data dependent, so the selected count is read back between the two passes:
// that is the op's one device-to-host synchronisation, and the output is allocated exactly (an
// upper-bound allocation would cost 8 bytes per element of the vector).
//
// Built only when the installed torch has CUDA (CMake option DEFT_WITH_CUDA). STATUS: it has not
// been built against a CUDA torch nor run yet (written on a machine with a CPU torch and no GPU;
// tests/test_cuda_compile.py only syntax-checks it there against torch's headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/magnitude_key.h"
#include "cuda/glue.h"
#include "cuda/threshold_select.cuh"
#include "metadata_checks.h"

namespace deft_kernels {
namespace {

uint32_t key_threshold(at::ScalarType dtype, float t) {
  if (dtype == at::kFloat) return cpu::threshold_key<float>(t);
  if (dtype == at::kBFloat16) return cpu::threshold_key<c10::BFloat16>(t);
  return cpu::threshold_key<c10::Half>(t);
}

at::Tensor threshold_select_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& thresholds,
                                 const c10::optional<at::Tensor>& segments, int64_t index_base) {
  check_cuda_values(values, "values");
  const auto dtype = values.scalar_type();
  TORCH_CHECK(index_base >= 0, "index_base must be non-negative, got ", index_base);

  const at::Tensor off = host_metadata(offsets, "offsets", at::kLong, values);
  const at::Tensor thr = host_metadata(thresholds, "thresholds", at::kFloat, values);
  const int64_t* o = off.const_data_ptr<int64_t>();
  check_offsets_data(o, off.numel(), values.numel());
  const int64_t num_segs = off.numel() - 1;
  TORCH_CHECK(thr.numel() == num_segs, "thresholds must have one entry per segment (", num_segs, "), got ",
              thr.numel());
  c10::optional<at::Tensor> seg;
  if (segments.has_value()) {
    seg = host_metadata(*segments, "segments", at::kLong, values);
    check_ids_data(seg->const_data_ptr<int64_t>(), seg->numel(), "segments", "segment", num_segs);
  }
  const std::vector<int64_t> listed = cpu::listed_ids(seg, num_segs);
  const int64_t num_listed = static_cast<int64_t>(listed.size());
  const float* tp = thr.const_data_ptr<float>();
  std::vector<uint32_t> keys(num_listed);
  for (int64_t i = 0; i < num_listed; ++i) keys[i] = key_threshold(dtype, tp[listed[i]]);

  const cuda::SelectPlan plan = cuda::make_select_plan(o, listed.data(), num_listed, keys.data());
  const auto index_options = values.options().dtype(at::kLong);
  if (plan.num_tiles == 0) return at::empty({0}, index_options);
  TORCH_CHECK(plan.num_tiles < INT_MAX, "threshold_select: too many tiles for one launch (", plan.num_tiles, ")");

  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor plan_device = upload(plan.data.data(), static_cast<int64_t>(plan.data.size()), values.device());

  at::Tensor mask = at::empty({plan.num_tiles * cuda::kSelectTileWords}, values.options().dtype(at::kInt));
  at::Tensor tile_count = at::empty({plan.num_tiles}, index_options);
  at::Tensor tile_end = at::empty({plan.num_tiles}, index_options);
  const size_t scan_bytes = cuda::threshold_select_scan_bytes(plan.num_tiles);
  at::Tensor scan_temp = at::empty({static_cast<int64_t>(scan_bytes) + 1}, values.options().dtype(at::kByte));
  const cuda::SelectWorkspace ws{reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<int32_t>()),
                                 tile_count.mutable_data_ptr<int64_t>(), tile_end.mutable_data_ptr<int64_t>(),
                                 scan_temp.mutable_data_ptr(), scan_bytes};
  cudaError_t err = cuda::threshold_select_count(static_cast<int>(values.element_size()), values.const_data_ptr(),
                                                 plan_device.const_data_ptr<int64_t>(), plan.num_segs, plan.num_tiles,
                                                 ws, stream);
  TORCH_CHECK(err == cudaSuccess, "threshold_select: CUDA launch failed: ", cudaGetErrorString(err));

  const int64_t total = tile_end[plan.num_tiles - 1].item<int64_t>();  // the one synchronisation
  at::Tensor out = at::empty({total}, index_options);
  if (total == 0) return out;
  err = cuda::threshold_select_write(plan_device.const_data_ptr<int64_t>(), plan.num_segs, plan.num_tiles, ws,
                                     index_base, out.mutable_data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == cudaSuccess, "threshold_select: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deft_kernels, CUDA, m) { m.impl("threshold_select", &threshold_select_cuda); }

}  // namespace deft_kernels
