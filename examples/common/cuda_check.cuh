/// @file cuda_check.cuh
/// @brief Helpers for the examples and benchmarks (never for the library, which does not
/// throw): a throwing check macro for CUDA, cuBLAS and lce calls, an owning device buffer,
/// CUDA-event timing with an L2 flush, and a device-memory probe.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <lce/status.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lce_example {

/// Throws std::runtime_error naming the call, its place and CUDA's reason; an lce function's
/// own explanation (lce::last_error_message()) is appended when it left one.
inline void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // a failed allocation also sets the last error: clear it
  std::string message = std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
                        cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
  if (const char* detail = lce::last_error_message(); detail[0] != '\0')
    message += std::string("; ") + detail;
  throw std::runtime_error(message);
}

inline void check(cublasStatus_t status, const char* what, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what +
                           ": cuBLAS status " + std::to_string(static_cast<int>(status)));
}

}  // namespace lce_example

/// Evaluates `expr` (a cudaError_t or cublasStatus_t) and throws std::runtime_error unless it
/// reports success.
#define LCE_EXAMPLE_CHECK(expr) ::lce_example::check((expr), #expr, __FILE__, __LINE__)

/// Checks the launch just made (configuration errors), without synchronizing.
#define LCE_EXAMPLE_CHECK_LAUNCH() LCE_EXAMPLE_CHECK(cudaPeekAtLastError())

namespace lce_example {

/// Why no CUDA device is usable (CUDA's error name and reason: a missing driver, a driver
/// older than the runtime, devices hidden by CUDA_VISIBLE_DEVICES, ...), or an empty string
/// when one is.
inline std::string cuda_device_problem() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
  }
  return count > 0 ? std::string() : std::string("the runtime reports 0 devices");
}

constexpr double mib(std::size_t bytes) noexcept { return static_cast<double>(bytes) / (1 << 20); }
constexpr double gib(std::size_t bytes) noexcept { return static_cast<double>(bytes) / (1 << 30); }

/// Free device memory in bytes, after the device has finished its queued work.
inline std::size_t free_device_bytes() {
  std::size_t free = 0;
  std::size_t total = 0;
  LCE_EXAMPLE_CHECK(cudaDeviceSynchronize());
  LCE_EXAMPLE_CHECK(cudaMemGetInfo(&free, &total));
  return free;
}

