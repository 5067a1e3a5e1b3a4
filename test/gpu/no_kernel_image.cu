// Built for sm_80 SASS only (CUDA_ARCHITECTURES 80-real: no PTX to JIT): a device of another
// major architecture (H100/H200, Blackwell) has no kernel image for lce here, and lce::forward
// must say so, naming the fix, before it launches anything. An 8.x device runs the sm_80 code.
#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <lce/forward.cuh>
#include <string>
#include <vector>

#include "support/device_buffer.hpp"

using lce_test::device_buffer;

TEST_CASE("forward on a device this binary has no kernel image for names the fix", "[gpu][arch]") {
  int device = 0, major = 0, minor = 0;
  LCE_TEST_CUDA(cudaGetDevice(&device));
  LCE_TEST_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  LCE_TEST_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));

  const lce::problem shape{64, 32, 100};
  std::vector<std::int64_t> targets(static_cast<std::size_t>(shape.n));
  for (std::size_t i = 0; i < targets.size(); ++i) targets[i] = static_cast<std::int64_t>(i % 100);
  device_buffer<float> x(static_cast<std::size_t>(shape.n * shape.d));
  device_buffer<float> w(static_cast<std::size_t>(shape.v * shape.d));
  LCE_TEST_CUDA(cudaMemset(x.data(), 0, x.size() * sizeof(float)));
  LCE_TEST_CUDA(cudaMemset(w.data(), 0, w.size() * sizeof(float)));
  device_buffer<std::int64_t> y(targets);
  device_buffer<float> loss(1);
  lce::forward_args<float> args;
  args.x = x.data();
  args.w = w.data();
  args.targets = y.data();
  args.loss = loss.data();

  std::size_t bytes = 0;
  REQUIRE(lce::forward<float>(nullptr, bytes, args, shape) == cudaSuccess);
  device_buffer<unsigned char> workspace(bytes);

  // Twice: a failure is not cached, and the second call says the same.
  for (int call = 0; call < 2; ++call) {
    CAPTURE(call, major, minor);
    const cudaError_t status = lce::forward<float>(workspace.data(), bytes, args, shape);
    const std::string message = lce::last_error_message();
    CAPTURE(message);
    if (major == 8) {
      WARN("compute capability 8.x runs sm_80 code: checked that the forward succeeds");
      CHECK(status == cudaSuccess);
      CHECK(message.empty());
    } else {
      CHECK(status == cudaErrorNoKernelImageForDevice);
      const std::string capability =
          "compute capability " + std::to_string(major) + "." + std::to_string(minor);
      CHECK(message.rfind("lce: this binary has no kernel image for device ", 0) == 0);
      CHECK(message.find(capability) != std::string::npos);
      CHECK(message.find("CUDA_ARCHITECTURES") != std::string::npos);
    }
    // The probe's failure is not left behind for the caller's next cudaGetLastError.
    CHECK(cudaGetLastError() == cudaSuccess);
  }
  LCE_TEST_CUDA(cudaDeviceSynchronize());
}
