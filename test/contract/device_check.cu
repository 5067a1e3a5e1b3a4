// CPU contract tests of the launchers' device check (detail/device_check.hpp): the verdict on
// each device the runtime could report, and a launch on a machine without a device.
#include <cuda_runtime_api.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <lce/detail/device_check.hpp>
#include <string>

namespace {

struct verdict_case {
  lce::detail::device_support support;
  cudaError_t expected;
  const char* fragments[3];  // each must appear in the message (null: none)
};

}  // namespace

TEST_CASE("device check: the verdict names the device, its capability and the fix",
          "[contract][device_check]") {
  const verdict_case cases[] = {
      {{0, 8, 0, cudaSuccess}, cudaSuccess, {}},
      {{1, 9, 0, cudaSuccess}, cudaSuccess, {}},
      {{0, 12, 0, cudaSuccess}, cudaSuccess, {}},
      {{0, 7, 5, cudaSuccess}, cudaErrorInvalidDevice, {"compute capability 7.5", "8.0 (sm_80)"}},
      // Below 8.0 the capability is the reason, whatever the image.
      {{2, 6, 1, cudaErrorNoKernelImageForDevice},
       cudaErrorInvalidDevice,
       {"device 2", "compute capability 6.1", "8.0 (sm_80)"}},
      {{0, 9, 0, cudaErrorNoKernelImageForDevice},
       cudaErrorNoKernelImageForDevice,
       {"no kernel image for device 0", "-arch=sm_90a", "90a in CUDA_ARCHITECTURES"}},
      {{3, 10, 0, cudaErrorInvalidDeviceFunction},
       cudaErrorNoKernelImageForDevice,
       {"device 3 (compute capability 10.0)", "-arch=sm_100,", "100 in CUDA_ARCHITECTURES"}},
      {{0, 8, 6, cudaErrorNoKernelImageForDevice},
       cudaErrorNoKernelImageForDevice,
       {"-arch=sm_86,", "86 in CUDA_ARCHITECTURES"}},
      // Any other failure of the probe is passed on with CUDA's reason.
      {{0, 9, 0, cudaErrorInitializationError},
       cudaErrorInitializationError,
       {"cudaFuncGetAttributes", nullptr, nullptr}},
  };
  for (const verdict_case& tc : cases) {
    lce::detail::clear_error();
    const cudaError_t status = lce::detail::device_support_error(tc.support);
    const std::string message = lce::last_error_message();
    CAPTURE(tc.support.device, tc.support.major, tc.support.minor,
            static_cast<int>(tc.support.image), message);
    CHECK(status == tc.expected);
    if (tc.expected == cudaSuccess) {
      CHECK(message.empty());
      continue;
    }
    CHECK(message.rfind("lce: ", 0) == 0);
    for (const char* fragment : tc.fragments)
      if (fragment != nullptr) CHECK(message.find(fragment) != std::string::npos);
  }
}

TEST_CASE("device check: without a usable device it fails with CUDA's reason",
          "[contract][device_check]") {
  int devices = 0;
  const cudaError_t count = cudaGetDeviceCount(&devices);
  (void)cudaGetLastError();
  if (count == cudaSuccess && devices > 0) {
    WARN("a CUDA device is present: the no-device case is not exercised here");
    return;
  }
  std::atomic<std::uint64_t> verified{0};
  lce::detail::clear_error();
  const cudaError_t status = lce::detail::check_device(nullptr, verified);
  const std::string message = lce::last_error_message();
  CAPTURE(message);
  CHECK(status != cudaSuccess);
  CHECK(message.rfind("lce: cuda", 0) == 0);  // the runtime call that failed, and why
  CHECK(verified.load() == 0);
}
