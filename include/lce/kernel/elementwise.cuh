/// @file elementwise.cuh
/// @brief Small helper kernels of the backward: counting valid rows, filling a vector,
/// converting the fp32 dX accumulator to the element type.
#pragma once

#include <cstdint>

#include <cub/block/block_reduce.cuh>

#include "../block/reduce.cuh"
#include "../thread/online_lse.cuh"
#include "../thread/cross_entropy.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// Scalars of the backward, computed on the device so that nothing is read back.
struct grad_scalars {
  long long n_valid;  ///< rows whose target is not ignore_index
  /// alpha = max over valid rows of |g_i| (mean: upstream/n_valid, sum: upstream, none:
  /// max |grad_i|); dZ is stored as g_i/alpha·(p − onehot) and the GEMMs multiply by alpha, so
  /// 16-bit dZ keeps its precision even when g_i is tiny (fp16 with a mean over many rows).
  float alpha;
  float zero;  ///< 0, the beta of an overwriting GEMM (cuBLAS device pointer mode)
  float one;   ///< 1, the beta of an accumulating GEMM
};

struct nan_max_op {
  __device__ float operator()(float a, float b) const noexcept { return thread::nan_max(a, b); }
};

/// One block: fills grad_scalars from the targets and the upstream gradient.
template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    grad_scalars_kernel(const std::int64_t* targets, std::int64_t n, std::int64_t ignore_index,
                        const float* grad, lce::reduction reduction, grad_scalars* out) {
  using sum_i = block::sum_reduce<long long, Threads>;
  using max_f = cub::BlockReduce<float, Threads>;
  __shared__ union {
    typename sum_i::temp_storage i;
    typename max_f::TempStorage f;
  } storage;
  long long count = 0;
  float largest = 0.0f;
  for (std::int64_t i = threadIdx.x; i < n; i += Threads) {
    const bool valid = thread::is_valid_target(targets[i], ignore_index);
    count += valid ? 1 : 0;
    if (valid && reduction == lce::reduction::none)
      largest = thread::nan_max(largest, grad != nullptr ? fabsf(grad[i]) : 1.0f);
  }
  const long long n_valid = sum_i::sum(storage.i, count);
  __syncthreads();  // the temp storage is reused
  const float max_grad = max_f(storage.f).Reduce(largest, nan_max_op{});
  if (threadIdx.x == 0) {
    const float upstream = grad != nullptr ? grad[0] : 1.0f;
    float alpha = max_grad;
    if (reduction != lce::reduction::none)
      alpha = thread::row_grad_scale(upstream, n_valid > 0, n_valid, reduction);
    *out = {n_valid, alpha, 0.0f, 1.0f};
  }
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
