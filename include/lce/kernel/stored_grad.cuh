/// @file stored_grad.cuh
/// @brief The logit gradient of the `stored` backward strategy, in place: the forward kept
/// e^{z − m_t} in the element type with the fp32 maximum m_t of each (row, vocabulary tile)
/// (detail::stored_exp); with the row's lse, p = e^{z − m_t}·e^{m_t − lse}, and
/// dZ = (a·p − b·[v = y] − c)·dz/draw (thread::row_grad_coeffs) overwrites the stored values,
/// divided by alpha as kernel/logit_grad.cuh stores it.
///
/// The target's entry is formed from the forward's fp32 target logit, not from its 16-bit
/// value: at p_y near 1, a 16-bit p_y would lose all of p_y − 1. Under a softcap, dz/draw needs
/// z itself: z = m_t + ln(e^{z − m_t}), within the cap (its error, ~2⁻⁹ absolute, moves only
/// the derivative factor 1 − (z/c)²). No bias and no class weights (the lean forward that
/// stores the values has neither).
///
/// One block per row of a chunk of rows (grad.row0: its first global row; the stored values
/// hold the chunk's rows); each thread reads and writes 8 elements (16 bytes) at a time.
#pragma once

#include <cstdint>

#include "../arch/sm90.cuh"
#include "../detail/stored_exp.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/row_grad.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class Element>
struct stored_grad_params {
  thread::logit_grad_params<Element>
      grad;                           ///< lse, targets, scalars, options (logits, bias unused)
  detail::stored_exp<Element> store;  ///< values in, dZ out
  const float* target_logit;          ///< [n] the forward's fp32 target logits (transformed),
                                      ///< by global row; read for rows whose target is in the
                                      ///< window (grad.vocab0, grad.cols) only
};

template <class Element, int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    stored_grad_kernel(const stored_grad_params<Element> p) {
  constexpr float log2e = 1.4426950408889634f;
  constexpr int per = 8;  // elements per 16-byte access
  // The stored values are the chunk's (local rows); everything else is indexed by global row.
  const std::int64_t local = blockIdx.x;
  const std::int64_t row = p.grad.row0 + local;
  const thread::row_grad rg = thread::make_row_grad(p.grad, row);
  const detail::stored_exp<Element>& st = p.store;
  Element* values = st.values + local * st.ld;
  const float* tile_max = st.tile_max + local * st.tiles;
  // Columns of the vocabulary window: v of them from global id vocab0 (the whole vocabulary,
  // or an lce::nccl shard); the target is a global id.
  const std::int64_t v = p.grad.cols;
  const std::int64_t target = rg.y - p.grad.vocab0;
  const thread::logit_transform& tf = p.grad.transform;
  const float cap = tf.softcap;
  // The target's probability from its exact fp32 logit (only read where the window has it).
  const bool has_target = rg.active && target >= 0 && target < v;
  const float z_target = has_target ? p.target_logit[row] : 0.0f;
  const float p_target = thread::softmax_prob(z_target, rg.lse);

  // e^{m_t − lse} is the tile's: taken once per group of 8 (one exponential instead of eight).
  auto tile_scale = [&](float m) { return arch::sm90::fast_exp2((m - rg.lse) * log2e); };
  auto grad_of = [&](float e, float m, float scale, std::int64_t c) {
    const bool is_target = c == target;
    const float prob = is_target ? p_target : e * scale;
    float dzdraw = tf.inv_temperature;
    if (cap > 0.0f) {
      const float z = is_target ? z_target : fminf(fmaxf(m + __logf(e), -cap), cap);
      dzdraw = tf.derivative(z);
    }
    const float g = thread::logit_grad_of_prob(rg.coeffs, prob, is_target, 1.0f, p.grad.filter_eps);
    return rg.active ? g * dzdraw : 0.0f;
  };

  // Full groups of 8 (v - v % 8 columns; 8 divides the tile width, so a group lies in one tile),
  // then the tail one element at a time.
  const std::int64_t full = v / per * per;
  for (std::int64_t c0 = static_cast<std::int64_t>(threadIdx.x) * per; c0 < full;
       c0 += static_cast<std::int64_t>(Threads) * per) {
    const float m = tile_max[c0 / st.tile_cols];
    const float scale = tile_scale(m);
    uint4 raw = *reinterpret_cast<const uint4*>(values + c0);
    std::uint32_t* words = reinterpret_cast<std::uint32_t*>(&raw);
#pragma unroll
    for (int k = 0; k < per / 2; ++k) {
      Element pair[2];
      *reinterpret_cast<std::uint32_t*>(pair) = words[k];
      const std::int64_t c = c0 + 2 * k;
      words[k] =
          arch::sm90::pack_pair<Element>(grad_of(static_cast<float>(pair[0]), m, scale, c),
                                         grad_of(static_cast<float>(pair[1]), m, scale, c + 1));
    }
    *reinterpret_cast<uint4*>(values + c0) = raw;
  }
  for (std::int64_t c = full + threadIdx.x; c < v; c += Threads) {
    const float m = tile_max[c / st.tile_cols];
    values[c] = static_cast<Element>(grad_of(static_cast<float>(values[c]), m, tile_scale(m), c));
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
