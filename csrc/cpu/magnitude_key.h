// The magnitude order used by every top-k in this package: the IEEE bit pattern of |x| read as
// an unsigned integer. For finite values and infinities this is the numeric order of |x|; every
// NaN ranks above +inf (so a NaN is always selected and sent, never hidden in the residual);
// -0 and +0 tie. Sorting integers instead of floats is also what makes a radix select possible.
// Keys below kFirstNaN are the non-NaN magnitudes in increasing order, key 0 being zero.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace deft_kernels::cpu {

template <typename T>
struct MagnitudeKey;

template <>
struct MagnitudeKey<float> {
  using type = uint32_t;
  static constexpr int kBits = 31;
  static constexpr uint32_t kFirstNaN = 0x7f800001u;
  static inline uint32_t of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u & 0x7fffffffu;
  }
  static inline float value(uint32_t key) {
    float x;
    std::memcpy(&x, &key, sizeof(x));
    return x;
  }
};

template <>
struct MagnitudeKey<c10::BFloat16> {
  using type = uint32_t;
  static constexpr int kBits = 15;
  static constexpr uint32_t kFirstNaN = 0x7f81u;
  static inline uint32_t of(c10::BFloat16 x) { return x.x & 0x7fffu; }
  static inline float value(uint32_t key) {
    return static_cast<float>(c10::BFloat16(static_cast<uint16_t>(key), c10::BFloat16::from_bits()));
  }
};

template <>
struct MagnitudeKey<c10::Half> {
  using type = uint32_t;
  static constexpr int kBits = 15;
  static constexpr uint32_t kFirstNaN = 0x7c01u;
  static inline uint32_t of(c10::Half x) { return x.x & 0x7fffu; }
  static inline float value(uint32_t key) {
    return static_cast<float>(c10::Half(static_cast<uint16_t>(key), c10::Half::from_bits()));
  }
};

// The threshold select's rule on keys: for x of type T,
//   of(x) >= threshold_key<T>(t)  <=>  isnan(x) || (|x| >= t && x != 0), |x| >= t compared in fp32.
// It is the first key whose magnitude reaches t (found by bisection over the ordered non-NaN keys,
// starting above zero's key 0), or the first NaN key when none does (t is NaN), so
// every NaN passes and zero never does. One integer compare per element instead of three float ones.
template <typename T>
uint32_t threshold_key(float t) {
  using Key = MagnitudeKey<T>;
  uint32_t lo = 1, hi = Key::kFirstNaN;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (Key::value(mid) >= t)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

}  // namespace deft_kernels::cpu
