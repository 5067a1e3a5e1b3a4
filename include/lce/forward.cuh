/// @file forward.cuh
/// @brief lce::forward — the loss (and lse) of a linear layer followed by softmax
/// cross-entropy, without materializing the logits.
#pragma once

#include <cstddef>
#include <type_traits>

#include "args.hpp"
#include "config.hpp"
#include "detail/validate.hpp"
#include "device/empty_batch.cuh"
#include "device/forward.cuh"
#include "options.hpp"
#include "status.hpp"

LCE_NAMESPACE_BEGIN

namespace detail {
/// Null checks. With n = 0 the per-row pointers (x, targets, token_loss) may be null: an
/// empty tensor may have no storage.
template <class Element>
cudaError_t validate_forward_args(const forward_args<Element>& a, const problem& s,
                                  const loss_options& o) noexcept {
  const bool rows = s.n > 0;
  if (a.x == nullptr && rows) return invalid("args.x must not be null");
  if (a.w == nullptr) return invalid("args.w must not be null");
  if (a.targets == nullptr && rows) return invalid("args.targets must not be null");
  if (o.reduction == lce::reduction::none && a.token_loss == nullptr && rows)
    return invalid("args.token_loss must not be null with reduction none");
  if (o.reduction != lce::reduction::none && a.loss == nullptr)
    return invalid("args.loss must not be null with reduction mean or sum");
  return cudaSuccess;
}

/// The buffers lce::forward reads (inputs) and writes (outputs), for the alignment and
/// overlap checks.
template <class Element>
void forward_buffers(const forward_args<Element>& a, const problem& s, const loss_options& o,
                     buffer_list& in, buffer_list& out) noexcept {
  in.add(matrix_buffer("args.x", a.x, s.n, s.d, s.x_stride()));
  in.add(matrix_buffer("args.w", a.w, s.v, s.d, s.w_stride()));
  in.add(vector_buffer("args.bias", a.bias, s.v));
  in.add(vector_buffer("args.targets", a.targets, s.n));
  in.add(vector_buffer("args.class_weight", a.class_weight, s.v));
  const bool reduced = o.reduction != lce::reduction::none;
  out.add(vector_buffer("args.loss", a.loss, reduced ? 1 : 0));
  out.add(vector_buffer("args.z_loss", a.z_loss, reduced ? 1 : 0));
  out.add(vector_buffer("args.token_loss", a.token_loss, s.n));
  out.add(vector_buffer("args.lse", a.lse, s.n));
  out.add(vector_buffer("args.token_z_loss", a.token_z_loss, s.n));
  out.add(vector_buffer("args.argmax", a.argmax, s.n));
  out.add(vector_buffer("args.correct", a.correct, 1));
  out.add(vector_buffer("args.entropy", a.entropy, s.n));
  out.add(vector_buffer("args.target_logprob", a.target_logprob, s.n));
  out.add(vector_buffer("args.status", a.status, 1));
}
}  // namespace detail

/// @brief Workspace bytes lce::forward needs for `shape`: a pure function of the shape,
/// O(n·splits): 24 B of row statistics per row and vocabulary split (splits ≈ 1024 /
/// ceil(n / BlockM), at most 1024) plus 20 B per row and a 256 B record, never O(n·v).
template <class Element, class Config = default_config<Element>>
[[nodiscard]] std::size_t forward_workspace_size(const problem& shape) noexcept {
  detail::workspace_layout layout;
  return device::make_forward_plan<Config>(shape, layout).bytes;
}

/// @brief Which kernel lce::forward runs (forward_choice::kernel).
enum class forward_kernel : int {
  sm90 = 0,  ///< sm_90a: TMA + wgmma pipeline, the lean epilogue (no bias, no class weights)
  sm90_general = 1,  ///< sm_90a with the general epilogue (a bias or class weights)
  tiled = 2,         ///< the portable tiled kernel: mma.sync for 16-bit elements, FFMA for fp32
};

/// @brief Which forward kernel runs for a shape on the current device, why, and the workspace.
struct forward_choice {
  forward_kernel kernel;
  std::size_t workspace_bytes;  ///< forward_workspace_size
  const char* reason;           ///< why this kernel (static text)
};

