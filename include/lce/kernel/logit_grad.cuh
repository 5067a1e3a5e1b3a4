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

#include "../thread/cross_entropy.cuh"
#include "../thread/row_grad.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// One block per chunk row.
template <class Element, int Threads, int PerThread>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    logit_grad_kernel(const thread::logit_grad_params<Element> p) {
  const std::int64_t r = blockIdx.x;
  const thread::row_grad rg = thread::make_row_grad(p, p.row0 + r);
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
        const float z =
            p.transform(in[c] + (p.bias != nullptr ? static_cast<float>(p.bias[v]) : 0.0f));
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
