/// @file logit_grad.cuh
/// @brief Turns a chunk of recomputed logits (fp32, row-major) into the logit gradient
/// dZ = g·(softmax(Z) − onehot(y)) *in place*, stored in the element type over the same bytes,
/// divided by the scalar alpha that the following GEMMs multiply back in. With the options:
/// dZ_raw = (a·p − b·[v = y] − c·w_v)·dz/draw (thread::row_grad_coeffs, logit_transform).
///
/// Aliasing: row r of the fp32 chunk starts at byte r·ld·4; its dZ row is written from the same
/// byte as `Element` values. For 16-bit elements, dZ element c overwrites fp32 element c/2, so a
/// block handles a whole row in segments: every thread reads its values of a segment, the block
/// synchronizes, then writes. Writes of a segment only reach fp32 elements already read.
#pragma once

#include <cstdint>

#include "../options.hpp"
#include "../thread/cross_entropy.cuh"
#include "elementwise.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class Element>
struct logit_grad_params {
  float* logits;               ///< [rows, ld] fp32 raw logits X·Wᵀ; overwritten by dZ as Element
  std::int64_t ld;             ///< row stride of the chunk in fp32 elements
  std::int64_t cols;           ///< valid columns of the chunk
  std::int64_t row0;           ///< global row of chunk row 0
  std::int64_t vocab0;         ///< global vocabulary id of chunk column 0
  std::int64_t v;              ///< vocabulary size
  const Element* bias;         ///< [v] or null
  const float* class_weight;   ///< [v] or null
  thread::target_view targets;
  thread::logit_transform transform;
  float smoothing;
  float z_loss;
  const float* lse;            ///< [n]
  const float* grad;           ///< upstream gradient, [1] or [n] (per_row), or null (= 1)
  bool grad_per_row;
  const loss_scalars* scalars; ///< denominators, Σ w and alpha; dZ is stored divided by alpha
  lce::reduction reduction;
  float filter_eps;            ///< loss_options::filter_eps (0: every entry)
};

/// What the logit gradient of one row needs: its target, lse and coefficients (divided by
/// alpha); `active` is false when the row's gradient is zero (ignored row, zero upstream).
struct row_grad {
  std::int64_t y;
  float lse;
  thread::grad_coeffs coeffs;
  bool active;
};

template <class Element>
__device__ inline row_grad make_row_grad(const logit_grad_params<Element>& p, std::int64_t row) {
  row_grad r;
  r.y = p.targets(row);
  // Ignored rows and rows with a target outside [0, v) get a zero gradient.
  const bool valid = thread::is_scored_target(r.y, p.targets.ignore_index, p.v);
  const loss_scalars sc = *p.scalars;
  const float upstream = p.grad == nullptr ? 1.0f : p.grad[p.grad_per_row ? row : 0];
  thread::row_scales g = thread::row_grad_scales(upstream, valid, sc.weight_valid,
                                                 static_cast<float>(sc.n_valid), p.reduction);
  const float inv_alpha = sc.alpha != 0.0f ? 1.0f / sc.alpha : 0.0f;
  g = {g.ce * inv_alpha, g.z * inv_alpha};
  r.active = g.ce != 0.0f || g.z != 0.0f;
  r.lse = p.lse[row];
  const float w_y = (p.class_weight != nullptr && valid) ? p.class_weight[r.y] : 1.0f;
  r.coeffs = thread::row_grad_coeffs(g, r.lse, w_y, sc.weight_sum, p.v, p.smoothing, p.z_loss);
  return r;
}

/// One block per chunk row.
template <class Element, int Threads, int PerThread>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    logit_grad_kernel(const logit_grad_params<Element> p) {
  const std::int64_t r = blockIdx.x;
  const row_grad rg = make_row_grad(p, p.row0 + r);
  const std::int64_t y = rg.y;
  const bool active = rg.active;
  const float lse = rg.lse;
  const thread::grad_coeffs coeffs = rg.coeffs;
  const float* in = p.logits + r * p.ld;
  Element* out = reinterpret_cast<Element*>(p.logits + r * p.ld);

  constexpr int segment = Threads * PerThread;
  for (std::int64_t base = 0; base < p.cols; base += segment) {
    float dz[PerThread];
#pragma unroll
    for (int e = 0; e < PerThread; ++e) {
      const std::int64_t c = base + threadIdx.x + e * Threads;
      dz[e] = 0.0f;
      if (c < p.cols && active) {
        const std::int64_t v = p.vocab0 + c;
        const float z = p.transform(in[c] + (p.bias != nullptr ? static_cast<float>(p.bias[v]) : 0.0f));
        const float w_v = p.class_weight != nullptr ? p.class_weight[v] : 1.0f;
        dz[e] = thread::logit_grad(coeffs, z, lse, v == y, w_v, p.filter_eps) *
                p.transform.derivative(z);
      }
    }
    __syncthreads();  // every fp32 value of this segment is read before any dZ overwrites it
#pragma unroll
    for (int e = 0; e < PerThread; ++e) {
      const std::int64_t c = base + threadIdx.x + e * Threads;
      if (c < p.cols) out[c] = static_cast<Element>(dz[e]);
    }
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
