/// @file forward_finalize.cuh
/// @brief From the per-row statistics to every forward output: `finish_row` (shared by the
/// fused forward's combine and the row_chunked one-pass forward_backward), the combine kernel
/// that merges the vocabulary splits, and the single-block reduction of the loss (fixed order,
/// so the result is deterministic).
#pragma once

#include <cstdint>

#include "../block/reduce.cuh"
#include "../options.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/row_stats.cuh"
#include "elementwise.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// Where the per-row outputs go. lse, token_loss, entropy, target_logprob may be null;
/// token_z_loss, argmax and ce are always written (the caller's buffers or the workspace's),
/// since the reduction reads them.
struct row_outputs {
  float* lse;
  float* token_loss;
  float* token_z_loss;
  std::int64_t* argmax;
  float* entropy;
  float* target_logprob;
  float* ce;  ///< cross-entropy part of each token's loss (workspace)
};

/// What turns statistics into losses.
struct row_loss_params {
  thread::target_view targets;
  std::int64_t v;
  const float* class_weight;  ///< [v] or null
  float smoothing;
  float z_loss;
  const loss_scalars* scalars;  ///< weight_sum (computed before the forward's rows finish)
};

/// Writes every output of row `row`. `target_logit` is only read when the target is scored
/// (not ignored, inside the vocabulary; otherwise nothing wrote it). A target outside [0, v)
/// is treated as ignored; loss_scalars_kernel counts it into the caller's device_status.
__device__ inline void finish_row(std::int64_t row, const thread::row_stats& st,
                                  const float* target_logit, const row_loss_params& lp,
                                  const row_outputs& out) {
  const float lse = thread::row_lse(st);
  const std::int64_t y = lp.targets(row);
  if (out.lse != nullptr) out.lse[row] = lse;
  if (out.entropy != nullptr) out.entropy[row] = thread::row_entropy(st, lse);
  out.argmax[row] = st.argmax;
  float ce = 0.0f, z = 0.0f, logprob = 0.0f;
  if (thread::is_scored_target(y, lp.targets.ignore_index, lp.v)) {
    const float z_y = *target_logit;
    const float w_y = lp.class_weight != nullptr ? lp.class_weight[y] : 1.0f;
    const thread::loss_terms t = thread::row_loss(lse, z_y, st.sum_wz, w_y, lp.scalars->weight_sum,
                                                  lp.v, lp.smoothing, lp.z_loss);
    ce = t.ce;
    z = t.z_loss;
    logprob = z_y - lse;
  }
  out.ce[row] = ce;
  out.token_z_loss[row] = z;
  if (out.token_loss != nullptr) out.token_loss[row] = ce + z;
  if (out.target_logprob != nullptr) out.target_logprob[row] = logprob;
}

struct combine_params {
  const thread::row_stats* partial;  ///< [splits, n]
  const float* target_logit;         ///< [n]
  std::int64_t n, splits;
  row_loss_params loss;
  row_outputs out;
};

/// One thread per row: merges the vocabulary splits in order, then finish_row. (Kernels are
/// templates so that every translation unit may include them: a non-template __global__
/// function would be defined once per unit.)
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    combine_rows_kernel(const combine_params p) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (row >= p.n) return;
  thread::row_stats st = thread::row_stats_identity();
  for (std::int64_t s = 0; s < p.splits; ++s) st = thread::row_stats_merge(st, p.partial[s * p.n + row]);
  finish_row(row, st, p.target_logit + row, p.loss, p.out);
}

struct reduce_params {
  const float* ce;                  ///< [n]
  const float* token_z_loss;        ///< [n]
  const std::int64_t* argmax;       ///< [n]
  thread::target_view targets;
  std::int64_t n;
  lce::reduction reduction;
  const loss_scalars* scalars;      ///< n_valid and Σ_valid w_y
  float* loss;                      ///< [1] or null
  float* z_loss;                    ///< [1] or null
  std::int64_t* correct;            ///< [1] or null
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
      const loss_scalars s = *p.scalars;
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
