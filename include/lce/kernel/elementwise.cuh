/// @file elementwise.cuh
/// @brief Elementwise helper kernels of the backward: filling a vector, converting the fp32 dX
/// accumulator to the element type.
#pragma once

#include <cstdint>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class T>
__global__ void LCE_KERNEL_VISIBILITY fill_kernel(T* out, std::int64_t count, float value) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<T>(value);
}

/// out[r, c] (+)= s·in[r, c] for a (rows, cols) matrix; `in` dense fp32, `out` with row stride
/// ld; s = *scale (a device scalar), or 1 without one.
template <class Element>
__global__ void LCE_KERNEL_VISIBILITY convert_rows_kernel(const float* in, std::int64_t rows,
                                                          std::int64_t cols, Element* out,
                                                          std::int64_t ld, bool accumulate,
                                                          const float* scale = nullptr) {
  const std::int64_t total = rows * cols;
  const float s = scale != nullptr ? *scale : 1.0f;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / cols;
    Element& o = out[r * ld + (i - r * cols)];
    o = static_cast<Element>(fmaf(s, in[i], accumulate ? static_cast<float>(o) : 0.0f));
  }
}

}  // namespace kernel
LCE_NAMESPACE_END
