/// @file validate.hpp
/// @brief Argument checks shared by the launchers; each failure names the argument.
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "../options.hpp"
#include "../status.hpp"
#include "workspace.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

/// Largest extent the GEMMs accept (cuBLAS takes int sizes; a 16-bit view of an fp32 chunk
/// doubles its leading dimension).
inline constexpr std::int64_t max_extent = (std::int64_t{INT_MAX} - 64) / 2;
static_assert(max_extent == 1073741791, "the messages below state max_extent: keep them true");

inline cudaError_t validate_problem(const problem& s) noexcept {
  if (s.n < 0) return invalid("shape.n (tokens) must be >= 0");
  if (s.d <= 0) return invalid("shape.d (hidden size) must be positive");
  if (s.v <= 0) return invalid("shape.v (vocabulary size) must be positive");
  if (s.n > max_extent || s.d > max_extent || s.v > max_extent)
    return invalid("shape.n, shape.d and shape.v must each be at most 1073741791");
  if (s.ldx != 0 && s.ldx < s.d) return invalid("shape.ldx must be 0 (dense) or >= shape.d");
  if (s.ldw != 0 && s.ldw < s.d) return invalid("shape.ldw must be 0 (dense) or >= shape.d");
  if (s.lddx != 0 && s.lddx < s.d) return invalid("shape.lddx must be 0 (dense) or >= shape.d");
  if (s.lddw != 0 && s.lddw < s.d) return invalid("shape.lddw must be 0 (dense) or >= shape.d");
  if (s.x_stride() > max_extent || s.w_stride() > max_extent || s.dx_stride() > max_extent ||
      s.dw_stride() > max_extent)
    return invalid("leading dimensions must be at most 1073741791");
  return cudaSuccess;
}

inline cudaError_t validate_options(const loss_options& o, const problem& s) noexcept {
  const int r = static_cast<int>(o.reduction);
  if (r < 0 || r > 2) return invalid("options.reduction is not mean, sum or none");
  if (!(o.label_smoothing >= 0.0f && o.label_smoothing <= 1.0f))
    return invalid("options.label_smoothing must be in [0, 1]");
  if (!(o.filter_eps >= 0.0f && o.filter_eps < 1.0f))
    return invalid("options.filter_eps must be in [0, 1)");
  if (!(o.z_loss >= 0.0f && std::isfinite(o.z_loss)))
    return invalid("options.z_loss must be finite and >= 0");
  if (!(o.softcap >= 0.0f && std::isfinite(o.softcap)))
    return invalid("options.softcap must be > 0 (or 0: no softcap)");
  if (!(o.temperature > 0.0f && std::isfinite(o.temperature)))
    return invalid("options.temperature must be finite and > 0");
  if (o.shift_seq_len < 0) return invalid("options.shift_seq_len must be >= 0");
  if (o.shift_seq_len > 0 && s.n % o.shift_seq_len != 0)
    return invalid("options.shift_seq_len must divide shape.n (rows are [B, T] flattened)");
  return cudaSuccess;
}

/// `with_forward`: the caller is lce::forward_backward, whose forward can store what the
/// `stored` strategy needs.
inline cudaError_t validate_backward_options(const backward_options& b, bool fp32_grad,
                                             bool with_forward = false) noexcept {
  const int s = static_cast<int>(b.strategy);
  if (s < 0 || s > 3) return invalid("backward_options.strategy is not a known strategy");
  if (b.strategy == backward_strategy::stored && !with_forward)
    return invalid(
        "backward_options.strategy stored needs the forward's stored values: only "
        "lce::forward_backward and lce::nccl::forward_backward run it");
  if (b.strategy == backward_strategy::row_chunked && !fp32_grad)
    return invalid("backward_options.strategy row_chunked needs fp32 dW/db (Grad = float)");
  return cudaSuccess;
}

/// @brief One device buffer an lce call reads or writes: its bytes as the bounding range
/// [begin, end) (a strided matrix from its first to its last element; empty for a null
/// pointer or a zero extent) and the alignment its element type needs.
struct buffer {
  const char* name = nullptr;
  std::uintptr_t begin = 0, end = 0;
  std::size_t alignment = 1;
};

/// The buffer of a [rows, cols] matrix with row stride ld (a vector: rows = 1).
template <class T>
buffer matrix_buffer(const char* name, const T* p, std::int64_t rows, std::int64_t cols,
                     std::int64_t ld) noexcept {
  buffer b{name, reinterpret_cast<std::uintptr_t>(p), reinterpret_cast<std::uintptr_t>(p),
           sizeof(T)};
  if (p != nullptr && rows > 0 && cols > 0)
    b.end = b.begin + static_cast<std::uintptr_t>((rows - 1) * ld + cols) * sizeof(T);
  return b;
}

template <class T>
buffer vector_buffer(const char* name, const T* p, std::int64_t count) noexcept {
  return matrix_buffer(name, p, 1, count, count);
}

