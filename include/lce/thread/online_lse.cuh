/// @file online_lse.cuh
/// @brief Online (streaming) log-sum-exp: a running {max, sum} state, merging two states and
/// its value (the kernels extend the state in thread::row_stats). `__host__ __device__` so that
/// the CPU reference and tests use the very same formulas as the kernels.
#pragma once

#include <cmath>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace thread {

/// @brief State of a streaming log-sum-exp over a set S of values:
/// `max` = max(S) and `sum` = Σ_{z∈S} exp(z − max). The empty set is {−inf, 0}.
struct lse_state {
  float max;
  float sum;
};

/// @brief max(a, b) that propagates NaN (fmaxf returns the other operand), so a NaN logit
/// can never vanish into a plausible lse.
__host__ __device__ inline float nan_max(float a, float b) noexcept {
  return (a != a || b != b) ? NAN : fmaxf(a, b);
}

/// @brief The state of the empty set, the identity of lse_merge.
__host__ __device__ constexpr lse_state lse_identity() noexcept { return {-INFINITY, 0.0f}; }

/// @brief Merges two states: the result describes the union of both sets.
/// Merging two empty states gives the empty state (never NaN: exp(−inf − (−inf)) is never
/// formed). A NaN value in either state propagates.
__host__ __device__ inline lse_state lse_merge(lse_state a, lse_state b) noexcept {
  // fmaxf drops a NaN operand: propagate it first.
  if (a.max != a.max || b.max != b.max) return {NAN, NAN};
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return lse_identity();
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

/// @brief log Σ exp(z) of the set: max + log(sum); −inf for the empty set.
__host__ __device__ inline float lse_value(lse_state s) noexcept {
  return s.sum > 0.0f ? s.max + logf(s.sum) : (s.sum == 0.0f ? -INFINITY : NAN);
}

}  // namespace thread
LCE_NAMESPACE_END
