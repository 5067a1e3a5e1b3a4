/// @file resources.cuh
/// @brief What a GPU test holds: a cuBLAS handle, a non-blocking stream and a growing workspace
/// (gpu_context), a captured CUDA graph, and LCE_TEST_REQUIRE_OK.
#pragma once

#include <cublas_v2.h>

#include <catch2/catch.hpp>
#include <functional>
#include <lce/lce.cuh>
#include <stdexcept>

#include "device_buffer.hpp"

namespace lce_test {

// ---------------------------------------------------------------------------------------------
// Resources.

/// A cuBLAS handle, a non-blocking stream (so that work on the legacy default stream is never
/// implicitly ordered with the library's) and a workspace that grows on demand.
class gpu_context {
 public:
  gpu_context() {
    if (cublasCreate(&handle_) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate");
    LCE_TEST_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  gpu_context(const gpu_context&) = delete;
  gpu_context& operator=(const gpu_context&) = delete;
  ~gpu_context() {
    (void)cudaStreamDestroy(stream_);
    (void)cublasDestroy(handle_);
  }
  [[nodiscard]] cublasHandle_t handle() const { return handle_; }
  [[nodiscard]] cudaStream_t stream() const { return stream_; }
  /// A workspace of at least `bytes` bytes (poisoned: the library must not rely on its
  /// contents).
  void* workspace(std::size_t bytes) {
    if (bytes > workspace_.size() || workspace_.empty()) {
      workspace_ = device_buffer<unsigned char>(bytes > 0 ? bytes : 1);
    }
    workspace_.poison();
    return workspace_.data();
  }
  void synchronize() const { LCE_TEST_CUDA(cudaStreamSynchronize(stream_)); }

 private:
  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  device_buffer<unsigned char> workspace_;
};

/// @brief A CUDA graph captured from a stream (global capture mode: any allocation or
/// synchronization inside the captured calls fails the capture) and its executable.
class captured_graph {
 public:
  /// Captures what `enqueue` puts on `stream`; `enqueue` returns the cudaError_t of the calls
  /// under test, reported by status() (the capture is always ended, even when they fail).
  template <class Enqueue>
  captured_graph(cudaStream_t stream, Enqueue&& enqueue) {
    LCE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    status_ = enqueue();
    message_ = lce::last_error_message();
    const cudaError_t end = cudaStreamEndCapture(stream, &graph_);
    if (status_ == cudaSuccess) status_ = end;
    if (status_ == cudaSuccess) status_ = cudaGraphInstantiate(&exec_, graph_, 0);
  }
  captured_graph(const captured_graph&) = delete;
  captured_graph& operator=(const captured_graph&) = delete;
  ~captured_graph() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
  }
  [[nodiscard]] cudaError_t status() const { return status_; }
  [[nodiscard]] const std::string& message() const { return message_; }
  [[nodiscard]] std::size_t nodes() const {
    std::size_t count = 0;
    if (graph_ != nullptr) LCE_TEST_CUDA(cudaGraphGetNodes(graph_, nullptr, &count));
    return count;
  }
  void launch(cudaStream_t stream) const {
    LCE_TEST_CUDA(cudaGraphLaunch(exec_, stream));
    LCE_TEST_CUDA(cudaStreamSynchronize(stream));
  }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  cudaError_t status_ = cudaSuccess;
  std::string message_;
};

/// Requires an lce call to succeed, printing the library's message otherwise.
#define LCE_TEST_REQUIRE_OK(expr)                 \
  do {                                            \
    const cudaError_t lce_test_status_ = (expr);  \
    INFO("lce: " << ::lce::last_error_message()); \
    REQUIRE(lce_test_status_ == cudaSuccess);     \
  } while (0)

}  // namespace lce_test
