/// @file status.hpp
/// @brief Error reporting: every host function returns `cudaError_t`; the reason for an
/// argument error is kept, per host thread, in `lce::last_error_message()`.
#pragma once

#include <cuda_runtime_api.h>

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

LCE_NAMESPACE_END

/// Returns from the enclosing function when `expr` (a cudaError_t) is not cudaSuccess.
#define LCE_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                               \
    const cudaError_t lce_status_ = (expr);                                          \
    if (lce_status_ != cudaSuccess) {                                                \
      if (::lce::last_error_message()[0] == '\0')                                    \
        return ::lce::detail::cuda_failure(lce_status_, #expr);                      \
      return lce_status_;                                                            \
    }                                                                                \
  } while (0)

/// Checks a kernel launch without synchronizing. With LCE_DEBUG_SYNC defined, it also
/// synchronizes the device so that an asynchronous fault is attributed to its launch (CUB's
/// debug-sync idea); never define it in production or under stream capture.
#ifdef LCE_DEBUG_SYNC
#define LCE_CHECK_LAUNCH(name)                                                                 \
  do {                                                                                         \
    cudaError_t lce_launch_ = cudaPeekAtLastError();                                           \
    if (lce_launch_ == cudaSuccess) lce_launch_ = cudaDeviceSynchronize();                     \
    if (lce_launch_ != cudaSuccess) return ::lce::detail::cuda_failure(lce_launch_, name);     \
  } while (0)
#else
#define LCE_CHECK_LAUNCH(name)                                                             \
  do {                                                                                     \
    const cudaError_t lce_launch_ = cudaPeekAtLastError();                                 \
    if (lce_launch_ != cudaSuccess) return ::lce::detail::cuda_failure(lce_launch_, name); \
  } while (0)
#endif
