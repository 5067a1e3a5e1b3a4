/// @file empty_batch.cuh
/// @brief What the launchers do for n = 0 (no tokens): no kernel, only memsets on the stream,
/// so that the outputs mean what they mean for an all-ignored batch: reduced loss, z-loss and
/// correct 0; dW and db 0 (unless accumulating: then untouched). Per-row outputs are empty.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../args.hpp"
#include "../options.hpp"
#include "../status.hpp"

LCE_NAMESPACE_BEGIN
namespace device {

/// Zeroes the scalar outputs of a forward over no rows.
template <class Element>
cudaError_t run_empty_forward(const forward_args<Element>& a, const loss_options& o,
                              cudaStream_t stream) noexcept {
  const bool reduced = o.reduction != lce::reduction::none;
  if (reduced && a.loss != nullptr)
    LCE_RETURN_IF_ERROR(cudaMemsetAsync(a.loss, 0, sizeof(float), stream));
  if (reduced && a.z_loss != nullptr)
    LCE_RETURN_IF_ERROR(cudaMemsetAsync(a.z_loss, 0, sizeof(float), stream));
  if (a.correct != nullptr)
    LCE_RETURN_IF_ERROR(cudaMemsetAsync(a.correct, 0, sizeof(std::int64_t), stream));
  return cudaSuccess;
}

/// The gradients of a loss over no rows: dW = 0 and db = 0 (dX is empty); with
/// options.accumulate nothing changes.
template <class Element, class Grad>
cudaError_t run_empty_backward(const backward_args<Element, Grad>& a, const problem& s,
                               const loss_options& o, cudaStream_t stream) noexcept {
  if (o.accumulate) return cudaSuccess;
  if (a.dw != nullptr)
    LCE_RETURN_IF_ERROR(cudaMemset2DAsync(
        a.dw, static_cast<std::size_t>(s.dw_stride()) * sizeof(Grad), 0,
        static_cast<std::size_t>(s.d) * sizeof(Grad), static_cast<std::size_t>(s.v), stream));
  if (a.db != nullptr)
    LCE_RETURN_IF_ERROR(
        cudaMemsetAsync(a.db, 0, static_cast<std::size_t>(s.v) * sizeof(Grad), stream));
  return cudaSuccess;
}

}  // namespace device
LCE_NAMESPACE_END
