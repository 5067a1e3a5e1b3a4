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

/// @brief Whether row target `y` is scored: not ignored and inside [0, v). A target outside
/// [0, v) that is not ignore_index is invalid: its row is treated as ignored (and counted in
/// lce::device_status::invalid_targets).
__host__ __device__ constexpr bool is_scored_target(std::int64_t y, std::int64_t ignore_index,
                                                    std::int64_t v) noexcept {
  return is_valid_target(y, ignore_index) && in_vocabulary(y, v);
}

/// @brief Whether row target `y` is invalid: not ignore_index, yet outside [0, v).
__host__ __device__ constexpr bool is_invalid_target(std::int64_t y, std::int64_t ignore_index,
                                                     std::int64_t v) noexcept {
  return is_valid_target(y, ignore_index) && !in_vocabulary(y, v);
}

/// @brief The per-element logit transform z = softcap(raw / τ) and its derivative.
///
/// A logit that is ±inf (an infinite input, or X·Wᵀ overflowing fp32) becomes NaN: +inf would
/// otherwise be capped to c, and −inf would silently mask its class; NaN makes the row's lse
/// and loss NaN in every code path (docs/robustness.md). Columns beyond the vocabulary are
/// masked by the kernels with −inf *after* the transform.
struct logit_transform {
  float inv_temperature = 1.0f;  ///< 1/τ
  float softcap = 0.0f;          ///< c > 0, or 0 for no cap

  __host__ __device__ float operator()(float raw) const noexcept {
    const float z = raw * inv_temperature;
    const float out = softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
    return fabsf(z) == INFINITY ? NAN : out;
  }
  /// dz/draw, from the transformed value z.
  __host__ __device__ float derivative(float z) const noexcept {
    if (softcap <= 0.0f) return inv_temperature;
    const float t = z / softcap;
    return inv_temperature * (1.0f - t * t);
  }
};

/// @brief The two loss terms of one valid row.
struct loss_terms {
  float ce;      ///< (1 − α)·w_y·(lse − z_y) + (α/V)·(w_sum·lse − Σ_v w_v z_v)
  float z_loss;  ///< s·lse²
};

/// @param lse     log Σ exp(z)
/// @param z_y     the target's (transformed) logit
/// @param sum_wz  Σ_v w_v·z_v (Σ_v z_v without class weights)
/// @param w_y     the target's class weight (1 without weights)
/// @param w_sum   Σ_v w_v (V without weights)
__host__ __device__ inline loss_terms row_loss(float lse, float z_y, float sum_wz, float w_y,
                                               float w_sum, std::int64_t v, float smoothing,
                                               float z_loss_scale) noexcept {
  float ce = (1.0f - smoothing) * w_y * (lse - z_y);
  if (smoothing != 0.0f) ce += smoothing / static_cast<float>(v) * (w_sum * lse - sum_wz);
  return {ce, z_loss_scale * lse * lse};
}

/// @brief Upstream scales of a row's two terms: dL/d(ce_i) and dL/d(zloss_i).
struct row_scales {
  float ce;
  float z;
};

/// @param upstream     the row's upstream gradient (the scalar one for mean/sum)
/// @param ce_denom     mean: Σ_valid w_{y_i} (n_valid without weights)
/// @param z_denom      mean: n_valid
/// @return zeros for an ignored row or a zero denominator.
__host__ __device__ inline row_scales row_grad_scales(float upstream, bool valid, float ce_denom,
                                                      float z_denom, lce::reduction red) noexcept {
  if (!valid) return {0.0f, 0.0f};
  if (red != lce::reduction::mean) return {upstream, upstream};
  return {ce_denom != 0.0f ? upstream / ce_denom : 0.0f,
          z_denom != 0.0f ? upstream / z_denom : 0.0f};
}

/// @brief dL/dz_v = a·p_v − b·[v = y] − c·w_v for one row: the coefficients.
struct grad_coeffs {
  float p;       ///< of p_v
  float target;  ///< of [v = y]
  float weight;  ///< of w_v (label smoothing)
};

