#include <omp.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/magnitude_key.h"

namespace deft_kernels::cpu {
namespace {

template <typename scalar_t>
void topk_one_fragment(const scalar_t* x, int64_t begin, int64_t end, int64_t k, int64_t base, int64_t* out) {
  using Key = typename MagnitudeKey<scalar_t>::type;
  const int64_t size = end - begin;
  if (k == 0) return;
  if (k == size) {
    for (int64_t i = 0; i < size; ++i) out[i] = base + begin + i;
    return;
  }
  std::vector<int64_t> pos(size);
  std::iota(pos.begin(), pos.end(), int64_t{0});
  // Larger key first; among equal keys the lower index first.
  auto before = [&](int64_t a, int64_t b) {
    const Key ka = MagnitudeKey<scalar_t>::of(x[begin + a]);
    const Key kb = MagnitudeKey<scalar_t>::of(x[begin + b]);
    return ka != kb ? ka > kb : a < b;
  };
  std::nth_element(pos.begin(), pos.begin() + (k - 1), pos.end(), before);
  std::sort(pos.begin(), pos.begin() + k);
  for (int64_t i = 0; i < k; ++i) out[i] = base + begin + pos[i];
}

template <typename scalar_t>
void segmented_topk_impl(const scalar_t* x, const int64_t* off, const int64_t* kk, const std::vector<int64_t>& frags,
                         const std::vector<int64_t>& out_start, int64_t base, int64_t* o) {
  const int64_t m = static_cast<int64_t>(frags.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < m; ++i) {
    const int64_t f = frags[i];
    topk_one_fragment<scalar_t>(x, off[f], off[f + 1], kk[f], base, o + out_start[i]);
  }
}

}  // namespace

at::Tensor segmented_topk(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& k,
                          const c10::optional<at::Tensor>& fragments, int64_t index_base) {
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* kk = k.const_data_ptr<int64_t>();
  std::vector<int64_t> frags;
  if (fragments.has_value()) {
    const int64_t* f = fragments->const_data_ptr<int64_t>();
    frags.assign(f, f + fragments->numel());
  } else {
    frags.resize(offsets.numel() - 1);
    std::iota(frags.begin(), frags.end(), int64_t{0});
  }
  const int64_t m = static_cast<int64_t>(frags.size());
  std::vector<int64_t> out_start(m + 1, 0);
  for (int64_t i = 0; i < m; ++i) out_start[i + 1] = out_start[i] + kk[frags[i]];
  at::Tensor out = at::empty({out_start[m]}, values.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  DEFT_DISPATCH_FLOATS(values.scalar_type(), "segmented_topk", [&] {
    segmented_topk_impl<scalar_t>(values.const_data_ptr<scalar_t>(), off, kk, frags, out_start, index_base, o);
  });
  return out;
}

}  // namespace deft_kernels::cpu
