// Real launches for the kernel headers (see device_util.cuh): what tests/cpp/cuda_emulator.h
// provides on the CPU. Included by the .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace deft_kernels::cuda {

template <class... P, class... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, cudaStream_t stream, A&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
  return cudaGetLastError();
}

inline cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t stream) {
  return cudaMemsetAsync(p, value, bytes, stream);
}

// A value loaded into a register ahead of its use. Where the load is performed is the compiler's
// and the hardware's choice up to the thread's next __syncwarp, __syncthreads or fence (warp votes
// and shuffles order no memory); the CPU emulation performs it as late as that allows.
template <class T>
struct Prefetched {
  T value;
  __device__ __forceinline__ void load(const T* p) { value = *p; }
  __device__ __forceinline__ void set(T v) { value = v; }
  __device__ __forceinline__ T get() const { return value; }
};

}  // namespace deft_kernels::cuda
