/// @file finish_row.cuh
/// @brief From one row's statistics to every per-row forward output (`finish_row`): shared by
/// the fused forward's combine, the row_chunked one-pass forward_backward and the
/// vocabulary-parallel finish.
#pragma once

#include <cstdint>

#include "cross_entropy.cuh"
#include "loss_scalars.cuh"
#include "row_stats.cuh"

LCE_NAMESPACE_BEGIN
namespace thread {

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
  target_view targets;
  std::int64_t v;
  const float* class_weight;  ///< [v] or null
  float smoothing;
  float z_loss;
  const loss_scalars* scalars;  ///< weight_sum (computed before the forward's rows finish)
};

/// Writes every output of row `row`. `target_logit` is only read when the target is scored
/// (not ignored, inside the vocabulary; otherwise nothing wrote it). A target outside [0, v)
/// is treated as ignored; kernel::loss_scalars_kernel counts it into the caller's device_status.
__device__ inline void finish_row(std::int64_t row, const row_stats& st, const float* target_logit,
                                  const row_loss_params& lp, const row_outputs& out) {
  const float lse = row_lse(st);
  const std::int64_t y = lp.targets(row);
  if (out.lse != nullptr) out.lse[row] = lse;
  if (out.entropy != nullptr) out.entropy[row] = row_entropy(st, lse);
  out.argmax[row] = st.argmax;
  float ce = 0.0f, z = 0.0f, logprob = 0.0f;
  if (is_scored_target(y, lp.targets.ignore_index, lp.v)) {
    const float z_y = *target_logit;
    const float w_y = lp.class_weight != nullptr ? lp.class_weight[y] : 1.0f;
    const loss_terms t =
        row_loss(lse, z_y, st.sum_wz, w_y, lp.scalars->weight_sum, lp.v, lp.smoothing, lp.z_loss);
    ce = t.ce;
    z = t.z_loss;
    logprob = z_y - lse;
  }
  out.ce[row] = ce;
  out.token_z_loss[row] = z;
  if (out.token_loss != nullptr) out.token_loss[row] = ce + z;
  if (out.target_logprob != nullptr) out.target_logprob[row] = logprob;
}

}  // namespace thread
LCE_NAMESPACE_END
