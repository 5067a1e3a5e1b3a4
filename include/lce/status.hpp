/// @file status.hpp
/// @brief Error reporting: every host function returns `cudaError_t`; the reason for an
/// argument error is kept, per host thread, in `lce::last_error_message()`. Data errors that
/// only the device can see (targets outside the vocabulary) are counted in a caller-owned
/// `lce::device_status`, read whenever the caller chooses (docs/robustness.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>

#include "version.hpp"

LCE_NAMESPACE_BEGIN

namespace detail {
/// Per-thread message buffer; inline function-local storage keeps the library header-only.
inline char* error_buffer() noexcept {
  thread_local char buffer[256] = {0};
  return buffer;
}
}  // namespace detail

/// @brief The message of the most recent error an lce host function reported on this thread.
/// @return A NUL-terminated string, empty when the last call succeeded.
[[nodiscard]] inline const char* last_error_message() noexcept { return detail::error_buffer(); }

namespace detail {
inline void clear_error() noexcept { error_buffer()[0] = '\0'; }

/// Records `message` and returns `code`, so that a check reads `return fail(...)`.
inline cudaError_t fail(cudaError_t code, const char* message) noexcept {
  std::snprintf(error_buffer(), 256, "lce: %s", message);
  return code;
}

inline cudaError_t invalid(const char* message) noexcept {
  return fail(cudaErrorInvalidValue, message);
}

/// Records the CUDA error string of a failed runtime call or launch.
inline cudaError_t cuda_failure(cudaError_t code, const char* where) noexcept {
  std::snprintf(error_buffer(), 256, "lce: %s: %s", where, cudaGetErrorString(code));
  return code;
}
}  // namespace detail

/// @brief Counters of data errors, in device memory, that the launchers add to when
/// `args.status` points at one. The caller zeroes it (lce::clear_status, or any memset), lets
/// any number of lce calls add to it, copies it to the host whenever it chooses and passes the
/// copy to lce::check_status. Launchers never read it back, so they stay free of host
/// synchronization and capturable; the counts are exact and deterministic (integer atomics).
struct device_status {
  /// Rows whose target (after the causal shift) is not `ignore_index` and lies outside [0, v):
  /// each such row is treated as ignored (no loss, no gradient, not in the mean's
  /// denominator), counted once per call.
  unsigned long long invalid_targets;
  unsigned long long reserved[3];  ///< zero; room for future counters
};

/// @brief Enqueues the zeroing of `*d_status` on `stream` (a memset: capturable).
[[nodiscard]] inline cudaError_t clear_status(device_status* d_status,
                                              cudaStream_t stream = nullptr) noexcept {
  detail::clear_error();
  if (d_status == nullptr) return detail::invalid("d_status must not be null");
  const cudaError_t code = cudaMemsetAsync(d_status, 0, sizeof(device_status), stream);
  return code == cudaSuccess ? code : detail::cuda_failure(code, "clear_status");
}

/// @brief Turns a host copy of a device_status into an error.
/// @return cudaSuccess (and an empty last_error_message()) when every counter is zero;
///         cudaErrorInvalidValue with a message that gives the count otherwise.
[[nodiscard]] inline cudaError_t check_status(const device_status& status) noexcept {
  detail::clear_error();
  if (status.invalid_targets == 0) return cudaSuccess;
  std::snprintf(detail::error_buffer(), 256,
                "lce: %llu rows have a target outside [0, v) that is not ignore_index (they "
                "were treated as ignored)",
                status.invalid_targets);
  return cudaErrorInvalidValue;
}

LCE_NAMESPACE_END

/// Returns from the enclosing function when `expr` (a cudaError_t) is not cudaSuccess.
#define LCE_RETURN_IF_ERROR(expr)                               \
  do {                                                          \
    const cudaError_t lce_status_ = (expr);                     \
    if (lce_status_ != cudaSuccess) {                           \
      if (::lce::last_error_message()[0] == '\0')               \
        return ::lce::detail::cuda_failure(lce_status_, #expr); \
      return lce_status_;                                       \
    }                                                           \
  } while (0)

/// Checks a kernel launch without synchronizing. With LCE_DEBUG_SYNC defined, it also
/// synchronizes the device so that an asynchronous fault is attributed to its launch (CUB's
/// debug-sync idea); never define it in production or under stream capture.
#ifdef LCE_DEBUG_SYNC
#define LCE_CHECK_LAUNCH(name)                                                             \
  do {                                                                                     \
    cudaError_t lce_launch_ = cudaPeekAtLastError();                                       \
    if (lce_launch_ == cudaSuccess) lce_launch_ = cudaDeviceSynchronize();                 \
    if (lce_launch_ != cudaSuccess) return ::lce::detail::cuda_failure(lce_launch_, name); \
  } while (0)
#else
#define LCE_CHECK_LAUNCH(name)                                                             \
  do {                                                                                     \
    const cudaError_t lce_launch_ = cudaPeekAtLastError();                                 \
    if (lce_launch_ != cudaSuccess) return ::lce::detail::cuda_failure(lce_launch_, name); \
  } while (0)
#endif
