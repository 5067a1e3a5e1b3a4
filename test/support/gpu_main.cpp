// Catch2 main of the GPU tests: without a CUDA device (without LCE_TEST_MIN_DEVICES of them, for
// the multi-GPU tests) the whole executable reports "skipped" through the exit code 77 (ctest
// SKIP_RETURN_CODE), never "passed".
#define CATCH_CONFIG_RUNNER
#ifndef LCE_TEST_MIN_DEVICES
#define LCE_TEST_MIN_DEVICES 1
#endif
#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>

int main(int argc, char* argv[]) {
  // Listing the tests needs no device.
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--list", 6) == 0) return Catch::Session().run(argc, argv);
  }
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped (%s)\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 77;
  }
  if (devices < LCE_TEST_MIN_DEVICES) {
    std::printf("%d CUDA device(s), this test needs %d: skipped\n", devices, LCE_TEST_MIN_DEVICES);
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    std::printf("device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  }
  return Catch::Session().run(argc, argv);
}
