/// @file device_check.hpp
/// @brief Whether the current device can run this binary's lce kernels: compute capability
/// 8.0 or newer, and a kernel image for it (SASS for its architecture, or PTX it can JIT).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <cstdio>

#include "../status.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

/// What the runtime said about the current device and a probe kernel of this binary.
struct device_support {
  int device = 0;
  int major = 0;
  int minor = 0;
  /// cudaFuncGetAttributes on the probe kernel (not asked below compute capability 8.0).
  cudaError_t image = cudaSuccess;
};

/// @brief The verdict on `s`: cudaSuccess, or the error to return with a message that names
/// the fix. Pure (no runtime call), so that the CPU tests can check every verdict.
inline cudaError_t device_support_error(const device_support& s) noexcept {
  if (s.major < 8) {
    std::snprintf(error_buffer(), 256,
                  "lce: device %d has compute capability %d.%d; lce needs 8.0 (sm_80) or newer",
                  s.device, s.major, s.minor);
    return cudaErrorInvalidDevice;
  }
  if (s.image == cudaErrorNoKernelImageForDevice || s.image == cudaErrorInvalidDeviceFunction) {
    // 9.0 gets lce's fast kernels only from an sm_90a build; other architectures need no
    // suffix.
    const char* suffix = s.major == 9 && s.minor == 0 ? "a" : "";
    std::snprintf(error_buffer(), 256,
                  "lce: this binary has no kernel image for device %d (compute capability "
                  "%d.%d): build for it too, e.g. nvcc -arch=sm_%d%d%s, or %d%d%s in "
                  "CUDA_ARCHITECTURES",
                  s.device, s.major, s.minor, s.major, s.minor, suffix, s.major, s.minor, suffix);
    return cudaErrorNoKernelImageForDevice;
  }
  if (s.image != cudaSuccess) return cuda_failure(s.image, "cudaFuncGetAttributes");
  return cudaSuccess;
}

/// @brief Checks that the current device can run `probe` (any kernel of the calling
/// translation unit: nvcc builds all of a unit's kernels for the same architectures).
/// A device found able is remembered in `verified` (bit d: device d < 64), so that later calls
/// cost one cudaGetDevice; a failure is checked again each time.
/// @return cudaSuccess, or the error of device_support_error (or of a failed runtime call),
///         with last_error_message() set.
inline cudaError_t check_device(const void* probe, std::atomic<std::uint64_t>& verified) noexcept {
  device_support s;
  if (const cudaError_t e = cudaGetDevice(&s.device); e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_failure(e, "cudaGetDevice");
  }
  const std::uint64_t bit = s.device < 64 ? std::uint64_t{1} << s.device : 0;
  if ((verified.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  if (const cudaError_t e =
          cudaDeviceGetAttribute(&s.major, cudaDevAttrComputeCapabilityMajor, s.device);
      e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_failure(e, "cudaDeviceGetAttribute");
  }
  if (const cudaError_t e =
          cudaDeviceGetAttribute(&s.minor, cudaDevAttrComputeCapabilityMinor, s.device);
      e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_failure(e, "cudaDeviceGetAttribute");
  }
  if (s.major >= 8) {
    cudaFuncAttributes attributes{};
    s.image = cudaFuncGetAttributes(&attributes, probe);
    if (s.image != cudaSuccess) (void)cudaGetLastError();
  }
  const cudaError_t verdict = device_support_error(s);
  if (verdict == cudaSuccess) verified.fetch_or(bit, std::memory_order_relaxed);
  return verdict;
}

}  // namespace detail
LCE_NAMESPACE_END
