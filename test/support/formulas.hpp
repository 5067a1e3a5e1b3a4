/// @file formulas.hpp
/// @brief The option-free per-row formulas that only the tests use (no kernel needs them): the
/// fp32 check of the reference and the thread/ tests compare the library's formulas with them.
/// Host code, built from the library's thread/ primitives.
#pragma once

#include <cmath>
#include <cstdint>
#include <lce/options.hpp>
#include <lce/thread/cross_entropy.cuh>
#include <lce/thread/online_lse.cuh>

namespace lce_test {

/// @brief Adds one value to an online lse state with a single exponential (the common case
/// z ≤ max rescales nothing). `-inf` (a masked value) leaves the state unchanged; NaN
/// propagates. (The kernels fold whole rows into thread::row_stats instead.)
inline lce::thread::lse_state lse_push(lce::thread::lse_state s, float z) noexcept {
  if (z == -INFINITY) return s;
  if (z <= s.max) return {s.max, s.sum + expf(z - s.max)};
  if (z > s.max) return {z, s.sum * expf(s.max - z) + 1.0f};  // exp(−inf) = 0 when empty
  return {NAN, NAN};                                          // z or max is NaN
}

/// @brief Loss of one token without options: lse − z_y from the same fp32 values that built
/// the lse (so it is ≥ 0 up to rounding). Ignored rows give 0, and so do rows whose target is
/// outside [0, v): they are treated as ignored (and counted in lce::device_status).
inline float token_loss(float lse, float target_logit, std::int64_t y, std::int64_t v,
                        std::int64_t ignore_index) noexcept {
  if (!lce::thread::is_scored_target(y, ignore_index, v)) return 0.0f;
  return lse - target_logit;
}

/// @brief Scale g_i of row i without options (ce_denom = z_denom = n_valid).
inline float row_grad_scale(float upstream, bool valid, std::int64_t n_valid,
                            lce::reduction red) noexcept {
  const float n = static_cast<float>(n_valid);
  return lce::thread::row_grad_scales(upstream, valid, n, n, red).ce;
}

/// @brief One element of the logit gradient without options: g·(exp(z − lse) − [is_target]).
inline float logit_grad(float z, float lse, bool is_target, float g) noexcept {
  return g * (lce::thread::softmax_prob(z, lse) - (is_target ? 1.0f : 0.0f));
}

}  // namespace lce_test
