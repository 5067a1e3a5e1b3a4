/// @file forward_finalize.cuh
/// @brief From the per-row statistics to every forward output: the combine kernel that merges
/// the vocabulary splits (then thread::finish_row), and the single-block reduction of the loss
/// (fixed order, so the result is deterministic).
#pragma once

#include <cstdint>

#include "../block/reduce.cuh"
#include "../options.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/finish_row.cuh"
#include "../thread/loss_scalars.cuh"
#include "../thread/row_stats.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

struct combine_params {
  const thread::row_stats* partial;  ///< [splits, n]
  const float* target_logit;         ///< [n]
  std::int64_t n, splits;
  thread::row_loss_params loss;
  thread::row_outputs out;
};

/// One thread per row: merges the vocabulary splits in order, then thread::finish_row. (Kernels are
/// templates so that every translation unit may include them: a non-template __global__
/// function would be defined once per unit.)
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    combine_rows_kernel(const combine_params p) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (row >= p.n) return;
  const thread::row_stats st = thread::row_stats_merge_splits(p.partial, p.n, p.splits, row);
  thread::finish_row(row, st, p.target_logit + row, p.loss, p.out);
}

struct reduce_params {
  const float* ce;             ///< [n]
  const float* token_z_loss;   ///< [n]
  const std::int64_t* argmax;  ///< [n]
  thread::target_view targets;
  std::int64_t n;
  lce::reduction reduction;
  const thread::loss_scalars* scalars;  ///< n_valid and Σ_valid w_y
  float* loss;                          ///< [1] or null
  float* z_loss;                        ///< [1] or null
  std::int64_t* correct;                ///< [1] or null
};

/// A single block: loss = Σ ce / Σ_valid w_y + Σ z / n_valid (mean; 0 when no row is valid) or
/// the plain sums; the z-loss part alone; the count of correct predictions.
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    reduce_loss_kernel(const reduce_params p) {
  using sum_f = block::sum_reduce<float, Threads>;
  using sum_i = block::sum_reduce<long long, Threads>;
  __shared__ union {
    typename sum_f::temp_storage f;
    typename sum_i::temp_storage i;
  } storage;
  float ce = 0.0f, z = 0.0f;
  long long hits = 0;
  for (std::int64_t row = threadIdx.x; row < p.n; row += Threads) {
    ce += p.ce[row];
    z += p.token_z_loss[row];
    const std::int64_t y = p.targets(row);
    // argmax is in [0, v), or −1 for a NaN row: y >= 0 keeps an invalid target −1 from matching.
    hits += (thread::is_valid_target(y, p.targets.ignore_index) && y >= 0 && p.argmax[row] == y)
                ? 1
                : 0;
  }
  const float ce_total = sum_f::sum(storage.f, ce);
  __syncthreads();  // the temp storage is reused
  const float z_total = sum_f::sum(storage.f, z);
  __syncthreads();
  const long long correct = sum_i::sum(storage.i, hits);
  if (threadIdx.x == 0) {
    float ce_part = ce_total, z_part = z_total;
    if (p.reduction == lce::reduction::mean) {
      const thread::loss_scalars s = *p.scalars;
      ce_part = s.weight_valid != 0.0f ? ce_total / s.weight_valid : 0.0f;
      z_part = s.n_valid > 0 ? z_total / static_cast<float>(s.n_valid) : 0.0f;
    }
    if (p.loss != nullptr) *p.loss = ce_part + z_part;
    if (p.z_loss != nullptr) *p.z_loss = z_part;
    if (p.correct != nullptr) *p.correct = correct;
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