/// @brief What lce::forward<Element, Config> will run for `shape` on the current device
/// (`bias_or_weights`: a bias or class weights will be passed): the sm_90a kernels where their
/// predicate holds — 16-bit elements, a Config with an sm_90a tile configuration, row strides of
/// X and W that are multiples of 16 bytes, a device of compute capability 9.0 with this binary's
/// sm_90a code — else the tiled kernel, with the first condition that failed as the reason. The
/// device's part is queried once per kernel and device and cached; nothing is launched. At the
/// launch X and W must also be 16-byte aligned (only the pointers can tell), else the tiled
/// kernel runs.
template <class Element, class Config = default_config<Element>>
[[nodiscard]] forward_choice choose_forward(const problem& shape,
                                            bool bias_or_weights = false) noexcept {
  forward_choice c{forward_kernel::tiled, forward_workspace_size<Element, Config>(shape), ""};
  using sm90 = typename sm90_config_of<Config>::type;
  using general = typename sm90_general_config_of<Config>::type;
  if constexpr (sizeof(Element) != 2) {
    c.reason = "fp32 elements: the sm_90a kernels take 16-bit elements";
  } else if constexpr (std::is_void_v<sm90>) {
    c.reason = "the Config has no sm_90a tile configuration";
  } else {
    switch (device::sm90_can_run<Element, kernel::fused_forward_sm90_kernel<Element, sm90, false>,
                                 kernel::fused_forward_sm90_kernel<Element, general, true>>(
        shape, bias_or_weights)) {
      case device::sm90_verdict::row_stride:
        c.reason =
            "a row stride of X or W is not a multiple of 16 bytes (the sm_90a copy engine needs "
            "it)";
        break;
      case device::sm90_verdict::device:
        c.reason =
            "the current device is not of compute capability 9.0, or this binary has no sm_90a "
            "code (build for 90a)";
        break;
      case device::sm90_verdict::runs:
        c.kernel = bias_or_weights ? forward_kernel::sm90_general : forward_kernel::sm90;
        c.reason = bias_or_weights ? "sm_90a kernel, general epilogue (a bias or class weights)"
                                   : "sm_90a kernel, lean epilogue";
        break;
    }
  }
  return c;
}

/// @brief Cross-entropy loss of Z = X·Wᵀ + b against `targets`, fused: tiles of Z live in
/// shared memory and registers only.
///
/// @tparam Element  float, __half or __nv_bfloat16 (fp32 accumulation always; fp32 inputs
///                  use exact FFMA, never TF32)
/// @tparam Config   tile configuration (default_config<Element>)
/// @param[in]     d_workspace      device workspace (256-byte aligned), or null for a size
///                                 query that only sets `workspace_bytes` and launches nothing
/// @param[in,out] workspace_bytes  in: bytes available; out (size query): bytes needed
/// @param[in]     args             device pointers; see forward_args
/// @param[in]     shape            n, d, v and leading dimensions
/// @param[in]     options          ignore_index, reduction and the loss options (options.hpp)
/// @param[in]     stream           every launch is enqueued on it, in order
/// @return cudaSuccess; cudaErrorInvalidValue for a bad argument (lce::last_error_message()
///         names it); or the error of a failed launch.
///
/// Never allocates, synchronizes or reads back to the host: safe under stream capture.
/// Deterministic (fixed reduction order). Writes each output of forward_args that is given
/// (loss and z_loss for mean/sum; token_loss, lse, token_z_loss, argmax, correct, entropy,
/// target_logprob) with the options of loss_options (options.hpp has the formulas); ignored
/// rows get loss 0. A target outside [0, v) that is not ignore_index is treated as ignored and
/// counted into `args.status` when given (lce::check_status turns it into an error). A NaN or
/// ±inf logit makes its row's loss NaN. n = 0 launches no kernel (loss, z_loss, correct are
/// set to 0 by memsets). Pointers must be aligned to their element size; outputs must not
/// overlap inputs, other outputs or the workspace (checked: cudaErrorInvalidValue naming
/// both). docs/robustness.md has the whole contract.
template <class Element, class Config = default_config<Element>>
[[nodiscard]] cudaError_t forward(void* d_workspace, std::size_t& workspace_bytes,
                                  const forward_args<Element>& args, const problem& shape,
                                  const loss_options& options = {},
                                  cudaStream_t stream = nullptr) noexcept {
  static_assert(is_supported_element_v<Element>, "Element must be float, __half or __nv_bfloat16");
  detail::clear_error();
  LCE_RETURN_IF_ERROR(detail::validate_problem(shape));
  LCE_RETURN_IF_ERROR(detail::validate_options(options, shape));
  LCE_RETURN_IF_ERROR(detail::validate_forward_args(args, shape, options));
  detail::buffer_list inputs, outputs;
  detail::forward_buffers(args, shape, options, inputs, outputs);
  LCE_RETURN_IF_ERROR(detail::validate_buffers(inputs, outputs));
  detail::workspace_layout layout;
  const device::forward_plan plan = device::make_forward_plan<Config>(shape, layout);
  LCE_RETURN_IF_ERROR(
      detail::two_phase_workspace(d_workspace, workspace_bytes, plan.bytes, inputs, outputs));
  if (d_workspace == nullptr) return cudaSuccess;  // the size query
  if (shape.n == 0) return device::run_empty_forward(args, options, stream);
  LCE_RETURN_IF_ERROR(device::check_current_device());
  return device::run_forward<Element, Config>(d_workspace, plan, args, shape, options, stream);
}

LCE_NAMESPACE_END
