// Host-side planning of a DEFT step on plain arrays (no torch): see planning.cpp. Bad values throw
// std::invalid_argument (ValueError in Python) with a message that names the argument.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace deft_kernels::cpu {

// Per-fragment k sharing k_total by norm, then the top-up of what the floors left (docs/algorithm.md,
// step 4; NaN/inf norm: the fragment is sent whole).
std::vector<int64_t> local_k(const double* norms, const int64_t* sizes, int64_t num_frags, int64_t k_total);

// LPT: candidates by descending cost (ties: lower id) into the lightest of world_size bins (ties:
// lowest bin id). Returns each bin's fragment ids, ascending.
std::vector<std::vector<int64_t>> pack_bins(const double* costs, int64_t num_frags, int64_t world_size,
                                            const int64_t* candidates, int64_t num_candidates);

// A whole plan (planning.make_plan with a named cost model) in one call: local k, the common part
// (k == size > 0), each fragment's cost and the LPT bins of the fragments with 0 < k < size.
struct DeftPlanArrays {
  std::vector<int64_t> k;
  std::vector<int64_t> common;
  std::vector<double> costs;
  std::vector<std::vector<int64_t>> bins;
};
DeftPlanArrays make_plan(const double* norms, const int64_t* sizes, int64_t num_frags, int64_t k_total,
                         int64_t world_size, const std::string& cost_model);

}  // namespace deft_kernels::cpu
