/// @file device_buffer.hpp
/// @brief Test utilities: a throwing RAII device buffer with NaN poisoning, element conversions
/// to and from double, seeded random generators and error metrics. Tests only: this file
/// throws, the library never does.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __CUDACC__
#define LCE_TEST_HD __host__ __device__
#else
#define LCE_TEST_HD
#endif

namespace lce_test {

/// Throws std::runtime_error naming the failed call when `status` is not cudaSuccess.
inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
                             cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
}

#define LCE_TEST_CUDA(expr) ::lce_test::check_cuda((expr), #expr, __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------------
// Element conversions (host and device).

LCE_TEST_HD inline double to_double(double x) { return x; }
LCE_TEST_HD inline double to_double(float x) { return static_cast<double>(x); }
LCE_TEST_HD inline double to_double(__half x) { return static_cast<double>(__half2float(x)); }
LCE_TEST_HD inline double to_double(__nv_bfloat16 x) {
  return static_cast<double>(__bfloat162float(x));
}

/// Rounds a double to `T` (through float for the 16-bit types: the double rounding it implies is
/// irrelevant for test data, which the tests only ever use after this rounding).
template <class T>
LCE_TEST_HD inline T from_double(double x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

/// Short name of an element type for messages and RESULT lines.
template <class T>
constexpr const char* element_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "fp32";
  } else if constexpr (std::is_same_v<T, __half>) {
    return "fp16";
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return "bf16";
  } else if constexpr (std::is_same_v<T, double>) {
    return "fp64";
  } else {
    return "?";
  }
}

// ---------------------------------------------------------------------------------------------
// Device buffer.

/// @brief Owning, move-only device allocation of `count` elements of T. Every call that fails
/// throws. Helpers synchronize the device, so that their effect is visible to any stream.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t count) : count_(count) {
    if (count_ != 0) LCE_TEST_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes()));
  }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) { upload(host); }
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
  [[nodiscard]] bool empty() const noexcept { return count_ == 0; }

  /// Fills every byte with 0xFF: NaN for float, __half and __nv_bfloat16 (and -1 for integers),
  /// so that an output element the code under test never writes is detected.
  void poison() { fill_bytes(0xFF); }
  void zero() { fill_bytes(0x00); }
  void fill_bytes(int value) {
    if (count_ == 0) return;
    LCE_TEST_CUDA(cudaMemset(ptr_, value, bytes()));
    LCE_TEST_CUDA(cudaDeviceSynchronize());
  }

  void upload(const std::vector<T>& host) {
    if (host.size() != count_) throw std::invalid_argument("device_buffer::upload: size mismatch");
    if (count_ != 0) LCE_TEST_CUDA(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  [[nodiscard]] std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_ != 0) {
      LCE_TEST_CUDA(cudaDeviceSynchronize());
      LCE_TEST_CUDA(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    }
    return host;
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

/// Uploads host doubles converted (rounded) to T.
template <class T>
device_buffer<T> upload_as(const std::vector<double>& host) {
  std::vector<T> converted(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) converted[i] = from_double<T>(host[i]);
  return device_buffer<T>(converted);
}

/// Downloads and converts to double.
template <class T>
std::vector<double> download_as_double(const device_buffer<T>& buffer) {
  const std::vector<T> host = buffer.download();
  std::vector<double> out(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) out[i] = to_double(host[i]);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Random data. Every run draws a fresh seed; LCE_TEST_SEED=<n> in the environment replays one.

/// A fresh 64-bit seed from std::random_device, or the value of LCE_TEST_SEED when set.
inline std::uint64_t fresh_seed() {
  if (const char* fixed = std::getenv("LCE_TEST_SEED"); fixed != nullptr && *fixed != '\0') {
    return std::strtoull(fixed, nullptr, 0);
  }
  std::random_device device;
  return (static_cast<std::uint64_t>(device()) << 32) ^ static_cast<std::uint64_t>(device());
}

/// @brief Seeded generator with the draws the tests need.
class random_source {
 public:
  explicit random_source(std::uint64_t seed) : engine_(seed) {}

  double normal(double mean = 0.0, double stddev = 1.0) {
    return std::normal_distribution<double>(mean, stddev)(engine_);
  }
  double uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(engine_);
  }
  /// Uniform integer in [lo, hi].
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(engine_);
  }
  bool bernoulli(double p) { return std::bernoulli_distribution(p)(engine_); }
  std::vector<double> normals(std::size_t count, double stddev = 1.0) {
    std::vector<double> out(count);
    for (double& value : out) value = normal(0.0, stddev);
    return out;
  }
  std::vector<double> uniforms(std::size_t count, double lo, double hi) {
    std::vector<double> out(count);
    for (double& value : out) value = uniform(lo, hi);
    return out;
  }
  /// Targets in [0, v); each row is `ignore_index` with probability `ignore_fraction`. A target
  /// drawn equal to `ignore_index` (when that is a vocabulary id) is ignored too, as intended.
  std::vector<std::int64_t> targets(std::int64_t n, std::int64_t v, double ignore_fraction,
                                    std::int64_t ignore_index) {
    std::vector<std::int64_t> out(static_cast<std::size_t>(n));
    for (auto& y : out) y = bernoulli(ignore_fraction) ? ignore_index : integer(0, v - 1);
    return out;
  }
  std::mt19937_64& engine() noexcept { return engine_; }

 private:
  std::mt19937_64 engine_;
};

// ---------------------------------------------------------------------------------------------
// Error metrics, in double.

/// ‖a − ref‖_F / ‖ref‖_F; the absolute ‖a − ref‖_F when ref is all zeros. NaN in `a` gives NaN.
template <class A, class R>
double rel_frobenius(const std::vector<A>& a, const std::vector<R>& ref) {
  if (a.size() != ref.size()) throw std::invalid_argument("rel_frobenius: size mismatch");
  double err = 0.0;
  double norm = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double r = to_double(ref[i]);
    const double diff = to_double(a[i]) - r;
    err += diff * diff;
    norm += r * r;
  }
  return norm > 0.0 ? std::sqrt(err / norm) : std::sqrt(err);
}

/// max |a − ref|.
template <class A, class R>
double max_abs_diff(const std::vector<A>& a, const std::vector<R>& ref) {
  if (a.size() != ref.size()) throw std::invalid_argument("max_abs_diff: size mismatch");
  double out = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(to_double(a[i]) - to_double(ref[i]));
    if (!(diff <= out)) out = diff;  // keeps NaN
  }
  return out;
}

/// |a − ref| / |ref|; |a − ref| when ref is 0.
inline double rel_error(double a, double ref) {
  const double diff = std::fabs(a - ref);
  return ref != 0.0 ? diff / std::fabs(ref) : diff;
}

template <class T>
bool all_finite(const std::vector<T>& values) {
  for (const T& value : values) {
    if (!std::isfinite(to_double(value))) return false;
  }
  return true;
}

}  // namespace lce_test
