/// @file row_lse.cuh
/// @brief lse and loss of whole rows of recomputed fp32 logits (the row_chunked
/// forward_backward, where each chunk holds complete rows and no separate forward runs).
#pragma once

#include <cstdint>

#include "../thread/cross_entropy.cuh"
#include "../thread/online_lse.cuh"
#include "../warp/reduce.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class Element>
struct row_lse_params {
  const float* logits;          ///< [rows, ld] fp32, complete rows (v columns)
  std::int64_t ld, v, row0;
  const Element* bias;          ///< [v] or null
  const std::int64_t* targets;  ///< [n]
  std::int64_t ignore_index;
  float* lse;                   ///< [n]
  float* token_loss;            ///< [n]
};

/// One block per row: online lse over the row (each thread a strided part, then a fixed-order
/// merge), the target logit from the same fp32 values.
template <class Element, int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    row_lse_kernel(const row_lse_params<Element> p) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps");
  __shared__ thread::lse_state warp_state[Threads / 32];
  __shared__ float target_logit;
  const std::int64_t row = p.row0 + blockIdx.x;
  const float* z = p.logits + static_cast<std::int64_t>(blockIdx.x) * p.ld;
  const std::int64_t y = p.targets[row];
  const bool readable = thread::is_valid_target(y, p.ignore_index) && thread::in_vocabulary(y, p.v);

  thread::lse_state state = thread::lse_identity();
  for (std::int64_t c = threadIdx.x; c < p.v; c += Threads) {
    const float value = z[c] + (p.bias != nullptr ? static_cast<float>(p.bias[c]) : 0.0f);
    state = thread::lse_push(state, value);
    if (readable && c == y) target_logit = value;
  }
  state = warp::allreduce_lse(state);
  if (threadIdx.x % 32 == 0) warp_state[threadIdx.x / 32] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    thread::lse_state total = thread::lse_identity();
#pragma unroll
    for (int w = 0; w < Threads / 32; ++w) total = thread::lse_merge(total, warp_state[w]);
    const float lse = thread::lse_value(total);
    p.lse[row] = lse;
    p.token_loss[row] = thread::token_loss(lse, readable ? target_logit : 0.0f, y, p.v, p.ignore_index);
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
