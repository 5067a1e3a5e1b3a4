/// @file reduce.cuh
/// @brief Block-wide reductions over caller-owned temp storage (cub::BlockReduce underneath).
#pragma once

#include <cub/block/block_reduce.cuh>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace block {

/// @brief Deterministic sum of one value per thread over a block of `Threads` threads.
/// @tparam T        value type
/// @tparam Threads  block size (one-dimensional)
template <class T, int Threads>
struct sum_reduce {
  using cub_reduce = cub::BlockReduce<T, Threads>;
  using temp_storage = typename cub_reduce::TempStorage;

  /// @return the sum, valid in thread 0 only.
  __device__ static T sum(temp_storage& storage, T value) { return cub_reduce(storage).Sum(value); }
};

}  // namespace block
LCE_NAMESPACE_END
