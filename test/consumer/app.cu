// The program of the consumer projects: lce::forward and lce::backward instantiated, so that
// the consumer's build compiles lce's kernels for its architectures. It runs their size
// queries only (they launch nothing), so it needs no GPU.
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <lce/lce.cuh>

#ifdef EXPECTED_MAJOR
static_assert(LCE_VERSION_MAJOR == EXPECTED_MAJOR && LCE_VERSION_MINOR == EXPECTED_MINOR &&
                  LCE_VERSION_PATCH == EXPECTED_PATCH,
              "lce/version.hpp disagrees with the installed package version");
#endif

int main() {
  using bf16 = __nv_bfloat16;
  // Fake, aligned device addresses: a size query checks them but never dereferences them.
  auto fake = [](std::uintptr_t slot) { return (slot + 1) << 36; };
  const lce::problem shape{4096, 2048, 32000};

  lce::forward_args<bf16> fwd;
  fwd.x = reinterpret_cast<const bf16*>(fake(1));
  fwd.w = reinterpret_cast<const bf16*>(fake(2));
  fwd.targets = reinterpret_cast<const std::int64_t*>(fake(3));
  fwd.loss = reinterpret_cast<float*>(fake(4));
  fwd.lse = reinterpret_cast<float*>(fake(5));
  std::size_t forward_bytes = 0;
  if (lce::forward(nullptr, forward_bytes, fwd, shape) != cudaSuccess) {
    std::printf("forward size query failed: %s\n", lce::last_error_message());
    return 1;
  }

  lce::backward_args<bf16, float> bwd;
  bwd.x = fwd.x;
  bwd.w = fwd.w;
  bwd.targets = fwd.targets;
  bwd.lse = fwd.lse;
  bwd.dx = reinterpret_cast<bf16*>(fake(6));
  bwd.dw = reinterpret_cast<float*>(fake(7));
  // The size query needs a non-null handle but never uses it.
  const auto handle = reinterpret_cast<cublasHandle_t>(fake(8));
  std::size_t backward_bytes = 0;
  if (lce::backward(nullptr, backward_bytes, bwd, shape, {}, {}, handle) != cudaSuccess) {
    std::printf("backward size query failed: %s\n", lce::last_error_message());
    return 1;
  }

  std::printf("lce %s: forward workspace %zu B, backward workspace %zu B\n", LCE_VERSION_STRING,
              forward_bytes, backward_bytes);
  return forward_bytes > 0 && backward_bytes > 0 ? 0 : 1;
}
