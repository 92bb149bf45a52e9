// A CPU emulation of the subset of CUDA that the kernel headers csrc/cuda/*_kernels.cuh use, so that
// their logic runs in CI on machines without a GPU (tests/cpp/test_*_emulated.cpp, built and run by
// tests/test_cuda_compile.py).
//
// Each block's threads are fibers scheduled cooperatively by one OS thread: a thread
// runs until it reaches __syncthreads or a warp collective, which are barriers. After every
// barrier the threads resume in a fresh random order, and blocks run in a random order, so shared
// memory read before a missing barrier, or a kernel that assumes an order of blocks, gives wrong
// results here too. A barrier that cannot complete (a thread exited or skipped it) aborts with a
// message. Atomics are plain read-modify-writes (there is one OS thread); memory is host memory.
//
// Memory order inside a warp. Warp votes and shuffles synchronise execution but order no memory
// (only __syncwarp, __syncthreads and fences do), so a load a lane issued before a vote may be
// performed after another lane's store that follows the vote; the compiler may even move the load
// down to its first use. Loads made through Prefetched<T> (the subset's "value loaded ahead of its
// use") are performed here as late as that allows: at their first use, or at the lane's next
// __syncwarp, __syncthreads or __threadfence, whichever comes first. With set_lane_order(descending)
// or (ascending) the threads resume after every barrier highest (lowest) lane first instead of in a
// random order: the adversaries of a warp that compacts in place toward lower (higher) indices,
// whose lanes then see another lane's store where their own entry was unless a __syncwarp
// separates the loads from the stores.
//
// What it cannot show: races that need real concurrency (two threads of one warp between
// collectives on plain loads, weak memory ordering between blocks), performance, and anything about
// the hardware. It is a test harness for the kernels' logic, not a substitute for running them on a
// GPU.
#pragma once

// Fibers start with makecontext and then switch with _setjmp/_longjmp (swapcontext makes a system
// call per switch). Fortified longjmp refuses to jump between stacks, so this header must be the
// first one its file includes.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

namespace cuda_emulator {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s (block %u)\n", what, blockIdx.x);
  std::abort();
}

struct Barrier {
  unsigned arrived = 0;
  unsigned generation = 0;
};

// A load issued but not yet performed (Prefetched<T>); perform() reads memory now and removes it
// from its fiber's list.
struct LateLoad {
  virtual void perform() = 0;

 protected:
  ~LateLoad() = default;
};

struct Fiber {
  ucontext_t context;
  jmp_buf jump;
  bool started = false;
  std::vector<char> stack;
  bool done = false;
  bool waiting = false;
  std::vector<LateLoad*> late;  // this thread's loads not performed yet
};

enum class LaneOrder { random, ascending, descending };

