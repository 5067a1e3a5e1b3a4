/// @file shard.hpp
/// @brief Host-side description of one rank of a vocabulary-parallel loss (W sharded by
/// vocabulary rows across the ranks of an NCCL communicator), NCCL error reporting and the
/// checks of the communicator. Needs nccl.h; pulled in only by lce/nccl/ (CMake: lce::nccl).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <cstdio>

#include "../options.hpp"
#include "../status.hpp"

LCE_NAMESPACE_BEGIN
namespace nccl {

/// @brief How the backward combines the ranks' partial dX = Σ_{v in shard} dZ_v·W_v.
enum class dx_reduction : int {
  /// every rank receives the whole dX [n, d] (tensor parallelism without sequence parallelism)
  all_reduce = 0,
  /// rank r receives rows [r·n/k, (r+1)·n/k) of dX (Megatron's sequence parallelism, whose
  /// all-gathered X the head consumes); n must be a multiple of the number of ranks k
  reduce_scatter = 1,
};

/// @brief This rank's part of a vocabulary-parallel problem. Every rank holds the full X, the
/// targets (global ids) and the class weights, and rows [v_begin, v_end) of W, bias, dW, db.
/// The shards of the ranks must partition [0, shape.v) (uneven sizes allowed; lce cannot check
/// this without communicating).
struct vocab_shard {
  ncclComm_t comm = nullptr;  ///< the ranks that share the vocabulary, on the current device
  std::int64_t v_begin = 0;   ///< global id of this rank's first vocabulary row
  std::int64_t v_end = 0;     ///< one past its last (v_begin < v_end <= shape.v)
  dx_reduction dx = dx_reduction::all_reduce;  ///< backward only

  [[nodiscard]] constexpr std::int64_t rows() const noexcept { return v_end - v_begin; }
};

namespace impl {

/// The shard's own problem: its vocabulary rows, the caller's strides.
inline problem local_problem(const problem& global, const vocab_shard& s) noexcept {
  problem p = global;
  p.v = s.rows();
  return p;
}

/// Records a failed NCCL call (with NCCL's own last error for the communicator).
inline cudaError_t nccl_failure(ncclResult_t result, const char* what, ncclComm_t comm) noexcept {
  std::snprintf(detail::error_buffer(), 256, "lce: NCCL %s failed: %s (%s)", what,
                ncclGetErrorString(result), comm != nullptr ? ncclGetLastError(comm) : "");
  return cudaErrorUnknown;
}

/// ncclInProgress is the normal answer of a non-blocking communicator: the operation is
/// enqueued, and its errors surface through ncclCommGetAsyncError (the caller's to poll).
inline bool nccl_ok(ncclResult_t result) noexcept {
  return result == ncclSuccess || result == ncclInProgress;
}

/// The communicator as lce uses it.
struct comm_info {
  int ranks = 1;
  int rank = 0;
};

inline cudaError_t validate_shard(const vocab_shard& s, const problem& global) noexcept {
  if (s.v_begin < 0 || s.v_begin >= s.v_end)
    return detail::invalid(
        "shard.v_begin must be >= 0 and < shard.v_end (an empty shard "
        "is not supported)");
  if (s.v_end > global.v)
    return detail::invalid("shard.v_end must be <= shape.v (the global vocabulary size)");
  const int dx = static_cast<int>(s.dx);
  if (dx < 0 || dx > 1) return detail::invalid("shard.dx is not all_reduce or reduce_scatter");
  return cudaSuccess;
}

/// Host queries only (no launch, no synchronization): the communicator is non-null, lives on
/// the current device, and (reduce_scatter) divides the rows.
inline cudaError_t validate_comm(const vocab_shard& s, const problem& global, bool scatters_dx,
                                 comm_info& info) noexcept {
  if (s.comm == nullptr) return detail::invalid("shard.comm (NCCL) must not be null");
  ncclResult_t r = ncclCommCount(s.comm, &info.ranks);
  if (nccl_ok(r)) r = ncclCommUserRank(s.comm, &info.rank);
  int comm_device = -1;
  if (nccl_ok(r)) r = ncclCommCuDevice(s.comm, &comm_device);
  if (!nccl_ok(r)) return nccl_failure(r, "communicator query", s.comm);
  int device = -1;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess)
    return detail::cuda_failure(e, "cudaGetDevice");
  if (comm_device != device) {
    char message[160];
    std::snprintf(message, sizeof(message),
                  "shard.comm belongs to device %d but the current device is %d (cudaSetDevice)",
                  comm_device, device);
    return detail::invalid(message);
  }
  if (scatters_dx && global.n % info.ranks != 0)
    return detail::invalid(
        "shape.n must be a multiple of the number of ranks with dx_reduction::reduce_scatter");
  return cudaSuccess;
}

}  // namespace impl
}  // namespace nccl
LCE_NAMESPACE_END

/// Returns from the enclosing function when the NCCL call `expr` fails.
#define LCE_NCCL_RETURN_IF_ERROR(expr, what, comm)                          \
  do {                                                                      \
    const ncclResult_t lce_nccl_status_ = (expr);                           \
    if (!::lce::nccl::impl::nccl_ok(lce_nccl_status_))                      \
      return ::lce::nccl::impl::nccl_failure(lce_nccl_status_, what, comm); \
  } while (0)
