// Segmented top-k by radix select on the magnitude key (magnitude_key.h); no fragment is sorted.
//
// For one fragment of n elements and a local k:
//   1. Histogram of the key's top digit over the fragment. Walking the bins from the top gives the
//      bin b holding the k-th largest key, `above` = the count in higher bins, and `need` = how many
//      of bin b's elements are still to be taken.
//   2. One pass writes the positions with digit > b straight into the output (they are selected)
//      and gathers the (key, position) pairs of bin b, the candidates, into a small buffer.
//   3. The lower digits are resolved on the candidates only, which gives the threshold key T and
//      how many candidates equal to T to take: every candidate above T plus the first ones equal to
//      T in index order (the lower-index tie rule).
//   4. The selected candidates are merged with the positions from step 2; both lists are in index
//      order, so the output comes out ascending with no sort.
// When bin b holds a large share of the fragment (heavy ties: zeros, a constant layer), gathering
// it would cost as much memory as the data, so the lower digits are resolved by re-scanning the
// fragment with a prefix filter instead, and one compaction pass writes the output.
//
// Parallelism: small fragments are spread over threads, one fragment per task, largest first; a
// fragment larger than a share of the work is split into one contiguous chunk per thread, with
// per-thread histograms merged, and per-thread counts prefix-summed so every thread writes its own
// slice of the output and of the candidate buffer. All positions and counts are int64.
#include <omp.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/magnitude_key.h"

namespace deft_kernels::cpu {
namespace {

// Digits of the key from the top: 11/10/10 bits for fp32's 31-bit key, 8/7 for the 15-bit keys.
// The top digit is the widest because it is the one histogrammed over the whole fragment.
struct DigitPlan {
  int levels;
  std::array<int, 3> shift;
  std::array<int, 3> width;
};

constexpr DigitPlan plan_for_bits(int bits) {
  return bits == 31 ? DigitPlan{3, {20, 10, 0}, {11, 10, 10}} : DigitPlan{2, {7, 0, 0}, {8, 7, 0}};
}

constexpr int kMaxBins = 1 << 11;

// Candidate buffers larger than this share of the fragment switch to the re-scan path.
constexpr int64_t kCandidateShareDenominator = 8;

// Fragments at least this large are split across threads when there is more than one thread.
constexpr int64_t kMinSplitSize = 1 << 18;

using Histogram = std::array<int64_t, kMaxBins>;

struct BinChoice {
  uint32_t bin;
  int64_t above;  // elements in higher bins
  int64_t need;   // elements of `bin` still to take, 1 <= need <= count[bin]
};

// The bin that holds the need-th largest element (need >= 1, need <= total count).
BinChoice choose_bin(const int64_t* hist, int bins, int64_t need) {
  int64_t above = 0;
  for (int b = bins - 1; b >= 0; --b) {
    if (above + hist[b] >= need) return {static_cast<uint32_t>(b), above, need - above};
    above += hist[b];
  }
  return {0, above, need - above};  // unreachable for a valid need
}

template <typename scalar_t>
struct Fragment {
  using Key = MagnitudeKey<scalar_t>;
  static constexpr DigitPlan kPlan = plan_for_bits(Key::kBits);

  static uint32_t digit(uint32_t key, int level) {
    return (key >> kPlan.shift[level]) & ((1u << kPlan.width[level]) - 1u);
  }
  // Histogram of the top digit over x[0, n). Two interleaved tables halve the store-to-load
  // stalls when neighbouring elements fall into the same bin, which is the common case.
  static void top_histogram(const scalar_t* x, int64_t n, int64_t* hist) {
    constexpr int bins = 1 << kPlan.width[0];
    constexpr int shift = kPlan.shift[0];
    std::array<int64_t, 2 * bins> h{};
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
      ++h[Key::of(x[i]) >> shift];
      ++h[bins + (Key::of(x[i + 1]) >> shift)];
    }
    if (i < n) ++h[Key::of(x[i]) >> shift];
    for (int b = 0; b < bins; ++b) hist[b] = h[b] + h[bins + b];
  }

  // Histogram of `level`'s digit over the elements of x[0, n) whose higher bits equal `pfx`.
  static void filtered_histogram(const scalar_t* x, int64_t n, int level, uint32_t pfx, int64_t* hist) {
    std::fill(hist, hist + (1 << kPlan.width[level]), 0);
    const int hi_shift = kPlan.shift[level - 1];
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = Key::of(x[i]);
      if ((key >> hi_shift) == pfx) ++hist[digit(key, level)];
    }
  }
};

// Scratch of one thread: the candidates of the fragment it is working on, and those selected.
struct Scratch {
  std::vector<uint32_t> cand_key;
  std::vector<int64_t> cand_pos;
  std::vector<int64_t> selected;
};

