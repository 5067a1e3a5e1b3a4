/// @file row_grad.cuh
/// @brief The per-row part of the logit gradient: its parameters (`logit_grad_params`, as a
/// CUTLASS thread epilogue carries its own Params) and the coefficients of one row
/// (`make_row_grad`), shared by every kernel that forms dZ (kernel/logit_grad.cuh,
/// kernel/logit_grad_sm90.cuh, kernel/stored_grad.cuh).
#pragma once

#include <cstdint>

#include "../options.hpp"
#include "cross_entropy.cuh"
#include "loss_scalars.cuh"

LCE_NAMESPACE_BEGIN
namespace thread {

/// What forms dZ over a chunk of recomputed logits: the chunk, the row and vocabulary options,
/// the upstream gradient and the loss scalars.
template <class Element>
struct logit_grad_params {
  float* logits;              ///< [rows, ld] fp32 raw logits X·Wᵀ; overwritten by dZ as Element
  std::int64_t ld;            ///< row stride of the chunk in fp32 elements
  std::int64_t cols;          ///< valid columns of the chunk
  std::int64_t row0;          ///< global row of chunk row 0
  std::int64_t vocab0;        ///< global vocabulary id of chunk column 0
  std::int64_t v;             ///< vocabulary size
  const Element* bias;        ///< [v] or null
  const float* class_weight;  ///< [v] or null
  target_view targets;
  logit_transform transform;
  float smoothing;
  float z_loss;
  const float* lse;   ///< [n]
  const float* grad;  ///< upstream gradient, [1] or [n] (per_row), or null (= 1)
  bool grad_per_row;
  const loss_scalars* scalars;  ///< denominators, Σ w and alpha; dZ is stored divided by alpha
  lce::reduction reduction;
  float filter_eps;  ///< loss_options::filter_eps (0: every entry)
};

/// What the logit gradient of one row needs: its target, lse and coefficients (divided by
/// alpha); `active` is false when the row's gradient is zero (ignored row, zero upstream).
struct row_grad {
  std::int64_t y;
  float lse;
  grad_coeffs coeffs;
  bool active;
};

template <class Element>
__device__ inline row_grad make_row_grad(const logit_grad_params<Element>& p, std::int64_t row) {
  row_grad r;
  r.y = p.targets(row);
  // Ignored rows and rows with a target outside [0, v) get a zero gradient.
  const bool valid = is_scored_target(r.y, p.targets.ignore_index, p.v);
  const loss_scalars sc = *p.scalars;
  const float upstream = p.grad == nullptr ? 1.0f : p.grad[p.grad_per_row ? row : 0];
  row_scales g = row_grad_scales(upstream, valid, sc.weight_valid, static_cast<float>(sc.n_valid),
                                 p.reduction);
  const float inv_alpha = sc.alpha != 0.0f ? 1.0f / sc.alpha : 0.0f;
  g = {g.ce * inv_alpha, g.z * inv_alpha};
  r.active = g.ce != 0.0f || g.z != 0.0f;
  r.lse = p.lse[row];
  const float w_y = (p.class_weight != nullptr && valid) ? p.class_weight[r.y] : 1.0f;
  r.coeffs = row_grad_coeffs(g, r.lse, w_y, sc.weight_sum, p.v, p.smoothing, p.z_loss);
  return r;
}

}  // namespace thread
LCE_NAMESPACE_END
