/// @file reduce.cuh
/// @brief Warp-wide all-reductions (every lane receives the result) by butterfly shuffles.
#pragma once

#include "../thread/online_lse.cuh"

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

/// @brief Merge of one online-lse state per lane into the state of the whole warp.
__device__ inline thread::lse_state allreduce_lse(thread::lse_state s) noexcept {
  const float m = allreduce_max(s.max);
  const float scaled = (m == -INFINITY) ? 0.0f : s.sum * expf(s.max - m);
  return {m, allreduce_sum(scaled)};
}

}  // namespace warp
LCE_NAMESPACE_END
