// CUDA accumulate_norms: residual <- grad + residual (fp32 arithmetic, one rounding to the residual's
// dtype) and the fp32 L2 norm of every fragment of the result, in one launch over the data for all
// fragments. grad and residual have one dtype, or grad is 16-bit and residual fp32 (a mixed pair).
// Same numerics as the CPU op (csrc/cpu/accumulate_norms.cpp): squares of the rounded values summed
// in float64 (exact squares; the sum errs far below fp32 rounding whatever the order), sqrt in
// float64, one rounding to fp32.
//
// STATUS: compiled with nvcc (tests/test_cuda_compile.py) and run on the CPU emulation of CUDA
// (tests/cpp/test_norms_emulated.cpp); NEVER RUN ON A GPU yet. The cuda cases of
// tests/test_op_accumulate_norms.py and tests/test_gpu_sync_free.py check it on the next machine
// with one (scripts/gpu_check.sh).
//
// Each block takes a fixed run of kRows x 32 x kWarps vectors of grad and residual, a vector being
// 16 bytes of the wider dtype (4 elements when either is fp32, 8 for two 16-bit dtypes; a 16-bit
// grad under an fp32 residual is read 8 bytes at a time). The fragment layout does not shape the
// work, so one huge fragment and thousands of tiny ones balance alike; each warp takes a contiguous
// piece of the run, one coalesced row of 32 vectors at a time, all rows loaded before use. A warp
// inside one fragment reduces its squares with shuffles; the block adds its warps' sums into the
// fragment's float64 sum with one atomic per fragment it touches (a warp spanning several fragments
// adds its share of each). The last block to finish takes the square roots, so the op is one memset
// and one launch.
#pragma once

#include <cstdint>

#include "cuda/device_util.cuh"
#include "cuda/vectors.h"

