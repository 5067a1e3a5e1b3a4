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
#include <vector>

namespace lce_test {

/// A distinct, 256-byte aligned fake device address; no test ever lets it reach a kernel.
/// Slots are 64 GiB apart, so that the buffers of any shape the tests use never overlap (the
/// launchers check that outputs overlap no input).
template <class T>
T* fake_pointer(std::uintptr_t slot) {
  return reinterpret_cast<T*>((slot + 1) << 36);
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

/// @brief A loss_options value that must be rejected, and the option the message must name.
/// The shape of the calls that use these has n = 300.
struct invalid_option {
  const char* argument;
  lce::loss_options options;
};

inline std::vector<invalid_option> invalid_loss_options() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<invalid_option> out;
  auto add = [&](const char* argument, auto mutate) {
    lce::loss_options o;
    mutate(o);
    out.push_back({argument, o});
  };
  for (const float alpha : {-0.1f, -1e-7f, 1.0001f, 2.0f, nan, inf, -inf}) {
    add("options.label_smoothing", [=](lce::loss_options& o) { o.label_smoothing = alpha; });
  }
  for (const float s : {-1e-4f, -1.0f, nan, inf, -inf}) {
    add("options.z_loss", [=](lce::loss_options& o) { o.z_loss = s; });
  }
  for (const float c : {-1.0f, -30.0f, -inf, nan}) {
    add("options.softcap", [=](lce::loss_options& o) { o.softcap = c; });
  }
  for (const float tau : {0.0f, -0.0f, -1.0f, nan, inf, -inf}) {
    add("options.temperature", [=](lce::loss_options& o) { o.temperature = tau; });
  }
  for (const std::int64_t seq_len : {std::int64_t{-1}, std::int64_t{-300}, std::int64_t{7},
                                     std::int64_t{301}, std::int64_t{600}, std::int64_t{1} << 40}) {
    add("options.shift_seq_len", [=](lce::loss_options& o) { o.shift_seq_len = seq_len; });
  }
  for (const float eps : {-1e-6f, -1.0f, 1.0f, 2.0f, nan, inf, -inf}) {
    add("options.filter_eps", [=](lce::loss_options& o) { o.filter_eps = eps; });
  }
  // With the other options valid and set: still the bad one is named.
  add("options.temperature", [](lce::loss_options& o) {
    o.label_smoothing = 0.1f;
    o.z_loss = 1e-4f;
    o.softcap = 30.0f;
    o.temperature = 0.0f;
  });
  add("options.shift_seq_len", [](lce::loss_options& o) {
    o.label_smoothing = 0.1f;
    o.reduction = lce::reduction::sum;
    o.shift_seq_len = 299;
  });
  return out;
}

/// @brief loss_options values that must be accepted for n = 300 (boundaries included).
inline std::vector<lce::loss_options> valid_loss_options() {
  std::vector<lce::loss_options> out;
  auto add = [&](auto mutate) {
    lce::loss_options o;
    mutate(o);
    out.push_back(o);
  };
  add([](lce::loss_options&) {});
  for (const float alpha : {0.0f, 1e-6f, 0.1f, 1.0f}) {
    add([=](lce::loss_options& o) { o.label_smoothing = alpha; });
  }
  for (const float s : {0.0f, 1e-4f, 10.0f}) add([=](lce::loss_options& o) { o.z_loss = s; });
  for (const float c : {0.0f, 1e-3f, 30.0f}) add([=](lce::loss_options& o) { o.softcap = c; });
  for (const float tau : {1e-3f, 0.5f, 1.0f, 100.0f}) {
    add([=](lce::loss_options& o) { o.temperature = tau; });
  }
  for (const std::int64_t seq_len : {0, 1, 2, 3, 100, 150, 300}) {
    add([=](lce::loss_options& o) { o.shift_seq_len = seq_len; });
  }
  add([](lce::loss_options& o) { o.accumulate = true; });
  for (const float eps : {0.0f, 0x1p-12f, 0.5f, 0.999f}) {
    add([=](lce::loss_options& o) { o.filter_eps = eps; });
  }
  add([](lce::loss_options& o) {
    o.label_smoothing = 0.1f;
    o.z_loss = 1e-4f;
    o.softcap = 30.0f;
    o.temperature = 0.7f;
    o.shift_seq_len = 50;
    o.accumulate = true;
    o.reduction = lce::reduction::none;
    o.ignore_index = 3;
  });
  return out;
}

/// A short description of loss options for CAPTURE.
inline std::string describe(const lce::loss_options& o) {
  return "label_smoothing=" + std::to_string(o.label_smoothing) +
         " z_loss=" + std::to_string(o.z_loss) + " softcap=" + std::to_string(o.softcap) +
         " temperature=" + std::to_string(o.temperature) +
         " shift_seq_len=" + std::to_string(o.shift_seq_len) +
         " accumulate=" + std::to_string(o.accumulate) +
         " reduction=" + std::to_string(static_cast<int>(o.reduction));
}

inline const char* strategy_name(lce::backward_strategy s) { return lce::to_string(s); }

}  // namespace lce_test
