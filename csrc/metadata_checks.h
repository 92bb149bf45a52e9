// Checks of the small host-side index metadata (offsets, fragment and segment ids) that memory
// safety needs before a kernel indexes with it, and of the dtypes an op pairs, shared by the CPU
// bindings (bindings.cpp) and the CUDA glue (csrc/cuda/ops_cuda.cpp, csrc/cuda/threshold_select_glue.cpp).
// Raw pointers to host memory; the messages name the argument.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace deft_kernels {

// offsets[0, m) of a vector of n elements: m >= 1 entries, 0 first, n last, non-decreasing.
inline void check_offsets_data(const int64_t* o, int64_t m, int64_t n) {
  TORCH_CHECK(m >= 1, "offsets must have at least one element (F + 1 for F fragments)");
  TORCH_CHECK(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(o[m - 1] == n, "offsets[-1] must equal the vector length ", n, ", got ", o[m - 1]);
  for (int64_t i = 1; i < m; ++i)
    TORCH_CHECK(o[i] >= o[i - 1], "offsets must be non-decreasing, but offsets[", i, "] = ", o[i],
                " < offsets[", i - 1, "] = ", o[i - 1]);
}

// k[0, F) against the F fragments of offsets o[0, F] (already checked): one entry per fragment,
// each in [0, the fragment's size]. `k_count` is k's length.
inline void check_k_data(const int64_t* o, int64_t num_frags, const int64_t* k, int64_t k_count) {
  TORCH_CHECK(k_count == num_frags, "k must have one entry per fragment (", num_frags, "), got ", k_count);
  for (int64_t f = 0; f < num_frags; ++f)
    TORCH_CHECK(k[f] >= 0 && k[f] <= o[f + 1] - o[f], "k[", f, "] = ", k[f], " must lie in [0, ", o[f + 1] - o[f],
                "] (the size of fragment ", f, ")");
}

// ids[0, m), the argument `name`, each the id of one of `count` things of `kind` (fragment, segment).
inline void check_ids_data(const int64_t* ids, int64_t m, const char* name, const char* kind, int64_t count) {
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < count, name, "[", i, "] = ", ids[i], " is not a ", kind, " id in [0, ", count,
                ")");
}

// accumulate_norms' dtypes: the residual has the gradient's, or is float32 under a bfloat16 or
// float16 gradient (accumulated in place, one fp32 add: deft_kernels/_checks.py has the same rule).
inline void check_accumulate_dtypes(c10::ScalarType grad, c10::ScalarType residual) {
  const bool half_grad = grad == c10::ScalarType::BFloat16 || grad == c10::ScalarType::Half;
  TORCH_CHECK_TYPE(residual == grad || (half_grad && residual == c10::ScalarType::Float), "residual dtype ",
                   residual, " does not go with grad dtype ", grad,
                   ": residual must have grad's dtype, or be float32 under a bfloat16 or float16 grad");
}

}  // namespace deft_kernels
