/// @file common.hpp
/// @brief Helpers of the CPU contract tests: fake device pointers (never dereferenced: every
/// call under test must return before launching anything) and the invalid-argument check.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <lce/lce.cuh>
#include <limits>
#include <string>

namespace lce_test {

/// A distinct, 256-byte aligned fake device address; no test ever lets it reach a kernel.
template <class T>
T* fake_pointer(std::uintptr_t slot) {
  return reinterpret_cast<T*>((slot + 1) << 20);
}

/// A non-null workspace pointer that is never dereferenced.
inline void* fake_workspace() { return fake_pointer<void>(64); }

/// A non-null cuBLAS handle that must never be used by a call that launches nothing.
inline cublasHandle_t fake_handle() { return fake_pointer<cublasContext>(65); }

inline constexpr std::size_t unlimited_bytes = std::numeric_limits<std::size_t>::max();

/// Checks that `status` is cudaErrorInvalidValue and that lce::last_error_message() names
/// `argument`.
inline void check_invalid(cudaError_t status, const std::string& argument) {
  const std::string message = lce::last_error_message();
  CAPTURE(argument, message);
  CHECK(status == cudaErrorInvalidValue);
  CHECK(message.find(argument) != std::string::npos);
  CHECK(message.rfind("lce:", 0) == 0);
}

/// Checks success and an empty error message.
inline void check_success(cudaError_t status) {
  const std::string message = lce::last_error_message();
  CAPTURE(message);
  CHECK(status == cudaSuccess);
  CHECK(message.empty());
}

inline const char* strategy_name(lce::backward_strategy s) {
  switch (s) {
    case lce::backward_strategy::automatic:
      return "automatic";
    case lce::backward_strategy::vocab_chunked:
      return "vocab_chunked";
    case lce::backward_strategy::row_chunked:
      return "row_chunked";
  }
  return "?";
}

}  // namespace lce_test
