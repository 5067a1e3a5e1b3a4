/// @file sm80.cuh
/// @brief Ampere (sm_80) primitives of the mma.sync mainloop (block/tile_loader.cuh,
/// block/tile_matmul.cuh): the asynchronous global-to-shared copy (cp.async) and its groups.
#pragma once

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace arch::sm80 {

/// @brief Copies 16 bytes from global to shared memory asynchronously (cp.async, L2 only).
__device__ inline void cp_async_16(void* smem, const void* gmem) noexcept {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

/// @brief Waits until at most `Pending` committed cp.async groups of this thread are in flight.
template <int Pending>
__device__ inline void cp_async_wait() noexcept {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}
/// @brief Commits this thread's cp.async copies issued so far as one group.
__device__ inline void cp_async_commit() noexcept { asm volatile("cp.async.commit_group;\n" ::); }

}  // namespace arch::sm80
LCE_NAMESPACE_END
