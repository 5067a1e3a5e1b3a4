/// @file kernel.cuh
/// @brief The per-row kernels around the cross-rank combine of the vocabulary-parallel
/// forward (docs/vocab_parallel.md): merge this rank's vocabulary splits, rescale its sums to
/// the global row maximum and pack what the all-reduce carries, and finish each row from the
/// global statistics with the core's finish_row.
#pragma once

#include <cstdint>

#include "../thread/cross_entropy.cuh"
#include "../thread/finish_row.cuh"
#include "../thread/row_stats.cuh"
#include "shard.hpp"

LCE_NAMESPACE_BEGIN
namespace nccl {
namespace impl {

/// What the sum all-reduce carries per row, as fields of a [fields, n] float array: the
/// rescaled Σ exp(z − max) and the target logit always; Σ exp(z − max)·z only for the entropy;
/// Σ w·z only for label smoothing. Field −1: not carried.
struct packed_fields {
  int count = 2;
  int entropy = -1;
  int smoothing = -1;
};

inline constexpr int field_sum = 0;
inline constexpr int field_target_logit = 1;
inline constexpr int max_packed_fields = 4;

inline packed_fields make_packed_fields(bool entropy, bool smoothing) noexcept {
  packed_fields f;
  if (entropy) f.entropy = f.count++;
  if (smoothing) f.smoothing = f.count++;
  return f;
}

/// Argmax candidate of a rank that does not hold the row's maximum (ncclMin skips it).
inline constexpr std::int64_t no_argmax = INT64_MAX;

struct shard_combine_params {
  thread::row_stats* partial;  ///< [splits, n]; the merged statistics go to split 0's slot
  std::int64_t n, splits;
  float* row_max;  ///< [n] out: this shard's row maximum (all-reduced next)
};

/// One thread per row: merges the shard's vocabulary splits in order (in place: a thread reads
/// and writes its own row only).
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    shard_combine_kernel(const shard_combine_params p) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (row >= p.n) return;
  const thread::row_stats st = thread::row_stats_merge_splits(p.partial, p.n, p.splits, row);
  p.partial[row] = st;
  p.row_max[row] = st.max;
}

struct shard_pack_params {
  const thread::row_stats* local;  ///< [n] the shard's merged statistics (local argmax)
  const float* row_max;            ///< [n] the global row maximum
  const float* target_logit;       ///< [n] valid where the row's target lies in the shard
  thread::target_view targets;     ///< global ids (no offset)
  std::int64_t v_begin, v_end;
  std::int64_t n;
  packed_fields fields;
  float* packed;         ///< [fields.count, n] out
  std::int64_t* argmax;  ///< [n] out: the candidate for ncclMin, or null
};

/// One thread per row: rescales the shard's sums to the global maximum (a shard with sum 0
/// contributes 0 without an exponential, as row_stats_merge does; NaN propagates through the
/// sum), and contributes its target logit when it owns the target, 0 otherwise, so that the
/// sum is exactly the owner's value. The argmax candidate is the shard's first maximum, as a
/// global id, when it equals the global maximum (the smallest over ranks is then the global
/// first maximum), −1 for a NaN row (the core's argmax of a NaN row).
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    shard_pack_kernel(const shard_pack_params p) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (row >= p.n) return;
  const thread::row_stats st = p.local[row];
  const float m = p.row_max[row];
  const bool nan_row = st.max != st.max;
  const float scale = nan_row ? NAN : (st.sum > 0.0f ? expf(st.max - m) : 0.0f);
  const std::int64_t y = p.targets(row);
  const bool owns =
      thread::is_valid_target(y, p.targets.ignore_index) && y >= p.v_begin && y < p.v_end;
  p.packed[field_sum * p.n + row] = st.sum * scale;
  p.packed[field_target_logit * p.n + row] = owns ? p.target_logit[row] : 0.0f;
  if (p.fields.entropy >= 0) p.packed[p.fields.entropy * p.n + row] = st.sum_pz * scale;
  if (p.fields.smoothing >= 0) p.packed[p.fields.smoothing * p.n + row] = st.sum_wz;
  if (p.argmax != nullptr) {
    p.argmax[row] = nan_row                           ? -1
                    : (st.max == m && st.argmax >= 0) ? st.argmax + p.v_begin
                                                      : no_argmax;
  }
}

struct shard_finish_params {
  const float* row_max;        ///< [n] global
  const float* packed;         ///< [fields.count, n] global sums
  const std::int64_t* argmax;  ///< [n] global candidates (ncclMin), or null
  packed_fields fields;
  std::int64_t n;
  thread::row_loss_params loss;  ///< global: targets, v, class weights, loss scalars
  thread::row_outputs out;
};

/// One thread per row: the global row_stats, then the core's finish_row (every per-row output,
/// identical on every rank).
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    shard_finish_kernel(const shard_finish_params p) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x;
  if (row >= p.n) return;
  std::int64_t arg = -1;
  if (p.argmax != nullptr && p.argmax[row] != no_argmax) arg = p.argmax[row];
  const thread::row_stats st{
      p.row_max[row], p.packed[field_sum * p.n + row],
      p.fields.entropy >= 0 ? p.packed[p.fields.entropy * p.n + row] : 0.0f,
      p.fields.smoothing >= 0 ? p.packed[p.fields.smoothing * p.n + row] : 0.0f, arg};
  thread::finish_row(row, st, p.packed + field_target_logit * p.n + row, p.loss, p.out);
}

}  // namespace impl
}  // namespace nccl
LCE_NAMESPACE_END
