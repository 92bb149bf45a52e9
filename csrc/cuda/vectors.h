// The kernels read memory in aligned vectors of `vec` elements (16 bytes, or 8 for a 16-bit gradient
// read beside an fp32 residual), numbered from the vector boundary at or below a tensor's first
// element; the vectors at either end of a tensor that stick out of it are read element by element.
// Plain C++: the host plans with it too.
#pragma once

#include <cstdint>

namespace deft_kernels::cuda {

// How many elements of `elem_bytes` bytes the address `p` lies past the previous boundary of a
// vector of `vec` such elements.
inline int64_t element_shift(const void* p, int64_t elem_bytes, int64_t vec) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(elem_bytes * vec)) / elem_bytes;
}

// How many elements the address `p` lies past the previous 16-byte boundary.
inline int64_t vector_shift(const void* p, int vec) { return element_shift(p, 16 / vec, vec); }

}  // namespace deft_kernels::cuda