/// A fixed-capacity list of the buffers of one call (no allocation).
struct buffer_list {
  static constexpr int capacity = 16;
  buffer items[capacity];
  int count = 0;
  void add(const buffer& b) noexcept {
    if (count < capacity) items[count++] = b;
  }
};

inline bool overlap(const buffer& a, const buffer& b) noexcept {
  return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

inline cudaError_t overlap_error(const buffer& a, const buffer& b) noexcept {
  std::snprintf(error_buffer(), 256,
                "lce: %s overlaps %s (outputs must not share memory with inputs, other outputs "
                "or the workspace)",
                a.name, b.name);
  return cudaErrorInvalidValue;
}

/// Every pointer aligned to its element size; no output overlapping an input or another
/// output (inputs may share memory with each other: they are only read).
inline cudaError_t validate_buffers(const buffer_list& inputs,
                                    const buffer_list& outputs) noexcept {
  for (const buffer_list* list : {&inputs, &outputs}) {
    for (int i = 0; i < list->count; ++i) {
      const buffer& b = list->items[i];
      if (b.begin % b.alignment != 0) {
        std::snprintf(error_buffer(), 256, "lce: %s is not aligned to its element size (%zu bytes)",
                      b.name, b.alignment);
        return cudaErrorInvalidValue;
      }
    }
  }
  for (int o = 0; o < outputs.count; ++o) {
    for (int i = 0; i < inputs.count; ++i)
      if (overlap(outputs.items[o], inputs.items[i]))
        return overlap_error(outputs.items[o], inputs.items[i]);
    for (int p = o + 1; p < outputs.count; ++p)
      if (overlap(outputs.items[o], outputs.items[p]))
        return overlap_error(outputs.items[o], outputs.items[p]);
  }
  return cudaSuccess;
}

/// The workspace [d_workspace, d_workspace + bytes) overlaps no input or output.
inline cudaError_t validate_workspace_disjoint(const void* d_workspace, std::size_t bytes,
                                               const buffer_list& inputs,
                                               const buffer_list& outputs) noexcept {
  const auto begin = reinterpret_cast<std::uintptr_t>(d_workspace);
  const buffer ws{"d_workspace", begin, begin + bytes, 1};
  for (const buffer_list* list : {&inputs, &outputs})
    for (int i = 0; i < list->count; ++i)
      if (overlap(ws, list->items[i])) return overlap_error(ws, list->items[i]);
  return cudaSuccess;
}

/// The workspace check of the two-phase protocol.
inline cudaError_t validate_workspace(std::size_t given, std::size_t needed) noexcept {
  if (given < needed) return invalid("workspace_bytes is smaller than the size query returned");
  return cudaSuccess;
}

/// The workspace's alignment (the launchers carve it in workspace_layout's aligned regions).
inline cudaError_t validate_workspace_pointer(const void* d_workspace) noexcept {
  if (reinterpret_cast<std::uintptr_t>(d_workspace) % workspace_layout::alignment != 0)
    return invalid("d_workspace must be 256-byte aligned (as cudaMalloc returns)");
  return cudaSuccess;
}

/// The forward_backward plan of a call: `make_plan(bias_or_weights)` for what the call passes,
/// or, where a call with a bias or class weights got a workspace sized by the query without
/// them (too small for that plan), the plan of that query — its chunked fallback fits there.
template <class MakePlan>
auto plan_for_call(const MakePlan& make_plan, bool bias_or_weights, const void* d_workspace,
                   std::size_t workspace_bytes) noexcept {
  auto plan = make_plan(bias_or_weights);
  if (bias_or_weights && d_workspace != nullptr && workspace_bytes < plan.bytes) {
    auto plain = make_plan(false);
    if (workspace_bytes >= plain.bytes) return plain;
  }
  return plan;
}

/// The two-phase workspace protocol of every launcher (docs/api.md): with d_workspace null, a
/// size query that stores `needed` in workspace_bytes (the caller then returns cudaSuccess and
/// launches nothing); else the launch's checks of the pointer's alignment and of the size.
inline cudaError_t two_phase_workspace(const void* d_workspace, std::size_t& workspace_bytes,
                                       std::size_t needed) noexcept {
  if (d_workspace == nullptr) {
    workspace_bytes = needed;
    return cudaSuccess;
  }
  LCE_RETURN_IF_ERROR(validate_workspace_pointer(d_workspace));
  return validate_workspace(workspace_bytes, needed);
}

/// As above; a launch also checks that the workspace overlaps none of the call's buffers.
inline cudaError_t two_phase_workspace(const void* d_workspace, std::size_t& workspace_bytes,
                                       std::size_t needed, const buffer_list& inputs,
                                       const buffer_list& outputs) noexcept {
  LCE_RETURN_IF_ERROR(two_phase_workspace(d_workspace, workspace_bytes, needed));
  if (d_workspace == nullptr) return cudaSuccess;
  return validate_workspace_disjoint(d_workspace, needed, inputs, outputs);
}

}  // namespace detail
LCE_NAMESPACE_END
