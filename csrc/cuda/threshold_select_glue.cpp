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
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/magnitude_key.h"
#include "cuda/threshold_select.cuh"
#include "metadata_checks.h"

namespace deft_kernels {
namespace {

// A contiguous host copy of 1-D metadata of the given dtype that sits on the CPU or on values' device.
at::Tensor on_host(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& values) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() || t.device() == values.device(), name, " is on ", t.device(), " but values is on ",
              values.device(), "; it must be on the CPU or on the values' device");
  return t.to(at::kCPU).contiguous();
}

uint32_t key_threshold(at::ScalarType dtype, float t) {
  if (dtype == at::kFloat) return cpu::threshold_key<float>(t);
  if (dtype == at::kBFloat16) return cpu::threshold_key<c10::BFloat16>(t);
  return cpu::threshold_key<c10::Half>(t);
}

at::Tensor threshold_select_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& thresholds,
                                 const c10::optional<at::Tensor>& segments, int64_t index_base) {
  TORCH_CHECK(values.is_cuda(), "values must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(values.dim() == 1, "values must be 1-D, got shape ", values.sizes());
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "values must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(index_base >= 0, "index_base must be non-negative, got ", index_base);

  const at::Tensor off = on_host(offsets, "offsets", at::kLong, values);
  const at::Tensor thr = on_host(thresholds, "thresholds", at::kFloat, values);
  const int64_t* o = off.const_data_ptr<int64_t>();
  check_offsets_data(o, off.numel(), values.numel());
  const int64_t num_segs = off.numel() - 1;
  TORCH_CHECK(thr.numel() == num_segs, "thresholds must have one entry per segment (", num_segs, "), got ",
              thr.numel());
  c10::optional<at::Tensor> seg;
  if (segments.has_value()) {
    seg = on_host(*segments, "segments", at::kLong, values);
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
  const int64_t plan_size = static_cast<int64_t>(plan.data.size());
  at::Tensor plan_host = at::empty({plan_size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(plan_host.mutable_data_ptr<int64_t>(), plan.data.data(), sizeof(int64_t) * plan_size);
  // Non-blocking from pinned memory: the caching host allocator keeps plan_host's block until the
  // copy has run.
  const at::Tensor plan_device = plan_host.to(index_options, /*non_blocking=*/true);

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
