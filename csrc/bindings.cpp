// Op schemas and the CPU registrations. This is the only file that includes torch/extension.h
// (it is the slow one to compile). The Python wrappers in deft_kernels.ops check arguments with
// messages that name them (deft_kernels/_checks.py). Here: the O(1) checks of form that memory
// safety needs, and the O(F) checks of the host metadata the kernels read anyway, so that a direct
// torch.ops.deft_kernels.* call with bad input raises instead of reading out of bounds. The one
// pass over data, the range of sparse_pack/sparse_unpack's indices, runs only with validate=true
// (the schema's default, a direct call); the wrappers have done it themselves, or the caller
// vouched for the indices, and pass false. An unchecked out-of-range index is skipped by the
// kernel (never read or written), as in the Triton kernels.
#include <omp.h>
#include <algorithm>
#include <torch/extension.h>

#include "cpu/kernels.h"
#include "cpu/planning.h"
#include "metadata_checks.h"

namespace deft_kernels {
namespace {

void check_float_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_index_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel");
}

void check_offsets(const at::Tensor& offsets, int64_t n) {
  check_index_vector(offsets, "offsets");
  check_offsets_data(offsets.const_data_ptr<int64_t>(), offsets.numel(), n);
}

// Optional ids (fragments, segments) of `count` things: each in [0, count).
void check_ids(const c10::optional<at::Tensor>& ids, const char* name, const char* kind, int64_t count) {
  if (!ids.has_value()) return;
  check_index_vector(*ids, name);
  check_ids_data(ids->const_data_ptr<int64_t>(), ids->numel(), name, kind, count);
}

void check_indices_in_range(const at::Tensor& indices, int64_t n) {
  const int64_t* p = indices.const_data_ptr<int64_t>();
  const int64_t m = indices.numel();
  int64_t lo = 0, hi = 0;
  if (m > 0) {
    lo = hi = p[0];
#pragma omp parallel for reduction(min : lo) reduction(max : hi) if (m > (1 << 16))
    for (int64_t i = 0; i < m; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
  }
  TORCH_CHECK_VALUE(m == 0 || (lo >= 0 && hi < n), "indices must lie in [0, ", n, "), got values in [", lo, ", ",
                    hi, "]");
}

at::Tensor accumulate_norms_cpu(const at::Tensor& grad, at::Tensor& residual, const at::Tensor& offsets) {
  check_float_vector(grad, "grad");
  check_float_vector(residual, "residual");
  check_accumulate_dtypes(grad.scalar_type(), residual.scalar_type());
  TORCH_CHECK(grad.numel() == residual.numel(), "residual length ", residual.numel(), " must match grad length ",
              grad.numel());
  check_offsets(offsets, grad.numel());
  return cpu::accumulate_norms(grad, residual, offsets);
}

at::Tensor segmented_topk_cpu(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& k,
                              const c10::optional<at::Tensor>& fragments, int64_t index_base) {
  check_float_vector(values, "values");
  check_offsets(offsets, values.numel());
  check_index_vector(k, "k");
  const int64_t num_frags = offsets.numel() - 1;
  check_k_data(offsets.const_data_ptr<int64_t>(), num_frags, k.const_data_ptr<int64_t>(), k.numel());
  check_ids(fragments, "fragments", "fragment", num_frags);
  TORCH_CHECK(index_base >= 0, "index_base must be non-negative, got ", index_base);
  return cpu::segmented_topk(values, offsets, k, fragments, index_base);
}

at::Tensor threshold_select_cpu(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& thresholds,
                                const c10::optional<at::Tensor>& segments, int64_t index_base) {
  check_float_vector(values, "values");
  check_offsets(offsets, values.numel());
  const int64_t num_segs = offsets.numel() - 1;
  TORCH_CHECK(thresholds.dim() == 1, "thresholds must be 1-D, got shape ", thresholds.sizes());
  TORCH_CHECK(thresholds.scalar_type() == at::kFloat, "thresholds must be float32, got ", thresholds.scalar_type());
  TORCH_CHECK(thresholds.is_contiguous() && thresholds.device().is_cpu(),
              "thresholds must be a contiguous CPU tensor for the CPU kernel");
  TORCH_CHECK(thresholds.numel() == num_segs, "thresholds must have one entry per segment (", num_segs, "), got ",
              thresholds.numel());
  check_ids(segments, "segments", "segment", num_segs);
  TORCH_CHECK(index_base >= 0, "index_base must be non-negative, got ", index_base);
  return cpu::threshold_select(values, offsets, thresholds, segments, index_base);
}

at::Tensor sparse_pack_cpu(const at::Tensor& values, const at::Tensor& indices, bool validate) {
  check_float_vector(values, "values");
  check_index_vector(indices, "indices");
  if (validate) check_indices_in_range(indices, values.numel());
  return cpu::sparse_pack(values, indices);
}

at::Tensor sparse_unpack_cpu(at::Tensor& residual, const at::Tensor& indices, const at::Tensor& values,
                             double scale, bool validate) {
  check_float_vector(residual, "residual");
  check_index_vector(indices, "indices");
  check_float_vector(values, "values");
  TORCH_CHECK(values.scalar_type() == residual.scalar_type(), "values dtype ", values.scalar_type(),
              " must match residual dtype ", residual.scalar_type());
  TORCH_CHECK(values.numel() == indices.numel(), "values length ", values.numel(), " must match indices length ",
              indices.numel());
  if (validate) check_indices_in_range(indices, residual.numel());
  return cpu::sparse_unpack(residual, indices, values, scale);
}

}  // namespace

TORCH_LIBRARY(deft_kernels, m) {
  m.def("accumulate_norms(Tensor grad, Tensor(a!) residual, Tensor offsets) -> Tensor");
  m.def("segmented_topk(Tensor values, Tensor offsets, Tensor k, Tensor? fragments=None, int index_base=0) -> Tensor");
  m.def("threshold_select(Tensor values, Tensor offsets, Tensor thresholds, Tensor? segments=None, "
        "int index_base=0) -> Tensor");
  m.def("sparse_pack(Tensor values, Tensor indices, bool validate=True) -> Tensor");
  m.def("sparse_unpack(Tensor(a!) residual, Tensor indices, Tensor values, float scale, bool validate=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(deft_kernels, CPU, m) {
  m.impl("accumulate_norms", &accumulate_norms_cpu);
  m.impl("segmented_topk", &segmented_topk_cpu);
  m.impl("threshold_select", &threshold_select_cpu);
  m.impl("sparse_pack", &sparse_pack_cpu);
  m.impl("sparse_unpack", &sparse_unpack_cpu);
}

namespace {

// Planning helpers for deft_kernels.planning, which checks the Python types; here the tensors are
// brought to contiguous CPU form and the values are checked by the plain-array code.
template <typename T>
at::Tensor to_tensor(const std::vector<T>& v, at::ScalarType dtype) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, dtype);
  std::copy(v.begin(), v.end(), t.data_ptr<T>());
  return t;
}

std::vector<at::Tensor> to_tensors(const std::vector<std::vector<int64_t>>& bins) {
  std::vector<at::Tensor> out;
  out.reserve(bins.size());
  for (const auto& b : bins) out.push_back(to_tensor(b, at::kLong));
  return out;
}

std::pair<at::Tensor, at::Tensor> plan_inputs(const at::Tensor& norms, const at::Tensor& sizes) {
  TORCH_CHECK(norms.dim() == 1 && sizes.dim() == 1 && norms.numel() == sizes.numel(),
              "norms and sizes must be 1-D with one entry per fragment");
  return {norms.to(at::kCPU, at::kDouble).contiguous(), sizes.to(at::kCPU, at::kLong).contiguous()};
}

at::Tensor plan_local_k(const at::Tensor& norms, const at::Tensor& sizes, int64_t k_total) {
  auto [n64, s64] = plan_inputs(norms, sizes);
  return to_tensor(cpu::local_k(n64.const_data_ptr<double>(), s64.const_data_ptr<int64_t>(), n64.numel(), k_total),
                   at::kLong);
}

std::vector<at::Tensor> plan_pack_bins(const at::Tensor& costs, int64_t world_size, const at::Tensor& candidates) {
  TORCH_CHECK(costs.dim() == 1 && candidates.dim() == 1, "costs and candidates must be 1-D");
  const at::Tensor c64 = costs.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor cand = candidates.to(at::kCPU, at::kLong).contiguous();
  return to_tensors(cpu::pack_bins(c64.const_data_ptr<double>(), c64.numel(), world_size,
                                   cand.const_data_ptr<int64_t>(), cand.numel()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> plan_make(const at::Tensor& norms,
                                                                                  const at::Tensor& sizes,
                                                                                  int64_t k_total, int64_t world_size,
                                                                                  const std::string& cost_model) {
  auto [n64, s64] = plan_inputs(norms, sizes);
  cpu::DeftPlanArrays plan = cpu::make_plan(n64.const_data_ptr<double>(), s64.const_data_ptr<int64_t>(), n64.numel(),
                                            k_total, world_size, cost_model);
  return {to_tensor(plan.k, at::kLong), to_tensor(plan.common, at::kLong), to_tensor(plan.costs, at::kDouble),
          to_tensors(plan.bins)};
}

}  // namespace
}  // namespace deft_kernels

PYBIND11_MODULE(_C, m) {
  m.doc() = "deft_kernels compiled ops; importing this module registers torch.ops.deft_kernels.*";
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
  m.def("plan_local_k", &deft_kernels::plan_local_k, "local k by norm (deft_kernels.planning.local_k)",
        pybind11::arg("norms"), pybind11::arg("sizes"), pybind11::arg("k_total"));
  m.def("plan_pack_bins", &deft_kernels::plan_pack_bins, "LPT bin packing (deft_kernels.planning.pack_bins)",
        pybind11::arg("costs"), pybind11::arg("world_size"), pybind11::arg("candidates"));
  m.def("plan_make", &deft_kernels::plan_make,
        "a whole DEFT plan with a named cost model (deft_kernels.planning.make_plan)", pybind11::arg("norms"),
        pybind11::arg("sizes"), pybind11::arg("k_total"), pybind11::arg("world_size"), pybind11::arg("cost_model"));
}
