/// @file version.hpp
/// @brief Library version and the ABI-versioned namespace macros.
#pragma once

// Every lce header includes this one, so a translation unit compiled for a target below sm_80
// stops here with the fix, not deep inside the kernels (cp.async, bf16 tensor cores and
// __reduce_*_sync need sm_80; nvcc's and CMake's default target is older).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error \
    "lce needs compute capability 8.0 or newer: compile for sm_80 or newer (nvcc -arch=sm_80; in CMake, CUDA_ARCHITECTURES or CMAKE_CUDA_ARCHITECTURES 80;90a)"
#endif

#define LCE_VERSION_MAJOR 0
#define LCE_VERSION_MINOR 1
#define LCE_VERSION_PATCH 0
#define LCE_VERSION_STRING "0.1.0"

/// Every public entity lives in `lce::v0_1` (inline), so that two builds of different versions
/// linked into one program do not violate the one-definition rule (CUB does the same).
#define LCE_NAMESPACE_BEGIN \
  namespace lce {           \
  inline namespace v0_1 {
#define LCE_NAMESPACE_END \
  }                       \
  }

/// Kernels get hidden visibility so that two shared libraries built against different versions
/// of lce never resolve to each other's kernels.
#if defined(__GNUC__) || defined(__clang__)
#define LCE_KERNEL_VISIBILITY __attribute__((visibility("hidden")))
#else
#define LCE_KERNEL_VISIBILITY
#endif