// Resolves the lower digits on the candidates (all sharing top digit `top.bin`) and writes the
// positions of the `top.need` selected ones, in index order, to `sel`.
void select_candidates(const uint32_t* key, const int64_t* pos, int64_t m, int levels,
                       const std::array<int, 3>& shift, const std::array<int, 3>& width, BinChoice top,
                       int64_t* sel) {
  uint32_t threshold = top.bin;  // the key bits resolved so far, aligned to the current level
  int64_t need = top.need;
  Histogram hist;
  for (int level = 1; level < levels; ++level) {
    const int bins = 1 << width[level];
    std::fill(hist.begin(), hist.begin() + bins, 0);
    const int hi_shift = shift[level - 1];
    const uint32_t mask = static_cast<uint32_t>(bins - 1);
    for (int64_t i = 0; i < m; ++i)
      if ((key[i] >> hi_shift) == threshold) ++hist[(key[i] >> shift[level]) & mask];
    const BinChoice c = choose_bin(hist.data(), bins, need);
    threshold = (threshold << width[level]) | c.bin;
    need = c.need;
  }
  const int64_t out_n = top.need;
  int64_t w = 0;
  for (int64_t i = 0; i < m && w < out_n; ++i) {
    if (key[i] > threshold) {
      sel[w++] = pos[i];
    } else if (key[i] == threshold && need > 0) {
      sel[w++] = pos[i];
      --need;
    }
  }
}

// out[0, a) and sel[0, b) are ascending; merges them into out[0, a + b) from the back, in place.
void merge_into(int64_t* out, int64_t a, const int64_t* sel, int64_t b) {
  int64_t i = a - 1, j = b - 1, w = a + b - 1;
  while (j >= 0) out[w--] = (i >= 0 && out[i] > sel[j]) ? out[i--] : sel[j--];
}

// Selects the top k of x[begin, end) into out (global indices), using `threads` threads (1: the
// calling thread only, no parallel region). `scratch` has one entry per thread; only entry 0 is
// used for the candidates of a split fragment.
template <typename scalar_t>
void select_fragment(const scalar_t* values, int64_t begin, int64_t end, int64_t k, int64_t base, int64_t* out,
                     int threads, Scratch* scratch) {
  using F = Fragment<scalar_t>;
  using Key = typename F::Key;
  constexpr DigitPlan plan = F::kPlan;
  constexpr int top_bins = 1 << plan.width[0];
  const int64_t n = end - begin;
  const scalar_t* x = values + begin;
  const int64_t first = base + begin;  // global index of x[0]
  if (k == 0) return;
  if (k == n) {
    for (int64_t i = 0; i < n; ++i) out[i] = first + i;
    return;
  }

  // Chunk t of the fragment is [chunk[t], chunk[t + 1]).
  std::vector<int64_t> chunk(threads + 1);
  for (int t = 0; t <= threads; ++t) chunk[t] = n * t / threads;
  auto for_each_chunk = [&](auto&& body) {
    if (threads == 1) {
      body(0);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
      for (int t = 0; t < threads; ++t) body(t);
    }
  };

  std::vector<Histogram> hist(threads);
  for_each_chunk([&](int t) { F::top_histogram(x + chunk[t], chunk[t + 1] - chunk[t], hist[t].data()); });
  Histogram total{};
  for (int t = 0; t < threads; ++t)
    for (int b = 0; b < top_bins; ++b) total[b] += hist[t][b];
  const BinChoice top = choose_bin(total.data(), top_bins, k);
  const int64_t tied = total[top.bin];

  // Per thread: how many of its elements lie strictly above the threshold found so far, and how
  // many share the threshold's prefix.
  std::vector<int64_t> gt(threads), eq(threads);
  for (int t = 0; t < threads; ++t) {
    gt[t] = std::accumulate(hist[t].begin() + top.bin + 1, hist[t].begin() + top_bins, int64_t{0});
    eq[t] = hist[t][top.bin];
  }

  if (tied <= std::max<int64_t>(n / kCandidateShareDenominator, 1 << 12)) {
    std::vector<int64_t> gt_off(threads + 1, 0), eq_off(threads + 1, 0);
    for (int t = 0; t < threads; ++t) {
      gt_off[t + 1] = gt_off[t] + gt[t];
      eq_off[t + 1] = eq_off[t] + eq[t];
    }
    Scratch& s = scratch[0];
    s.cand_key.resize(tied);
    s.cand_pos.resize(tied);
    for_each_chunk([&](int t) {
      int64_t* o = out + gt_off[t];
      uint32_t* ck = s.cand_key.data() + eq_off[t];
      int64_t* cp = s.cand_pos.data() + eq_off[t];
      constexpr int shift = plan.shift[0];
      for (int64_t i = chunk[t]; i < chunk[t + 1]; ++i) {
        const uint32_t key = Key::of(x[i]);
        const uint32_t d = key >> shift;
        if (d > top.bin) {
          *o++ = first + i;
        } else if (d == top.bin) {
          *ck++ = key;
          *cp++ = first + i;
        }
      }
    });
    s.selected.resize(top.need);
    select_candidates(s.cand_key.data(), s.cand_pos.data(), tied, plan.levels, plan.shift, plan.width, top,
                      s.selected.data());
    merge_into(out, top.above, s.selected.data(), top.need);
    return;
  }

  // Re-scan path: resolve each lower digit with a filtered histogram over the whole fragment.
  uint32_t threshold = top.bin;
  int64_t need = top.need;
  for (int level = 1; level < plan.levels; ++level) {
    const int bins = 1 << plan.width[level];
    for_each_chunk([&](int t) {
      F::filtered_histogram(x + chunk[t], chunk[t + 1] - chunk[t], level, threshold, hist[t].data());
    });
    std::fill(total.begin(), total.begin() + bins, 0);
    for (int t = 0; t < threads; ++t)
      for (int b = 0; b < bins; ++b) total[b] += hist[t][b];
    const BinChoice c = choose_bin(total.data(), bins, need);
    for (int t = 0; t < threads; ++t) {
      gt[t] += std::accumulate(hist[t].begin() + c.bin + 1, hist[t].begin() + bins, int64_t{0});
      eq[t] = hist[t][c.bin];
    }
    threshold = (threshold << plan.width[level]) | c.bin;
    need = c.need;
  }
  // Thread t takes its elements above the threshold and, of those equal to it, the ones left after
  // lower-numbered threads (lower indices) took theirs.
  std::vector<int64_t> take_eq(threads), out_off(threads + 1, 0);
  int64_t left = need;
  for (int t = 0; t < threads; ++t) {
    take_eq[t] = std::min(left, eq[t]);
    left -= take_eq[t];
    out_off[t + 1] = out_off[t] + gt[t] + take_eq[t];
  }
  for_each_chunk([&](int t) {
    int64_t* o = out + out_off[t];
    int64_t eq_left = take_eq[t];
    for (int64_t i = chunk[t]; i < chunk[t + 1]; ++i) {
      const uint32_t key = Key::of(x[i]);
      if (key > threshold || (key == threshold && eq_left-- > 0)) *o++ = first + i;
    }
  });
}

