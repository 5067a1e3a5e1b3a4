/// @file device_data.cuh
/// @brief Random test inputs generated on the device: stddev·N(0, 1) from a hashed stream (the same
/// values for a seed whatever the launch), NaN bytes in the padding of strided inputs.
#pragma once

#include <cstdint>
#include <cstring>

#include "device_buffer.hpp"
#include "gpu_reference.cuh"

namespace lce_test {

// ---------------------------------------------------------------------------------------------
// Device-side random data.

namespace harness_detail {

__host__ __device__ inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Standard normal number `index` of the stream `seed` (Box–Muller on two hashed uniforms).
__device__ inline double hashed_normal(std::uint64_t seed, std::uint64_t index) {
  const std::uint64_t h1 = splitmix64(seed ^ splitmix64(2 * index));
  const std::uint64_t h2 = splitmix64(seed ^ splitmix64(2 * index + 1));
  const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
  const double u2 = static_cast<double>(h2 >> 11) * 0x1.0p-53;          // [0, 1)
  return sqrt(-2.0 * log(u1)) * cospi(2.0 * u2);
}

/// m[r, c] = stddev · N(0, 1) for c < cols; the padding columns c ∈ [cols, ld) get NaN bytes,
/// so that a kernel that lets padding into its arithmetic produces NaN.
template <class T>
__global__ void fill_normal_kernel(T* m, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                   double stddev, std::uint64_t seed) {
  const std::int64_t total = rows * ld;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = e / ld;
    const std::int64_t c = e - r * ld;
    if (c < cols) {
      m[e] = from_double<T>(stddev * hashed_normal(seed, static_cast<std::uint64_t>(r * cols + c)));
    } else {
      unsigned char* bytes = reinterpret_cast<unsigned char*>(m + e);
      for (std::size_t b = 0; b < sizeof(T); ++b) bytes[b] = 0xFF;
    }
  }
}

}  // namespace harness_detail

/// Fills a [rows, ld] device matrix with stddev·N(0, 1) in its first `cols` columns and NaN
/// bytes in the rest.
template <class T>
void fill_normal(T* d_m, std::int64_t rows, std::int64_t cols, std::int64_t ld, double stddev,
                 std::uint64_t seed) {
  if (rows * ld == 0) return;
  harness_detail::fill_normal_kernel<T>
      <<<gpu_ref::grid_for(rows * ld, 256), 256>>>(d_m, rows, cols, ld, stddev, seed);
  LCE_TEST_CUDA(cudaGetLastError());
  LCE_TEST_CUDA(cudaDeviceSynchronize());
}

}  // namespace lce_test
