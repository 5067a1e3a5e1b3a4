/// @file loss_scalars.cuh
/// @brief The one-block reduction that writes the scalars of a loss (thread::loss_scalars: valid
/// rows, weight sums, the gradient normalizer) and counts the invalid targets.
#pragma once

#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "../block/reduce.cuh"
#include "../options.hpp"
#include "../status.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/loss_scalars.cuh"
#include "../thread/online_lse.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

struct loss_scalars_params {
  thread::target_view targets;
  std::int64_t n, v;
  const float* class_weight;  ///< [v] or null
  const float* grad;          ///< upstream gradient ([1] or [n]) or null (= 1)
  lce::reduction reduction;
  thread::loss_scalars* out;
  device_status* status;  ///< or null: invalid targets are added to status->invalid_targets
};

struct nan_max_op {
  __device__ float operator()(float a, float b) const noexcept { return thread::nan_max(a, b); }
};

/// One block, fixed reduction order (deterministic). The one kernel of each launcher call that
/// sees every row's target, so it is also where invalid targets are counted (once per call).
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    loss_scalars_kernel(const loss_scalars_params p) {
  using sum_i = block::sum_reduce<long long, Threads>;
  using sum_f = block::sum_reduce<float, Threads>;
  using max_f = cub::BlockReduce<float, Threads>;
  __shared__ union {
    typename sum_i::temp_storage i;
    typename sum_f::temp_storage f;
    typename max_f::TempStorage m;
  } storage;
  long long count = 0;
  long long invalid = 0;
  float weight = 0.0f;
  float largest_grad = 0.0f;
  for (std::int64_t i = threadIdx.x; i < p.n; i += Threads) {
    const std::int64_t y = p.targets(i);
    if (thread::is_invalid_target(y, p.targets.ignore_index, p.v)) ++invalid;
    if (!thread::is_scored_target(y, p.targets.ignore_index, p.v)) continue;
    ++count;
    if (p.class_weight != nullptr) weight += p.class_weight[y];
    if (p.reduction == lce::reduction::none)
      largest_grad = thread::nan_max(largest_grad, p.grad != nullptr ? fabsf(p.grad[i]) : 1.0f);
  }
  float vocab_weight = 0.0f;
  if (p.class_weight != nullptr)
    for (std::int64_t v = threadIdx.x; v < p.v; v += Threads) vocab_weight += p.class_weight[v];

  const long long n_valid = sum_i::sum(storage.i, count);
  __syncthreads();
  const float weight_valid = sum_f::sum(storage.f, weight);
  __syncthreads();
  const float weight_sum = sum_f::sum(storage.f, vocab_weight);
  __syncthreads();
  const float max_grad = max_f(storage.m).Reduce(largest_grad, nan_max_op{});
  __syncthreads();
  const long long invalid_rows = sum_i::sum(storage.i, invalid);
  if (threadIdx.x == 0) {
    if (p.status != nullptr && invalid_rows > 0)
      atomicAdd(&p.status->invalid_targets, static_cast<unsigned long long>(invalid_rows));
    thread::loss_scalars s{};
    s.n_valid = n_valid;
    s.weight_valid = p.class_weight != nullptr ? weight_valid : static_cast<float>(n_valid);
    s.weight_sum = p.class_weight != nullptr ? weight_sum : static_cast<float>(p.v);
    const float upstream = p.grad != nullptr ? p.grad[0] : 1.0f;
    if (p.reduction == lce::reduction::none) {
      s.alpha = max_grad;
    } else {
      const thread::row_scales g = thread::row_grad_scales(
          upstream, n_valid > 0, s.weight_valid, static_cast<float>(n_valid), p.reduction);
      s.alpha = fabsf(g.ce) >= fabsf(g.z) ? g.ce : g.z;
    }
    s.zero = 0.0f;
    s.one = 1.0f;
    *p.out = s;
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
