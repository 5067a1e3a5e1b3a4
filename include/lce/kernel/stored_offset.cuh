/// @file stored_offset.cuh
/// @brief The `stored` strategy with one offset per row (docs/algorithm.md §5.5): the forward
/// keeps E = e^{z − c} with c = z_target + 20, known before it (stored_offset_kernel), instead
/// of e^{z − m} with one maximum per (row, tile). Then dZ = diag(f)·E except at the target, with
/// f = a·e^{c − lse}/τ per row, so no pass over the n·V values forms dZ: the target's entry is
/// written in place (stored_fix_kernel, from the forward's fp32 target logit: p_y − 1 is never
/// formed from a 16-bit p_y), dW = Eᵀ·(f ⊙ X) and db = Eᵀ·f take the row scale on their n-long
/// side, and dX = diag(f)·(E·W) takes it after an fp32 GEMM (scale_rows_kernel), rounded once.
///
/// Range: the element types keep fp32's exponent (bf16) or are not used here (fp16's e^{z − c}
/// would overflow at z − c > 11: the offset path takes bf16 only). e^{z − c} is finite for
/// z − c < 88 and every term with p > e^{−67} survives (z ≥ max − 47 > c − 87). A row whose
/// maximum lies more than 60 above c (its target ~80 nats below the row's best) is flagged by
/// the forward and recomputed whole by stored_fix_kernel (V dot products of length d).
#pragma once

#include <cmath>
#include <cstdint>

#include "../thread/cross_entropy.cuh"
#include "../thread/row_grad.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// How far above the target logit a row's offset lies, and how far above the offset a row's
/// maximum may lie before the row is recomputed.
inline constexpr float stored_offset_lead = 20.0f;
inline constexpr float stored_offset_limit = 60.0f;

/// The fp32 dot product of two 16-bit rows of length d, by a warp (every lane gets it).
template <class Element>
__device__ inline float warp_dot(const Element* a, const Element* b, std::int64_t d) {
  float sum = 0.0f;
  for (std::int64_t k = threadIdx.x % 32; k < d; k += 32)
    sum = fmaf(static_cast<float>(a[k]), static_cast<float>(b[k]), sum);
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  return sum;
}

template <class Element>
struct stored_offset_params {
  const Element* x;  ///< the chunk's rows [rows, ldx]
  const Element* w;  ///< [v, ldw]
  std::int64_t rows, d, v, ldx, ldw;
  thread::target_view targets;  ///< by global row (row_offset: the chunk's first)
  float inv_temperature;
  float* offset;  ///< [rows] out: z_target/τ + lead, or +inf for a row without a scored target
  int* flagged;   ///< [rows] out: 0 (the forward sets 1)
};

/// One warp per row of the chunk: the row's offset before the forward that stores against it.
template <class Element>
__global__ void LCE_KERNEL_VISIBILITY stored_offset_kernel(const stored_offset_params<Element> p) {
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t r =
           static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
       r < p.rows; r += warps) {
    const std::int64_t y = p.targets(r);
    float c = INFINITY;  // e^{z − ∞} = 0: an ignored row stores zeros
    if (thread::is_scored_target(y, p.targets.ignore_index, p.v)) {
      c = warp_dot(p.x + r * p.ldx, p.w + y * p.ldw, p.d) * p.inv_temperature + stored_offset_lead;
    }
    if (threadIdx.x % 32 == 0) {
      p.offset[r] = c;
      p.flagged[r] = 0;
    }
  }
}

template <class Element>
struct stored_fix_params {
  thread::logit_grad_params<Element> grad;  ///< lse, targets, scalars, options; row0: the chunk's
  Element* values;                          ///< [rows, ld] the stored E of the chunk
  std::int64_t ld;
  const float* offset;        ///< [rows]
  const int* flagged;         ///< [rows]
  const float* target_logit;  ///< [n] the forward's fp32 target logits, by global row
  const Element* x;           ///< the chunk's rows [rows, ldx]
  const Element* w;           ///< [v, ldw]
  std::int64_t d, ldx, ldw;
  Element* x_scaled;  ///< [rows, ld_scaled] out: f ⊙ X
  std::int64_t ld_scaled;
  float* scale;          ///< [rows] out: f
  Element* scale_16bit;  ///< [rows] out: f in the element type (db's vector)
};

/// One block per row of the chunk, after the forward and its combine (the lse): the row scale
/// f, the target's entry of E, f ⊙ x. A flagged row is recomputed whole with f = 1/τ and
/// E = a·p − b·[v = y] (its offset lay too far below the row's maximum).
template <class Element, int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    stored_fix_kernel(const stored_fix_params<Element> p) {
  const std::int64_t r = blockIdx.x;
  const std::int64_t row = p.grad.row0 + r;
  const thread::row_grad rg = thread::make_row_grad(p.grad, row);
  const float inv_t = p.grad.transform.inv_temperature;
  const float c = p.offset[r];
  const bool scored = thread::is_scored_target(rg.y, p.grad.targets.ignore_index, p.grad.v);
  const float z_target = scored ? p.target_logit[row] : 0.0f;
  const float p_target = thread::softmax_prob(z_target, rg.lse);
  Element* e = p.values + r * p.ld;
  float f = 0.0f;
  bool recompute = false;
  if (rg.active && scored) {
    f = inv_t * rg.coeffs.p * expf(c - rg.lse);
    recompute = p.flagged[r] != 0 || !(f > 0.0f) || !isfinite(f);
  }
  if (recompute) {
    // dZ = f·E with f = 1/τ: E = a·p − b·[v = y], every column from its recomputed logit.
    f = inv_t;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    for (std::int64_t col = warp; col < p.grad.v; col += Threads / 32) {
      const float z =
          col == rg.y ? z_target : warp_dot(p.x + r * p.ldx, p.w + col * p.ldw, p.d) * inv_t;
      const float g =
          thread::logit_grad_of_prob(rg.coeffs, thread::softmax_prob(z, rg.lse), col == rg.y, 1.0f);
      if (threadIdx.x % 32 == 0) e[col] = static_cast<Element>(g);
    }
  } else if (threadIdx.x == 0 && rg.active && scored) {
    // The target's entry: f·E_y = (a·p_y − b)/τ, p_y from the exact fp32 target logit.
    e[rg.y] = static_cast<Element>(inv_t * (rg.coeffs.p * p_target - rg.coeffs.target) / f);
  }
  for (std::int64_t k = threadIdx.x; k < p.d; k += Threads)
    p.x_scaled[r * p.ld_scaled + k] =
        static_cast<Element>(f * static_cast<float>(p.x[r * p.ldx + k]));
  if (threadIdx.x == 0) {
    p.scale[r] = f;
    p.scale_16bit[r] = static_cast<Element>(f);
  }
}

/// out[r, k] (+)= scale[r]·in[r, k] over (rows, cols); `in` dense fp32 [rows, cols], out with
/// row stride ld: dX = diag(f)·(E·W), rounded once.
template <class Element>
__global__ void LCE_KERNEL_VISIBILITY scale_rows_kernel(const float* in, const float* scale,
                                                        std::int64_t rows, std::int64_t cols,
                                                        Element* out, std::int64_t ld,
                                                        bool accumulate) {
  const std::int64_t total = rows * cols;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / cols;
    Element& o = out[r * ld + (i - r * cols)];
    o = static_cast<Element>(scale[r] * in[i] + (accumulate ? static_cast<float>(o) : 0.0f));
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