struct Scheduler {
  ucontext_t main_context;
  jmp_buf main_jump;
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;
  std::vector<bool> lagging;
  std::function<void()> body;
  unsigned current = 0;
  bool progressed = false;
  Barrier block_barrier;
  std::vector<Barrier> warp_barrier;
  std::vector<uint64_t> warp_slot;  // one 64-bit slot per thread, exchanged by warp collectives
  std::mt19937_64 rng{12345};
  LaneOrder lane_order = LaneOrder::random;
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

// The order in which threads resume after every barrier, for the launches that follow.
inline void set_lane_order(LaneOrder order) { sched().lane_order = order; }

// The calling thread's loads not performed yet.
inline std::vector<LateLoad*>& late_loads() {
  Scheduler& s = sched();
  return s.fibers[s.current].late;
}

// Performs the calling thread's pending loads (at a memory-ordering point).
inline void perform_late_loads() {
  std::vector<LateLoad*>& late = late_loads();
  while (!late.empty()) late.back()->perform();
}

inline void yield() {
  Scheduler& s = sched();
  if (!_setjmp(s.fibers[s.current].jump)) _longjmp(s.main_jump, 1);
  threadIdx.x = s.current;
}

// Runs fiber t until it yields or finishes.
inline void resume(unsigned t) {
  Scheduler& s = sched();
  Fiber& f = s.fibers[t];
  s.current = t;
  threadIdx.x = t;
  if (!_setjmp(s.main_jump)) {
    if (f.started) _longjmp(f.jump, 1);
    f.started = true;
    swapcontext(&s.main_context, &f.context);
  }
}

// Waits until `expected` threads have arrived at `b` (the current generation).
inline void arrive_and_wait(Barrier& b, unsigned expected) {
  const unsigned gen = b.generation;
  Scheduler& s = sched();
  s.progressed = true;
  if (++b.arrived == expected) {
    b.arrived = 0;
    ++b.generation;
    yield();  // let the others resume first, in the shuffled order
    return;
  }
  s.fibers[s.current].waiting = true;
  while (b.generation == gen) yield();
  s.fibers[s.current].waiting = false;
}

inline void trampoline() {
  Scheduler& s = sched();
  s.body();
  s.fibers[s.current].done = true;
  s.progressed = true;
  _longjmp(s.main_jump, 1);
}

// One pass over the lagging (or the other) fibers in a fresh random order; true if any of
// them arrived at a barrier or finished.
inline bool run_round(bool lagging, unsigned& live) {
  Scheduler& s = sched();
  if (s.lane_order == LaneOrder::random) {
    std::shuffle(s.order.begin(), s.order.end(), s.rng);
  } else {
    const bool down = s.lane_order == LaneOrder::descending;
    std::sort(s.order.begin(), s.order.end(), [down](unsigned a, unsigned b) {
      return a % 32 != b % 32 ? (a % 32 > b % 32) == down : a < b;
    });
  }
  s.progressed = false;
  for (unsigned t : s.order) {
    if (s.fibers[t].done || s.lagging[t] != lagging) continue;
    resume(t);
    if (s.fibers[t].done) --live;
  }
  return s.progressed;
}

// Runs one block of `threads` threads to completion. Some blocks get laggards (one whole warp, or
// a random eighth of the threads) that run only when no other thread can move: they reach every
// point as late as a barrier allows, which is what exposes shared memory reused too early.
inline void run_block(unsigned threads, const std::function<void()>& body) {
  Scheduler& s = sched();
  constexpr size_t kStack = 128 * 1024;
  s.body = body;
  s.fibers.resize(threads);
  s.order.resize(threads);
  std::iota(s.order.begin(), s.order.end(), 0u);
  s.lagging.assign(threads, false);
  const unsigned mode = static_cast<unsigned>(s.rng() % 3);
  const unsigned slow_warp = static_cast<unsigned>(s.rng() % ((threads + 31) / 32));
  for (unsigned t = 0; t < threads; ++t)
    s.lagging[t] = mode == 1 ? t / 32 == slow_warp : mode == 2 && s.rng() % 8 == 0;
  s.block_barrier = Barrier{};
  s.warp_barrier.assign((threads + 31) / 32, Barrier{});
  s.warp_slot.assign(threads, 0);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.stack.resize(kStack);
    f.done = f.waiting = f.started = false;
    f.late.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = nullptr;
    makecontext(&f.context, trampoline, 0);
  }
  unsigned live = threads;
  while (live > 0) {
    if (run_round(false, live) || live == 0) continue;
    if (run_round(true, live) || live == 0) continue;
    bool all_waiting = true;
    for (unsigned t = 0; t < threads; ++t)
      if (!s.fibers[t].done && !s.fibers[t].waiting) all_waiting = false;
    if (all_waiting) fail("deadlock: a barrier cannot complete (a thread exited or skipped it)");
  }
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Every lane of `mask` publishes `mine`; returns what `pick(lane)` chose among the published values.
template <class F>
uint64_t exchange(unsigned mask, uint64_t mine, F&& pick) {
  Scheduler& s = sched();
  const unsigned tid = threadIdx.x, warp = tid / 32;
  if (!((mask >> (tid % 32)) & 1u)) fail("warp collective called by a lane outside its mask");
  const unsigned expected = static_cast<unsigned>(std::popcount(mask));
  s.warp_slot[tid] = mine;
  arrive_and_wait(s.warp_barrier[warp], expected);
  const uint64_t got = pick(&s.warp_slot[warp * 32]);
  arrive_and_wait(s.warp_barrier[warp], expected);  // nobody overwrites a slot before all have read
  threadIdx.x = tid;
  return got;
}

}  // namespace cuda_emulator