template <typename scalar_t>
void segmented_topk_impl(const scalar_t* x, const int64_t* off, const int64_t* kk, const std::vector<int64_t>& frags,
                         const std::vector<int64_t>& out_start, int64_t base, int64_t* o) {
  const int64_t m = static_cast<int64_t>(frags.size());
  const int threads = omp_get_max_threads();
  int64_t work = 0;
  for (int64_t i = 0; i < m; ++i) work += off[frags[i] + 1] - off[frags[i]];
  // A fragment above a quarter of one thread's share would unbalance the per-fragment schedule.
  const int64_t split_size = std::max(kMinSplitSize, work / (4 * static_cast<int64_t>(threads)));
  std::vector<int64_t> split, whole;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t f = frags[i];
    const int64_t n = off[f + 1] - off[f];
    if (kk[f] == 0) continue;
    (threads > 1 && n >= split_size && kk[f] < n ? split : whole).push_back(i);
  }
  // Largest first, so the dynamic schedule ends balanced.
  std::stable_sort(whole.begin(), whole.end(), [&](int64_t a, int64_t b) {
    return off[frags[a] + 1] - off[frags[a]] > off[frags[b] + 1] - off[frags[b]];
  });
  std::vector<Scratch> scratch(threads);
  for (int64_t i : split) {
    const int64_t f = frags[i];
    select_fragment<scalar_t>(x, off[f], off[f + 1], kk[f], base, o + out_start[i], threads, scratch.data());
  }
  const int64_t w = static_cast<int64_t>(whole.size());
#pragma omp parallel for schedule(dynamic, 1) if (w > 1)
  for (int64_t j = 0; j < w; ++j) {
    const int64_t i = whole[j];
    const int64_t f = frags[i];
    select_fragment<scalar_t>(x, off[f], off[f + 1], kk[f], base, o + out_start[i], 1,
                              &scratch[omp_get_thread_num()]);
  }
}

}  // namespace

at::Tensor segmented_topk(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& k,
                          const c10::optional<at::Tensor>& fragments, int64_t index_base) {
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* kk = k.const_data_ptr<int64_t>();
  const std::vector<int64_t> frags = listed_ids(fragments, offsets.numel() - 1);
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