namespace deft_kernels::cuda::norms {

constexpr int kRows = 4;  // vectors per thread
constexpr int kBlockVectors = kRows * kThreads;

struct Fp32 {
  using Raw = uint32_t;
  __device__ static float to_float(Raw b) { return __uint_as_float(b); }
  __device__ static Raw round(float f) { return __float_as_uint(f); }
};

struct Bf16 {
  using Raw = uint16_t;
  __device__ static float to_float(Raw b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  __device__ static Raw round(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

struct Fp16 {
  using Raw = uint16_t;
  __device__ static float to_float(Raw b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Raw round(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// Elements per vector of a (grad G, residual R) pair: 16 bytes of the wider dtype.
template <class G, class R>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(typename G::Raw) > sizeof(typename R::Raw)
                                                 ? sizeof(typename G::Raw)
                                                 : sizeof(typename R::Raw));

// V elements of raw type T, read and written as one aligned access.
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T raw[V];
};

// Bytes of workspace a launch needs: the fragments' float64 sums and a counter of finished blocks.
inline int64_t workspace_bytes(int64_t num_frags) { return 8 * (num_frags + 1); }

struct Args {
  const void* grad;
  void* residual;
  int64_t n;
  int64_t shift;  // both pointers lie `shift` elements past a vector boundary (vectorised path)
  const int64_t* offsets;
  int64_t num_frags;
  double* sums;        // [num_frags], zero before the launch
  unsigned* finished;  // blocks done, zero before the launch
  float* norms;        // [num_frags]
};

// a = round(g + r) to R, stored in place of r; returns a as a float (0 outside [0, n)).
template <class G, class R>
__device__ __forceinline__ float accumulate_one(const Args& a, int64_t i) {
  if (i < 0 || i >= a.n) return 0.f;
  const auto* g = static_cast<const typename G::Raw*>(a.grad);
  auto* r = static_cast<typename R::Raw*>(a.residual);
  const typename R::Raw out = R::round(G::to_float(g[i]) + R::to_float(r[i]));
  r[i] = out;
  return R::to_float(out);
}

template <class G, class R, int V>
__device__ __forceinline__ void accumulate_vector(const Pack<typename G::Raw, V>& g, Pack<typename R::Raw, V>& r,
                                                  float (&a)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const typename R::Raw out = R::round(G::to_float(g.raw[j]) + R::to_float(r.raw[j]));
    a[j] = R::to_float(out);
    r.raw[j] = out;
  }
}

// The fragment holding element i (0 <= i < n): the last f with offsets[f] <= i. Clamped to a
// fragment id whatever the offsets hold, so unvalidated offsets never index outside them.
__device__ __forceinline__ int64_t fragment_of(const Args& a, int64_t i) {
  int64_t lo = 0, hi = a.num_frags;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (a.offsets[mid] <= i)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

template <class G, class R, bool kVectorised>
__global__ void __launch_bounds__(kThreads, 2) accumulate_norms_kernel(Args args) {
  __shared__ int64_t warp_frag[kWarps];
  __shared__ double warp_sum_of[kWarps];
  __shared__ int last;
  constexpr int kVec = kVecOf<G, R>;
  constexpr int V = kVectorised ? kVec : 1;
  const int64_t first_vector = static_cast<int64_t>(blockIdx.x) * kBlockVectors + warp_id() * kRows * 32;
  // Elements of this warp's piece: [lo, hi) in [0, n).
  const int64_t piece_lo = first_vector * V - (kVectorised ? args.shift : 0);
  const int64_t lo = piece_lo > 0 ? piece_lo : 0;
  const int64_t hi = piece_lo + kRows * 32 * V < args.n ? piece_lo + kRows * 32 * V : args.n;
  float a[kRows][V];
  if constexpr (kVectorised) {
    using GPack = Pack<typename G::Raw, kVec>;
    using RPack = Pack<typename R::Raw, kVec>;
    const auto* g = reinterpret_cast<const GPack*>(static_cast<const typename G::Raw*>(args.grad) - args.shift);
    auto* r = reinterpret_cast<RPack*>(static_cast<typename R::Raw*>(args.residual) - args.shift);
    GPack gv[kRows];
    RPack rv[kRows];
    bool whole[kRows];
#pragma unroll
    for (int row = 0; row < kRows; ++row) {
      const int64_t v = first_vector + row * 32 + lane_id();
      const int64_t first = v * V - args.shift;
      whole[row] = first >= 0 && first + V <= args.n;
      if (whole[row]) gv[row] = g[v], rv[row] = r[v];
    }
#pragma unroll
    for (int row = 0; row < kRows; ++row) {
      const int64_t v = first_vector + row * 32 + lane_id();
      if (whole[row]) {
        accumulate_vector<G, R>(gv[row], rv[row], a[row]);
        r[v] = rv[row];
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) a[row][j] = accumulate_one<G, R>(args, v * V - args.shift + j);
      }
    }
  } else {
#pragma unroll
    for (int row = 0; row < kRows; ++row) a[row][0] = accumulate_one<G, R>(args, piece_lo + row * 32 + lane_id());
  }
  // The squares of the elements in [from, to), summed over the warp. Positions are taken relative
  // to the piece (32-bit); elements outside [0, n) hold 0 and add nothing.
  constexpr int kPiece = kRows * 32 * V;
  auto square_sum = [&](int64_t from, int64_t to) {
    const int rel_from = static_cast<int>(from - piece_lo < 0 ? 0 : (from - piece_lo > kPiece ? kPiece : from - piece_lo));
    const int rel_to = static_cast<int>(to - piece_lo < 0 ? 0 : (to - piece_lo > kPiece ? kPiece : to - piece_lo));
    double s = 0.0;
#pragma unroll
    for (int row = 0; row < kRows; ++row)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int rel = (row * 32 + static_cast<int>(lane_id())) * V + j;
        const double x = a[row][j];
        if (rel >= rel_from && rel < rel_to) s += x * x;
      }
    return warp_sum(s);
  };
  int64_t frag = -1;
  double sum = 0.0;
  if (lo < hi && args.num_frags > 0) {
    const int64_t f_lo = fragment_of(args, lo), f_hi = fragment_of(args, hi - 1);
    if (f_lo == f_hi) {
      frag = f_lo;
      sum = square_sum(lo, hi);
    } else {
      for (int64_t f = f_lo; f <= f_hi; ++f) {
        const double s = square_sum(args.offsets[f], args.offsets[f + 1]);
        if (lane_id() == 0) atomicAdd(args.sums + f, s);
      }
    }
  }
  if (lane_id() == 0) warp_frag[warp_id()] = frag, warp_sum_of[warp_id()] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    // Warps within one fragment: one atomic per run of warps in the same fragment.
    for (int w = 0; w < kWarps;) {
      const int64_t f = warp_frag[w];
      double s = 0.0;
      int u = w;
      for (; u < kWarps && warp_frag[u] == f; ++u) s += warp_sum_of[u];
      if (f >= 0) atomicAdd(args.sums + f, s);
      w = u;
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(args.finished, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) {
    __threadfence();
    for (int64_t f = threadIdx.x; f < args.num_frags; f += kThreads)
      args.norms[f] = static_cast<float>(sqrt(__ldcg(args.sums + f)));
  }
}

// Blocks of a launch over n elements whose pointers lie `shift` elements past a vector boundary
// (vectorised) or read element by element; at least one, which takes the square roots.
inline unsigned blocks_for(int64_t n, int64_t shift, int vec, bool vectorised) {
  const int64_t per_block = static_cast<int64_t>(kBlockVectors) * (vectorised ? vec : 1);
  const int64_t span = n + (vectorised ? shift : 0);
  return static_cast<unsigned>(span > 0 ? (span + per_block - 1) / per_block : 1);
}

// The whole op on `stream`: grad (dtype G) and residual (dtype R) contiguous, n elements each;
// offsets (num_frags + 1 entries) and norms (num_frags) on the device; `workspace`
// workspace_bytes(num_frags) bytes, any content. Returns the first launch error.
template <class G, class R>
cudaError_t launch(const void* grad, void* residual, int64_t n, const int64_t* offsets, int64_t num_frags,
                   void* workspace, float* norms, cudaStream_t stream) {
  constexpr int kVec = kVecOf<G, R>;
  const int64_t shift = element_shift(grad, sizeof(typename G::Raw), kVec);
  const bool vectorised = shift == element_shift(residual, sizeof(typename R::Raw), kVec);
  auto* sums = static_cast<double*>(workspace);
  const Args args{grad, residual, n, shift, offsets, num_frags, sums, reinterpret_cast<unsigned*>(sums + num_frags),
                  norms};
  const cudaError_t err = memset_async(workspace, 0, static_cast<size_t>(workspace_bytes(num_frags)), stream);
  if (err != cudaSuccess) return err;
  const unsigned blocks = blocks_for(n, shift, kVec, vectorised);
  return vectorised ? launch_kernel(accumulate_norms_kernel<G, R, true>, blocks, kThreads, stream, args)
                    : launch_kernel(accumulate_norms_kernel<G, R, false>, blocks, kThreads, stream, args);
}

}  // namespace deft_kernels::cuda::norms