/// @brief Coefficients of a row's logit gradient, from its scales, lse and options:
/// a = ce·((1 − α)·w_y + α·w_sum/V) + z·2·s·lse, b = ce·(1 − α)·w_y, c = ce·α/V.
__host__ __device__ inline grad_coeffs row_grad_coeffs(row_scales g, float lse, float w_y,
                                                       float w_sum, std::int64_t v, float smoothing,
                                                       float z_loss_scale) noexcept {
  const float per_class = smoothing / static_cast<float>(v);
  const float target = g.ce * (1.0f - smoothing) * w_y;
  return {target + g.ce * per_class * w_sum + g.z * 2.0f * z_loss_scale * lse, target,
          g.ce * per_class};
}

/// @brief p = e^{z − lse}, with z − lse clamped at 0: lse ≥ max z holds exactly, but the
/// backward recomputes z with another GEMM than the forward's, so at huge |z| (fp32 logits near
/// 1e30, where one ulp is ~1e23) the recomputed z may exceed the forward's lse and e^{z − lse}
/// would overflow to inf (and 0·inf to NaN in an inactive row). NaN stays NaN (no fminf).
__host__ __device__ inline float softmax_prob(float z, float lse) noexcept {
  const float d = z - lse;
  return expf(d > 0.0f ? 0.0f : d);
}

/// @brief One element of the gradient w.r.t. the transformed logit, from its probability p.
/// With `filter_eps` > 0 (loss_options::filter_eps) an entry other than the target's whose p is
/// below it is 0.
__host__ __device__ inline float logit_grad_of_prob(const grad_coeffs& c, float p, bool is_target,
                                                    float w_v, float filter_eps = 0.0f) noexcept {
  if (!is_target && p < filter_eps) return 0.0f;
  return c.p * p - (is_target ? c.target : 0.0f) - c.weight * w_v;
}

/// @brief One element of the gradient w.r.t. the transformed logit z (logit_grad_of_prob of
/// p = e^{z − lse}).
__host__ __device__ inline float logit_grad(const grad_coeffs& c, float z, float lse,
                                            bool is_target, float w_v,
                                            float filter_eps = 0.0f) noexcept {
  return logit_grad_of_prob(c, softmax_prob(z, lse), is_target, w_v, filter_eps);
}

/// @brief Targets as the kernels see them: ignore_index and the causal shift applied, and
/// with `vocab_offset` (a vocabulary shard whose column 0 is global id vocab_offset, the
/// vocabulary-parallel layer lce/nccl/) shard-local: valid targets are returned minus the
/// offset, ignored rows as ignore_index. A shard-local target may then equal ignore_index, so
/// only kernels that compare targets with column positions (never with ignore_index) may be
/// given an offset view: the fused forward is; loss_scalars, finish_row, logit_grad are not.
struct target_view {
  const std::int64_t* targets;
  std::int64_t seq_len;  ///< causal shift T, 0 = off
  std::int64_t ignore_index;
  std::int64_t vocab_offset = 0;  ///< global id of the shard's column 0 (0: whole vocabulary)
  std::int64_t row_offset = 0;    ///< global row of row 0 (a kernel over a chunk of rows)

  __host__ __device__ std::int64_t operator()(std::int64_t row) const noexcept;
};

/// @brief The target of row `row` under the causal shift (shift_seq_len = T > 0): the next
/// position's target, or ignore_index for the last position of a sequence.
__host__ __device__ inline std::int64_t shifted_target(const std::int64_t* targets,
                                                       std::int64_t row, std::int64_t seq_len,
                                                       std::int64_t ignore_index) noexcept {
  if (seq_len <= 0) return targets[row];
  return (row % seq_len == seq_len - 1) ? ignore_index : targets[row + 1];
}

__host__ __device__ inline std::int64_t target_view::operator()(std::int64_t row) const noexcept {
  const std::int64_t y = shifted_target(targets, row + row_offset, seq_len, ignore_index);
  return (vocab_offset != 0 && y != ignore_index) ? y - vocab_offset : y;
}

}  // namespace thread
LCE_NAMESPACE_END
