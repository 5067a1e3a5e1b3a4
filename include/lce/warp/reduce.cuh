/// @file reduce.cuh
/// @brief Warp-wide all-reductions (every lane receives the result) by butterfly shuffles.
#pragma once

#include "../thread/online_lse.cuh"
#include "../thread/row_stats.cuh"

LCE_NAMESPACE_BEGIN
namespace warp {

/// @brief Maximum over the 32 lanes of a full warp (NaN if any lane holds NaN); every lane
/// gets the result.
__device__ inline float allreduce_max(float x) noexcept {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    x = thread::nan_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

/// @brief Sum over the 32 lanes of a full warp; every lane gets the result. The butterfly
/// order is fixed, so the result is deterministic.
__device__ inline float allreduce_sum(float x) noexcept {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

/// @brief Merge of one row_stats per lane into the statistics of the whole warp (butterfly:
/// every lane gets the same result, in a fixed order).
__device__ inline thread::row_stats allreduce_row_stats(thread::row_stats s) noexcept {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    thread::row_stats other;
    other.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    other.sum_pz = __shfl_xor_sync(0xffffffffu, s.sum_pz, offset);
    other.sum_wz = __shfl_xor_sync(0xffffffffu, s.sum_wz, offset);
    other.argmax = __shfl_xor_sync(0xffffffffu, s.argmax, offset);
    s = thread::row_stats_merge(s, other);
  }
  return s;
}

}  // namespace warp
LCE_NAMESPACE_END
