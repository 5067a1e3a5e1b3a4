/// @file forward_finalize.cuh
/// @brief After the fused forward: merge the partial lse states of each row into its lse and
/// loss, then reduce the per-token losses to the mean or sum in one block (fixed order, so
/// the result is deterministic).
#pragma once

#include <cstdint>

#include "../block/reduce.cuh"
#include "../options.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/online_lse.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

struct combine_params {
  const thread::lse_state* partial;  ///< [splits, n]
  const float* target_logit;         ///< [n]
  const std::int64_t* targets;       ///< [n]
  std::int64_t n, v, splits, ignore_index;
  float* lse;         ///< [n] or null
  float* token_loss;  ///< [n] (the caller's or the workspace's)
};

/// One thread per row. (Kernels are templates so that every translation unit may include
/// them: a non-template __global__ function would be defined once per unit.)
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    combine_rows_kernel(const combine_params p) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (row >= p.n) return;
  thread::lse_state state = thread::lse_identity();
  for (std::int64_t s = 0; s < p.splits; ++s) state = thread::lse_merge(state, p.partial[s * p.n + row]);
  const float lse = thread::lse_value(state);
  const std::int64_t y = p.targets[row];
  const bool readable = thread::is_valid_target(y, p.ignore_index) && thread::in_vocabulary(y, p.v);
  const float z_target = readable ? p.target_logit[row] : 0.0f;
  if (p.lse != nullptr) p.lse[row] = lse;
  p.token_loss[row] = thread::token_loss(lse, z_target, y, p.v, p.ignore_index);
}

struct reduce_params {
  const float* token_loss;      ///< [n]
  const std::int64_t* targets;  ///< [n]
  std::int64_t n, ignore_index;
  lce::reduction reduction;
  float* loss;  ///< [1]
};

/// A single block: mean (over valid rows; 0 when none is valid) or sum of the token losses.
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    reduce_loss_kernel(const reduce_params p) {
  using sum_f = block::sum_reduce<float, Threads>;
  using sum_i = block::sum_reduce<long long, Threads>;
  __shared__ union {
    typename sum_f::temp_storage f;
    typename sum_i::temp_storage i;
  } storage;
  float partial = 0.0f;
  long long valid = 0;
  for (std::int64_t row = threadIdx.x; row < p.n; row += Threads) {
    partial += p.token_loss[row];
    valid += thread::is_valid_target(p.targets[row], p.ignore_index) ? 1 : 0;
  }
  const float total = sum_f::sum(storage.f, partial);
  __syncthreads();  // the temp storage is reused
  const long long n_valid = sum_i::sum(storage.i, valid);
  if (threadIdx.x == 0) {
    if (p.reduction == lce::reduction::mean) {
      *p.loss = n_valid > 0 ? total / static_cast<float>(n_valid) : 0.0f;
    } else {
      *p.loss = total;
    }
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
