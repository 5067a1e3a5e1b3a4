/// @file row_lse.cuh
/// @brief Statistics and every forward output of whole rows of recomputed fp32 logits (the
/// row_chunked forward_backward, where each chunk holds complete rows and no separate forward
/// runs).
#pragma once

#include <cstdint>

#include "../thread/cross_entropy.cuh"
#include "../thread/finish_row.cuh"
#include "../thread/row_stats.cuh"
#include "../warp/reduce.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class Element>
struct row_lse_params {
  const float* logits;  ///< [rows, ld] fp32 raw logits X·Wᵀ, complete rows (v columns)
  std::int64_t ld, row0;
  const Element* bias;  ///< [v] or null
  thread::logit_transform transform;
  thread::row_loss_params loss;
  thread::row_outputs out;
};

/// One block per row: streaming statistics over the row (each thread a strided part, then a
/// fixed-order merge), the target logit from the same fp32 values, then thread::finish_row.
template <class Element, int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    row_lse_kernel(const row_lse_params<Element> p) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps");
  __shared__ thread::row_stats warp_stats[Threads / 32];
  __shared__ float target_logit;
  const std::int64_t row = p.row0 + blockIdx.x;
  const float* raw = p.logits + static_cast<std::int64_t>(blockIdx.x) * p.ld;
  const std::int64_t v = p.loss.v;
  const std::int64_t y = p.loss.targets(row);
  const float* weight = p.loss.class_weight;

  thread::row_stats st = thread::row_stats_identity();
  for (std::int64_t c = threadIdx.x; c < v; c += Threads) {
    const float z =
        p.transform(raw[c] + (p.bias != nullptr ? static_cast<float>(p.bias[c]) : 0.0f));
    st = thread::row_stats_push(st, c, z, weight != nullptr ? weight[c] : 1.0f);
    if (c == y) target_logit = z;
  }
  st = warp::allreduce_row_stats(st);
  if (threadIdx.x % 32 == 0) warp_stats[threadIdx.x / 32] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    thread::row_stats total = thread::row_stats_identity();
#pragma unroll
    for (int w = 0; w < Threads / 32; ++w) total = thread::row_stats_merge(total, warp_stats[w]);
    thread::finish_row(row, total, &target_logit, p.loss, p.out);
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
