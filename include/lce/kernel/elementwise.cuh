/// @file elementwise.cuh
/// @brief Small helper kernels of the backward: counting valid rows, filling a vector,
/// converting the fp32 dX accumulator to the element type.
#pragma once

#include <cstdint>

#include "../block/reduce.cuh"
#include "../thread/cross_entropy.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// One block: *n_valid = number of targets different from ignore_index.
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    count_valid_kernel(const std::int64_t* targets, std::int64_t n, std::int64_t ignore_index,
                       long long* n_valid) {
  using sum_i = block::sum_reduce<long long, Threads>;
  __shared__ typename sum_i::temp_storage storage;
  long long count = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += Threads)
    count += thread::is_valid_target(targets[i], ignore_index) ? 1 : 0;
  const long long total = sum_i::sum(storage, count);
  if (threadIdx.x == 0) *n_valid = total;
}

template <class T>
__global__ void LCE_KERNEL_VISIBILITY fill_kernel(T* out, std::int64_t count, float value) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<T>(value);
}

/// out[r, c] = in[r, c] for a (rows, cols) matrix; `in` dense fp32, `out` with row stride ld.
template <class Element>
__global__ void LCE_KERNEL_VISIBILITY convert_rows_kernel(const float* in, std::int64_t rows,
                                                          std::int64_t cols, Element* out,
                                                          std::int64_t ld) {
  const std::int64_t total = rows * cols;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / cols;
    out[r * ld + (i - r * cols)] = static_cast<Element>(in[i]);
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
