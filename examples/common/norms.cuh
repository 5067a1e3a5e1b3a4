/// @file norms.cuh
/// @brief Frobenius norms and relative differences of device arrays, accumulated in fp64 on the
/// device (the gradients of a realistic shape hold ~10⁹ elements: too many to copy back).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cub/block/block_reduce.cuh>
#include <numeric>
#include <vector>

#include "cuda_check.cuh"

namespace lce_example {

namespace detail {

constexpr int norm_threads = 256;
constexpr int norm_blocks = 1024;

/// partials[block] = Σ (a − b)² over the block's grid-stride share (b may be null: Σ a²).
template <class A, class B>
__global__ void __launch_bounds__(norm_threads)
    squared_distance_kernel(const A* a, const B* b, std::size_t count, double* partials) {
  using reduce = cub::BlockReduce<double, norm_threads>;
  __shared__ typename reduce::TempStorage storage;
  double sum = 0.0;
  for (std::size_t e = blockIdx.x * std::size_t{norm_threads} + threadIdx.x; e < count;
       e += std::size_t{gridDim.x} * norm_threads) {
    const double diff = static_cast<double>(static_cast<float>(a[e])) -
                        (b != nullptr ? static_cast<double>(static_cast<float>(b[e])) : 0.0);
    sum += diff * diff;
  }
  sum = reduce(storage).Sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

template <class A, class B>
double squared_distance(const A* a, const B* b, std::size_t count) {
  device_buffer<double> partials(norm_blocks);
  squared_distance_kernel<<<norm_blocks, norm_threads>>>(a, b, count, partials.data());
  LCE_EXAMPLE_CHECK_LAUNCH();
  std::vector<double> host(norm_blocks);
  LCE_EXAMPLE_CHECK(cudaMemcpy(host.data(), partials.data(), norm_blocks * sizeof(double),
                               cudaMemcpyDeviceToHost));
  return std::accumulate(host.begin(), host.end(), 0.0);  // fixed order: deterministic
}

}  // namespace detail

/// ‖a‖_F of `count` device elements (float, __half or __nv_bfloat16); synchronous.
template <class A>
double frobenius_norm(const A* d_a, std::size_t count) {
  return std::sqrt(detail::squared_distance(d_a, static_cast<const A*>(nullptr), count));
}

/// ‖a − ref‖_F / ‖ref‖_F (the absolute difference when ref is 0); synchronous. NaN in either
/// array gives NaN.
template <class A, class R>
double relative_difference(const A* d_a, const R* d_ref, std::size_t count) {
  const double diff = std::sqrt(detail::squared_distance(d_a, d_ref, count));
  const double norm = frobenius_norm(d_ref, count);
  return norm > 0.0 ? diff / norm : diff;
}

}  // namespace lce_example