/// @brief Owning, move-only device allocation of `count` elements of T (cudaMalloc, so 256-byte
/// aligned as lce's workspace requires). Throws when the allocation fails.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t count) : count_(count) {
    if (count_ != 0) LCE_EXAMPLE_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes()));
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  device_buffer& operator=(device_buffer&& other) noexcept {
    if (this != &other) {
      release();
      ptr_ = std::exchange(other.ptr_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  ~device_buffer() { release(); }

  [[nodiscard]] T* data() noexcept { return ptr_; }
  [[nodiscard]] const T* data() const noexcept { return ptr_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return count_ * sizeof(T); }

  /// Copies element `index` to the host (synchronous).
  [[nodiscard]] T read(std::size_t index = 0) const {
    T value{};
    LCE_EXAMPLE_CHECK(cudaMemcpy(&value, ptr_ + index, sizeof(T), cudaMemcpyDeviceToHost));
    return value;
  }

 private:
  void release() noexcept {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// @brief An owned CUDA stream (blocking: it synchronizes with the legacy default stream).
class cuda_stream {
 public:
  cuda_stream() { LCE_EXAMPLE_CHECK(cudaStreamCreate(&stream_)); }
  cuda_stream(const cuda_stream&) = delete;
  cuda_stream& operator=(const cuda_stream&) = delete;
  ~cuda_stream() { (void)cudaStreamDestroy(stream_); }
  operator cudaStream_t() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// @brief An owned cuBLAS handle.
class cublas_handle {
 public:
  cublas_handle() { LCE_EXAMPLE_CHECK(cublasCreate(&handle_)); }
  cublas_handle(const cublas_handle&) = delete;
  cublas_handle& operator=(const cublas_handle&) = delete;
  ~cublas_handle() { (void)cublasDestroy(handle_); }
  operator cublasHandle_t() const noexcept { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

/// @brief A pair of CUDA events timing the work enqueued between start() and stop().
class event_timer {
 public:
  event_timer() {
    LCE_EXAMPLE_CHECK(cudaEventCreate(&start_));
    LCE_EXAMPLE_CHECK(cudaEventCreate(&stop_));
  }
  event_timer(const event_timer&) = delete;
  event_timer& operator=(const event_timer&) = delete;
  ~event_timer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  void start(cudaStream_t stream) { LCE_EXAMPLE_CHECK(cudaEventRecord(start_, stream)); }
  void stop(cudaStream_t stream) { LCE_EXAMPLE_CHECK(cudaEventRecord(stop_, stream)); }
  /// Milliseconds between the two events; waits for the stop event.
  [[nodiscard]] float elapsed_ms() {
    LCE_EXAMPLE_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.0f;
    LCE_EXAMPLE_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

/// @brief Evicts the L2 cache by writing a buffer twice its size, so that a timed run starts
/// cold, as it would inside a training step.
class l2_flusher {
 public:
  l2_flusher() {
    int device = 0;
    int l2_bytes = 0;
    LCE_EXAMPLE_CHECK(cudaGetDevice(&device));
    LCE_EXAMPLE_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    buffer_ = device_buffer<unsigned char>(2 * static_cast<std::size_t>(std::max(l2_bytes, 1)));
  }
  void flush(cudaStream_t stream) {
    value_ = (value_ + 1) & 0xFF;  // a different byte each time: nothing to skip or compress
    LCE_EXAMPLE_CHECK(cudaMemsetAsync(buffer_.data(), value_, buffer_.bytes(), stream));
  }
  [[nodiscard]] std::size_t bytes() const noexcept { return buffer_.bytes(); }

 private:
  device_buffer<unsigned char> buffer_;
  int value_ = 0;
};

/// Median of `samples` (the mean of the middle two for an even count); 0 when empty.
inline double median(std::vector<double> samples) {
  if (samples.empty()) return 0.0;
  std::sort(samples.begin(), samples.end());
  const std::size_t mid = samples.size() / 2;
  return samples.size() % 2 ? samples[mid] : 0.5 * (samples[mid - 1] + samples[mid]);
}

/// @brief Runs `work(stream)` `warmup` times, then `iters` times each after an L2 flush, each
/// timed by CUDA events; returns the milliseconds of the timed runs.
template <class Work>
std::vector<double> time_runs(Work&& work, int warmup, int iters, cudaStream_t stream,
                              l2_flusher& flusher) {
  for (int i = 0; i < warmup; ++i) work(stream);
  LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
  event_timer timer;
  std::vector<double> ms;
  ms.reserve(static_cast<std::size_t>(std::max(iters, 0)));
  for (int i = 0; i < iters; ++i) {
    flusher.flush(stream);
    timer.start(stream);
    work(stream);
    timer.stop(stream);
    ms.push_back(timer.elapsed_ms());
  }
  return ms;
}

/// @brief Device memory taken between begin() and end(), from cudaMemGetInfo. Nothing the
/// examples run frees memory midway, so the free memory at end() is the low-water mark and the
/// difference is the peak extra memory of what ran in between (allocations are counted in the
/// driver's granularity, 2 MiB pages).
class memory_probe {
 public:
  void begin() { before_ = free_device_bytes(); }
  void end() { after_ = free_device_bytes(); }
  [[nodiscard]] std::size_t used_bytes() const noexcept {
    return before_ > after_ ? before_ - after_ : 0;
  }

 private:
  std::size_t before_ = 0;
  std::size_t after_ = 0;
};

}  // namespace lce_example
