// Threshold select: the indices of the elements with |x| >= t, plus every NaN and never a zero, in
// each listed segment with its own t, in one pass over the data.
//
// The rule is one integer compare per element on the magnitude key (magnitude_key.h,
// threshold_key). The listed segments, concatenated in list order, are cut into one contiguous
// range per thread. A thread stores every position it visits into its own buffer and advances the
// write cursor only past the selected ones, so the loop has no branch to mispredict whatever the
// share selected, and the data is read once. A prefix sum over the buffers' lengths then places
// each buffer in the output: list order, ascending within a segment, the same for any thread count.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/magnitude_key.h"

namespace deft_kernels::cpu {
namespace {

// Below this many listed elements one thread does it all: a parallel region costs more.
constexpr int64_t kMinParallel = 1 << 16;

// Elements between two checks of a buffer's room; the buffer always has room for one such block.
constexpr int64_t kBlock = 1 << 14;

// Elements whose largest key is compared first: at a typical density (a few percent or less) most
// groups have no selected element and are passed over without a store (measured: about a third
// faster at 1%, a fifth slower when half the elements are selected).
constexpr int64_t kGroup = 16;

// Appends index_base + i for every selected i in [lo, hi) to buf[0, used).
template <typename scalar_t>
void select_range(const scalar_t* x, int64_t lo, int64_t hi, uint32_t key_threshold, int64_t index_base,
                  std::vector<int64_t>& buf, int64_t& used) {
  using Key = MagnitudeKey<scalar_t>;
  auto write = [&](int64_t*& o, int64_t i) {
    *o = index_base + i;
    o += Key::of(x[i]) >= key_threshold;
  };
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t e = std::min(hi, b + kBlock);
    if (static_cast<int64_t>(buf.size()) < used + (e - b))
      buf.resize(std::max<int64_t>(2 * static_cast<int64_t>(buf.size()), used + kBlock));
    int64_t* o = buf.data() + used;
    int64_t i = b;
    for (; i + kGroup <= e; i += kGroup) {
      uint32_t largest = 0;
      for (int64_t j = i; j < i + kGroup; ++j) largest = std::max(largest, Key::of(x[j]));
      if (largest >= key_threshold)
        for (int64_t j = i; j < i + kGroup; ++j) write(o, j);
    }
    for (; i < e; ++i) write(o, i);
    used = o - buf.data();
  }
}

template <typename scalar_t>
at::Tensor threshold_select_impl(const scalar_t* x, const int64_t* off, const float* thresholds,
                                 const std::vector<int64_t>& segs, int64_t index_base, const at::TensorOptions& opts) {
  const int64_t m = static_cast<int64_t>(segs.size());
  // Listed segment i is [start[i], start[i + 1]) of the concatenation of the listed segments.
  std::vector<int64_t> start(m + 1, 0);
  std::vector<uint32_t> key_threshold(m);
  for (int64_t i = 0; i < m; ++i) {
    start[i + 1] = start[i] + off[segs[i] + 1] - off[segs[i]];
    key_threshold[i] = threshold_key<scalar_t>(thresholds[segs[i]]);
  }
  const int64_t listed = start[m];
  const int threads = listed < kMinParallel ? 1 : omp_get_max_threads();
  std::vector<std::vector<int64_t>> buf(threads);
  std::vector<int64_t> out_start(threads + 1, 0);

  auto select_share = [&](int t) {
    const int64_t v0 = listed * t / threads, v1 = listed * (t + 1) / threads;
    // The last listed segment starting at or before v0 (past any empty ones starting there).
    int64_t i = std::upper_bound(start.begin(), start.end(), v0) - start.begin() - 1;
    int64_t used = 0;
    for (int64_t v = v0; v < v1; ++i) {
      const int64_t stop = std::min(v1, start[i + 1]);
      const int64_t first = off[segs[i]] - start[i];  // position of concatenation index 0 in this segment
      select_range(x, first + v, first + stop, key_threshold[i], index_base, buf[t], used);
      v = stop;
    }
    out_start[t + 1] = used;
  };
  if (threads == 1) {
    select_share(0);
  } else {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) select_share(t);
  }

  for (int t = 0; t < threads; ++t) out_start[t + 1] += out_start[t];
  at::Tensor out = at::empty({out_start[threads]}, opts);
  int64_t* o = out.mutable_data_ptr<int64_t>();
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t)
    std::memcpy(o + out_start[t], buf[t].data(), sizeof(int64_t) * (out_start[t + 1] - out_start[t]));
  return out;
}

}  // namespace

at::Tensor threshold_select(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& thresholds,
                            const c10::optional<at::Tensor>& segments, int64_t index_base) {
  const std::vector<int64_t> segs = listed_ids(segments, offsets.numel() - 1);
  at::Tensor out;
  DEFT_DISPATCH_FLOATS(values.scalar_type(), "threshold_select", [&] {
    out = threshold_select_impl<scalar_t>(values.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(),
                                          thresholds.const_data_ptr<float>(), segs, index_base,
                                          values.options().dtype(at::kLong));
  });
  return out;
}

}  // namespace deft_kernels::cpu
