// The kernels read memory in aligned 16-byte vectors of `vec` elements, numbered from the 16-byte
// boundary at or below a tensor's first element; the vectors at either end of a tensor that stick out
// of it are read element by element. Plain C++: the host plans with it too.
#pragma once

#include <cstdint>

namespace deft_kernels::cuda {

// How many elements the address `p` lies past the previous 16-byte boundary.
inline int64_t vector_shift(const void* p, int vec) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16) / (16 / vec);
}

}  // namespace deft_kernels::cuda
