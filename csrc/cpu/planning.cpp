// The leader's share of a DEFT step (docs/algorithm.md, steps 4 and 5) on plain arrays: local k by
// norm and LPT bin packing. deft_kernels.planning calls these; deft_kernels.reference holds the same
// rules in plain Python, and tests/test_planning.py checks that both give identical results.
// They sit on the critical path of every step (the other workers wait for the plan), and the
// Python versions cost about 1 ms for a few hundred fragments with cold caches; these cost
// microseconds. Every floating-point operation below is the one the Python reference does, in the
// same order, so the results are identical, not merely close.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu/planning.h"

namespace deft_kernels::cpu {

std::vector<int64_t> local_k(const double* norms, const int64_t* sizes, int64_t num_frags, int64_t k_total) {
  if (k_total < 0) throw std::invalid_argument("k_total must be a non-negative int, got " + std::to_string(k_total));
  std::vector<int64_t> k(num_frags, 0);
  std::vector<double> norm(num_frags);
  std::vector<int64_t> order;  // the fragments with a finite norm, sorted below
  order.reserve(num_frags);
  int64_t whole = 0;  // budget taken by fragments with a NaN or inf norm: sent whole
  for (int64_t f = 0; f < num_frags; ++f) {
    if (sizes[f] < 0) throw std::invalid_argument("sizes must be non-negative");
    if (std::isfinite(norms[f])) {
      if (norms[f] < 0) throw std::invalid_argument("norms must be non-negative");
      norm[f] = norms[f];
      order.push_back(f);
    } else {
      norm[f] = 0.0;
      k[f] = sizes[f];
      whole += sizes[f];
    }
  }
  // Descending norm; equal norms: lower fragment id first (a stable sort of the ids).
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return norm[a] > norm[b]; });
  double remaining_norm = 0.0;  // in fragment order, non-finite ones as 0.0, as the reference sums
  for (int64_t f = 0; f < num_frags; ++f) remaining_norm += norm[f];
  int64_t remaining_k = std::max<int64_t>(0, k_total - whole);
  for (int64_t f : order) {
    int64_t share = 0;
    if (remaining_k > 0 && remaining_norm > 0) {
      const double q = static_cast<double>(remaining_k) * norm[f] / remaining_norm;
      // Capped at remaining_k: equal in exact arithmetic (norm <= remaining_norm), but the running
      // norm sum is rounded, and the cap keeps the sent-count bound of docs/algorithm.md exact.
      // Python's int() truncates, as the cast does below 2^63; from there on q exceeds remaining_k.
      share = q < 0x1p63 ? std::min(remaining_k, static_cast<int64_t>(q)) : remaining_k;
    }
    k[f] = std::min(sizes[f], std::max<int64_t>(1, share));  // an empty fragment gets nothing
    remaining_k -= k[f];
    remaining_norm -= norm[f];
  }
  // Top-up: what the floors left unassigned goes, in the same order, to the fragments with room,
  // so the plan hands out at least min(k_total, N) (all of it at d = 1, zero norms or not).
  for (auto it = order.begin(); remaining_k > 0 && it != order.end(); ++it) {
    const int64_t add = std::min(remaining_k, sizes[*it] - k[*it]);
    k[*it] += add;
    remaining_k -= add;
  }
  return k;
}

std::vector<std::vector<int64_t>> pack_bins(const double* costs, int64_t num_frags, int64_t world_size,
                                            const int64_t* candidates, int64_t num_candidates) {
  if (world_size < 1) throw std::invalid_argument("world_size must be a positive int");
  for (int64_t f = 0; f < num_frags; ++f)
    if (!std::isfinite(costs[f])) throw std::invalid_argument("costs must be finite");
  std::vector<int64_t> cand(candidates, candidates + num_candidates);
  std::vector<char> seen(num_frags, 0);
  for (int64_t f : cand) {
    if (f < 0 || f >= num_frags || seen[f])
      throw std::invalid_argument("candidates must be distinct fragment ids in [0, " + std::to_string(num_frags) +
                                  ")");
    seen[f] = 1;
  }
  // Largest cost first (ties: lower id), each into the lightest bin (ties: lowest bin id).
  std::sort(cand.begin(), cand.end(),
            [&](int64_t a, int64_t b) { return costs[a] > costs[b] || (costs[a] == costs[b] && a < b); });
  using Load = std::pair<double, int64_t>;
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> heap;
  for (int64_t b = 0; b < world_size; ++b) heap.emplace(0.0, b);
  std::vector<std::vector<int64_t>> bins(world_size);
  for (int64_t f : cand) {
    auto [load, b] = heap.top();
    heap.pop();
    bins[b].push_back(f);
    heap.emplace(load + costs[f], b);
  }
  for (auto& b : bins) std::sort(b.begin(), b.end());
  return bins;
}

DeftPlanArrays make_plan(const double* norms, const int64_t* sizes, int64_t num_frags, int64_t k_total,
                         int64_t world_size, const std::string& cost_model) {
  const bool log_k = cost_model == "size_log_k";
  if (!log_k && cost_model != "size")
    throw std::invalid_argument("cost_model must be 'size' or 'size_log_k', got '" + cost_model + "'");
  DeftPlanArrays plan;
  plan.k = local_k(norms, sizes, num_frags, k_total);
  plan.costs.resize(num_frags);
  std::vector<int64_t> selectable;
  for (int64_t f = 0; f < num_frags; ++f) {
    const int64_t k = plan.k[f];
    const double size = static_cast<double>(sizes[f]);
    // planning.cost_size / cost_size_log_k (std::log2 here, torch.log2 there: equal to within an ulp)
    plan.costs[f] = log_k && k > 1 ? size * std::log2(static_cast<double>(k)) : size;
    if (k == sizes[f] && sizes[f] > 0) plan.common.push_back(f);
    if (k > 0 && k < sizes[f]) selectable.push_back(f);
  }
  plan.bins = pack_bins(plan.costs.data(), num_frags, world_size, selectable.data(),
                        static_cast<int64_t>(selectable.size()));
  return plan;
}

}  // namespace deft_kernels::cpu
