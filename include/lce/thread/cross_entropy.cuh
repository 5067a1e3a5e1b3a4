/// @file cross_entropy.cuh
/// @brief Per-element formulas of softmax cross-entropy: the per-token loss, the per-row
/// upstream-gradient scale and the logit gradient dZ = g·(softmax(Z) − onehot(y)).
/// `__host__ __device__`: the CPU reference and the kernels share them.
#pragma once

#include <cmath>
#include <cstdint>

#include "../options.hpp"

LCE_NAMESPACE_BEGIN
namespace thread {

/// @brief Whether row target `y` contributes to the loss.
__host__ __device__ constexpr bool is_valid_target(std::int64_t y,
                                                   std::int64_t ignore_index) noexcept {
  return y != ignore_index;
}

/// @brief Whether a valid target indexes a vocabulary row.
__host__ __device__ constexpr bool in_vocabulary(std::int64_t y, std::int64_t v) noexcept {
  return y >= 0 && y < v;
}

/// @brief Loss of one token: lse − z_y, from the same fp32 values that built the lse (so it
/// is ≥ 0 up to rounding). Ignored rows give 0; a target outside [0, v) gives NaN, so a bad
/// label never turns into a plausible number.
__host__ __device__ inline float token_loss(float lse, float target_logit, std::int64_t y,
                                            std::int64_t v, std::int64_t ignore_index) noexcept {
  if (!is_valid_target(y, ignore_index)) return 0.0f;
  if (!in_vocabulary(y, v)) return NAN;
  return lse - target_logit;
}

/// @brief Scale g_i of row i in dZ_i = g_i·(p_i − onehot(y_i)).
/// @param upstream   the upstream gradient of this row (a scalar for mean/sum, the row's own
///                   value for reduction::none)
/// @param n_valid    number of rows that are not ignored
/// @param red        reduction of the forward
/// @return 0 for an ignored row; upstream/n_valid for mean; upstream otherwise.
__host__ __device__ inline float row_grad_scale(float upstream, bool valid, std::int64_t n_valid,
                                                lce::reduction red) noexcept {
  if (!valid) return 0.0f;
  if (red == lce::reduction::mean) return n_valid > 0 ? upstream / static_cast<float>(n_valid) : 0.0f;
  return upstream;
}

/// @brief One element of the logit gradient: g·(exp(z − lse) − [is_target]).
__host__ __device__ inline float logit_grad(float z, float lse, bool is_target,
                                            float g) noexcept {
  return g * (expf(z - lse) - (is_target ? 1.0f : 0.0f));
}

}  // namespace thread
LCE_NAMESPACE_END
