/// @file row_stats.cuh
/// @brief Everything the loss options and outputs need from one row of logits, as a mergeable
/// streaming state: the online lse {max, sum}, Σ e^{z−max}·z (entropy), Σ w_v·z_v (label
/// smoothing) and the first argmax. `__host__ __device__`: the kernels, the CPU tests and the
/// reference share it.
#pragma once

#include <cmath>
#include <cstdint>

#include "online_lse.cuh"

LCE_NAMESPACE_BEGIN
namespace thread {

/// @brief Streaming statistics of a set of (index v, logit z_v, class weight w_v).
struct row_stats {
  float max;            ///< max z (−inf when empty)
  float sum;            ///< Σ exp(z − max)
  float sum_pz;         ///< Σ exp(z − max)·z
  float sum_wz;         ///< Σ w·z
  std::int64_t argmax;  ///< smallest index holding max (−1 when empty)
};

__host__ __device__ constexpr row_stats row_stats_identity() noexcept {
  return {-INFINITY, 0.0f, 0.0f, 0.0f, -1};
}

/// @brief Union of two sets. Empty ∪ empty is empty (no NaN); NaN propagates through max, sum
/// and sum_pz; ties of the maximum keep the smaller index (PyTorch's argmax).
__host__ __device__ inline row_stats row_stats_merge(row_stats a, row_stats b) noexcept {
  if (a.max != a.max || b.max != b.max) return {NAN, NAN, NAN, a.sum_wz + b.sum_wz, -1};
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {-INFINITY, 0.0f, 0.0f, a.sum_wz + b.sum_wz, -1};
  const float ea = a.sum > 0.0f ? expf(a.max - m) : 0.0f;
  const float eb = b.sum > 0.0f ? expf(b.max - m) : 0.0f;
  std::int64_t arg;
  if (a.max == b.max)
    arg = (a.argmax < 0 || (b.argmax >= 0 && b.argmax < a.argmax)) ? b.argmax : a.argmax;
  else
    arg = a.max > b.max ? a.argmax : b.argmax;
  return {m, a.sum * ea + b.sum * eb, a.sum_pz * ea + b.sum_pz * eb, a.sum_wz + b.sum_wz, arg};
}

/// @brief Union of a row's statistics over the vocabulary splits of a [splits, n] array
/// (`partial[s·n + row]`), merged in split order (so the result is deterministic).
__host__ __device__ inline row_stats row_stats_merge_splits(const row_stats* partial,
                                                            std::int64_t n, std::int64_t splits,
                                                            std::int64_t row) noexcept {
  row_stats st = row_stats_identity();
  for (std::int64_t s = 0; s < splits; ++s) st = row_stats_merge(st, partial[s * n + row]);
  return st;
}

/// @brief Adds element (v, z, w) with one exponential. z = −inf (a masked column) changes
/// nothing; the result equals row_stats_merge(s, {z, 1, z, w·z, v}) up to rounding.
__host__ __device__ inline row_stats row_stats_push(row_stats s, std::int64_t v, float z,
                                                    float w) noexcept {
  if (z == -INFINITY) return s;
  if (z <= s.max) {
    const float e = expf(z - s.max);
    const std::int64_t arg = (z == s.max && v < s.argmax) ? v : s.argmax;
    return {s.max, s.sum + e, s.sum_pz + e * z, s.sum_wz + w * z, arg};
  }
  if (z > s.max) {
    const float r = s.sum > 0.0f ? expf(s.max - z) : 0.0f;
    return {z, s.sum * r + 1.0f, s.sum_pz * r + z, s.sum_wz + w * z, v};
  }
  return row_stats_merge(s, row_stats{z, 1.0f, z, w * z, v});  // NaN
}

/// @brief The lse of the set.
__host__ __device__ inline float row_lse(const row_stats& s) noexcept {
  return lse_value(lse_state{s.max, s.sum});
}

/// @brief Entropy −Σ p·log p of softmax over the set, = lse − Σ p·z.
__host__ __device__ inline float row_entropy(const row_stats& s, float lse) noexcept {
  return lse - s.sum_pz / s.sum;
}

}  // namespace thread
LCE_NAMESPACE_END
