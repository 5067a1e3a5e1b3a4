/// @file cublas.cuh
/// @brief The GEMMs of the chunked backward, through cublasGemmEx with fp32 accumulation.
/// fp32 inputs use CUBLAS_COMPUTE_32F_PEDANTIC so that no TF32 sneaks in whatever the handle's
/// math mode. The caller's handle is left as it was found (stream and pointer mode restored).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "../status.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

template <class T>
constexpr cudaDataType_t cuda_data_type() noexcept {
  if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, __half>)
    return CUDA_R_16F;
  else
    return CUDA_R_16BF;
}

inline cudaError_t cublas_failure(cublasStatus_t status, const char* what) noexcept {
  std::snprintf(error_buffer(), 256, "lce: cuBLAS %s failed with status %d", what,
                static_cast<int>(status));
  return cudaErrorUnknown;
}

/// Sets the handle's stream and device pointer mode (alpha and beta live in the workspace)
/// for the lifetime of the scope, then restores what the caller had.
class cublas_scope {
 public:
  cublas_scope(cublasHandle_t handle, cudaStream_t stream) noexcept : handle_(handle) {
    status_ = cublasGetStream(handle_, &saved_stream_);
    if (status_ == CUBLAS_STATUS_SUCCESS) status_ = cublasGetPointerMode(handle_, &saved_mode_);
    // cublasSetStream also drops a workspace set with cublasSetWorkspace (PyTorch sets one):
    // only call it when the stream really changes.
    if (status_ == CUBLAS_STATUS_SUCCESS && saved_stream_ != stream) {
      status_ = cublasSetStream(handle_, stream);
      stream_changed_ = true;
    }
    if (status_ == CUBLAS_STATUS_SUCCESS)
      status_ = cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_DEVICE);
  }
  ~cublas_scope() {
    if (status_ == CUBLAS_STATUS_SUCCESS) {
      if (stream_changed_) (void)cublasSetStream(handle_, saved_stream_);
      (void)cublasSetPointerMode(handle_, saved_mode_);
    }
  }
  cublas_scope(const cublas_scope&) = delete;
  cublas_scope& operator=(const cublas_scope&) = delete;
  [[nodiscard]] cublasStatus_t status() const noexcept { return status_; }

 private:
  cublasHandle_t handle_;
  cudaStream_t saved_stream_ = nullptr;
  cublasPointerMode_t saved_mode_ = CUBLAS_POINTER_MODE_HOST;
  bool stream_changed_ = false;
  cublasStatus_t status_;
};

/// Column-major C[m, n] = alpha·op(A)·op(B) + beta·C, with op(A) [m, k] and op(B) [k, n];
/// alpha and beta are device pointers (host ones under gemm_host_scalars's pointer mode). `AB` is
/// the type of A and B, `C` the type of C; accumulation is fp32.
template <class AB, class C>
cudaError_t gemm(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b,
                 std::int64_t m, std::int64_t n, std::int64_t k, const float* alpha, const AB* a,
                 std::int64_t lda, const AB* b, std::int64_t ldb, const float* beta, C* c,
                 std::int64_t ldc) noexcept {
  const cublasComputeType_t compute =
      std::is_same_v<AB, float> ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
  const cublasStatus_t status = cublasGemmEx(
      handle, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
      cuda_data_type<AB>(), static_cast<int>(lda), b, cuda_data_type<AB>(), static_cast<int>(ldb),
      beta, c, cuda_data_type<C>(), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT);
  return status == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cublas_failure(status, "GEMM");
}

/// gemm with alpha and beta from the host, for a GEMM whose scale its caller applies elsewhere:
/// cuBLAS then knows beta (0 or 1) when it picks the kernel, where from the device it takes one
/// that reads beta. The handle is in device pointer mode around it (cublas_scope) and is left so.
template <class AB, class C>
cudaError_t gemm_host_scalars(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b,
                              std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                              const AB* a, std::int64_t lda, const AB* b, std::int64_t ldb,
                              float beta, C* c, std::int64_t ldc) noexcept {
  cublasStatus_t status = cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST);
  if (status != CUBLAS_STATUS_SUCCESS) return cublas_failure(status, "pointer mode");
  const cudaError_t result =
      gemm(handle, op_a, op_b, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc);
  status = cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_DEVICE);
  if (result != cudaSuccess) return result;
  return status == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cublas_failure(status, "pointer mode");
}

}  // namespace detail
LCE_NAMESPACE_END