inline void __syncthreads() {
  cuda_emulator::Scheduler& s = cuda_emulator::sched();
  const unsigned tid = threadIdx.x;
  cuda_emulator::perform_late_loads();
  cuda_emulator::arrive_and_wait(s.block_barrier, blockDim.x);
  threadIdx.x = tid;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emulator::perform_late_loads();
  cuda_emulator::exchange(mask, 0, [](const uint64_t*) { return uint64_t{0}; });
}

inline void __threadfence() { cuda_emulator::perform_late_loads(); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const unsigned lane = threadIdx.x % 32, base = lane - lane % width;
  const unsigned from = base + static_cast<unsigned>(src) % width;
  return cuda_emulator::from_bits<T>(
      cuda_emulator::exchange(mask, cuda_emulator::to_bits(v), [from](const uint64_t* s) { return s[from]; }));
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned from = lane % width >= delta ? lane - delta : lane;
  return cuda_emulator::from_bits<T>(
      cuda_emulator::exchange(mask, cuda_emulator::to_bits(v), [from](const uint64_t* s) { return s[from]; }));
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned from = lane % width + delta < static_cast<unsigned>(width) ? lane + delta : lane;
  return cuda_emulator::from_bits<T>(
      cuda_emulator::exchange(mask, cuda_emulator::to_bits(v), [from](const uint64_t* s) { return s[from]; }));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(cuda_emulator::exchange(mask, predicate != 0, [mask](const uint64_t* s) {
    uint64_t bits = 0;
    for (unsigned l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && s[l]) bits |= uint64_t{1} << l;
    return bits;
  }));
}

inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __ffs(unsigned x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }

template <class T>
T __ldcg(const T* p) {
  return *p;
}

template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

template <class T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}

inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }

// fp16 / bf16 as the CUDA intrinsics define them: round to nearest even.
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.bits)); }
inline __half __float2half_rn(float f) { return {std::bit_cast<unsigned short>(static_cast<_Float16>(f))}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __bfloat162float(__nv_bfloat16 h) { return std::bit_cast<float>(static_cast<uint32_t>(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<unsigned short>((u >> 16) | 0x40u)};  // quiet NaN
  return {static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

namespace deft_kernels::cuda {

// What the .cu files do with <<<grid, block, 0, stream>>>: here every block runs to completion, in
// a random order.
template <class... P, class... A>
cudaError_t launch_kernel(void (*kernel)(P...), unsigned grid, unsigned block, cudaStream_t, A&&... args) {
  cuda_emulator::Scheduler& s = cuda_emulator::sched();
  std::vector<unsigned> blocks(grid);
  std::iota(blocks.begin(), blocks.end(), 0u);
  std::shuffle(blocks.begin(), blocks.end(), s.rng);
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b : blocks) {
    blockIdx.x = b;
    cuda_emulator::run_block(block, [&] { kernel(args...); });
  }
  return cudaSuccess;
}

// A value loaded ahead of its use (launch.cuh has the GPU's): the load is performed at the first
// get(), or at the thread's next __syncwarp, __syncthreads or __threadfence if that comes first
// (see the top of this file). Not copyable: the thread's list of pending loads points at it.
template <class T>
class Prefetched final : cuda_emulator::LateLoad {
 public:
  Prefetched() = default;
  Prefetched(const Prefetched&) = delete;
  Prefetched& operator=(const Prefetched&) = delete;
  ~Prefetched() { forget(); }

  void load(const T* p) {
    forget();
    from_ = p;
    cuda_emulator::late_loads().push_back(this);
  }
  void set(T v) {
    forget();
    value_ = v;
  }
  T get() const {
    if (from_ != nullptr) {
      value_ = *from_;
      forget();
    }
    return value_;
  }
  void perform() override { get(); }

 private:
  void forget() const {
    if (from_ == nullptr) return;
    std::vector<cuda_emulator::LateLoad*>& late = cuda_emulator::late_loads();
    late.erase(std::find(late.begin(), late.end(), static_cast<const cuda_emulator::LateLoad*>(this)));
    from_ = nullptr;
  }

  mutable const T* from_ = nullptr;
  mutable T value_{};
};

inline cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

}  // namespace deft_kernels::cuda
