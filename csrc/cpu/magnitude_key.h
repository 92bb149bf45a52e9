// The magnitude order used by every top-k in this package: the IEEE bit pattern of |x| read as
// an unsigned integer. For finite values and infinities this is the numeric order of |x|; every
// NaN ranks above +inf (so a NaN is always selected and sent, never hidden in the residual);
// -0 and +0 tie. Sorting integers instead of floats is also what makes a radix select possible.
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
  static inline uint32_t of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u & 0x7fffffffu;
  }
};

template <>
struct MagnitudeKey<c10::BFloat16> {
  using type = uint32_t;
  static constexpr int kBits = 15;
  static inline uint32_t of(c10::BFloat16 x) { return x.x & 0x7fffu; }
};

template <>
struct MagnitudeKey<c10::Half> {
  using type = uint32_t;
  static constexpr int kBits = 15;
  static inline uint32_t of(c10::Half x) { return x.x & 0x7fffu; }
};

}  // namespace deft_kernels::cpu
