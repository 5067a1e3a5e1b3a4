// ops.cuh: the launches of lce for one element type, on PyTorch's current stream, with the
// workspace from PyTorch's caching allocator and PyTorch's cuBLAS handle. Included by the
// per-element files ops_<dtype>.cu only.
//
// Nothing here synchronizes or reads back to the host, so every entry point can be captured
// in a CUDA graph (torch.cuda.graph) and traced by torch.compile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <lce/lce.cuh>
#include <type_traits>

#include "lce_torch.h"

namespace lce_torch {
namespace detail {

/// Turns an lce failure into a Python exception carrying the library's message: ValueError
/// for a bad argument, RuntimeError otherwise.
inline void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  const char* message = lce::last_error_message();
  // A failed launch leaves its error pending; clear it so that PyTorch's next launch check
  // does not report it a second time.
  (void)cudaGetLastError();
  if (status == cudaErrorInvalidValue) {
    TORCH_CHECK_VALUE(false, what, ": ", message[0] != '\0' ? message : cudaGetErrorString(status));
  }
  TORCH_CHECK(false, what, ": ", message[0] != '\0' ? message : cudaGetErrorString(status));
}

template <class Element>
Element* pointer(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<Element*>(t.data_ptr()) : nullptr;
}

/// A workspace of `bytes` from the caching allocator, on the current stream. It is released
/// when the returned tensor dies, after the launches were enqueued: the allocator reuses it
/// only for later work on the same stream (or after recording the stream), which is ordered.
struct workspace {
  at::Tensor storage;
  void* data = nullptr;

  workspace(std::size_t bytes, const at::Device& device) {
    constexpr std::size_t alignment = 256;  // what lce requires (cudaMalloc's guarantee)
    storage = at::empty({static_cast<std::int64_t>(bytes + alignment)},
                        at::TensorOptions().dtype(at::kByte).device(device));
    const auto address = reinterpret_cast<std::uintptr_t>(storage.data_ptr());
    data = reinterpret_cast<void*>((address + alignment - 1) / alignment * alignment);
  }
};

template <class Element>
lce::forward_args<Element> make_forward_args(const call& c, const forward_outputs& o) {
  lce::forward_args<Element> a;
  a.x = pointer<const Element>(c.x);
  a.w = pointer<const Element>(c.weight);
  a.bias = pointer<const Element>(c.bias);
  a.targets = pointer<const std::int64_t>(c.targets);
  a.class_weight = pointer<const float>(c.class_weight);
  a.loss = pointer<float>(o.loss);
  a.token_loss = pointer<float>(o.token_loss);
  a.lse = pointer<float>(o.lse);
  a.z_loss = pointer<float>(o.z_loss);
  a.token_z_loss = pointer<float>(o.token_z_loss);
  a.argmax = pointer<std::int64_t>(o.argmax);
  a.correct = pointer<std::int64_t>(o.correct);
  a.entropy = pointer<float>(o.entropy);
  a.target_logprob = pointer<float>(o.target_logprob);
  return a;
}

/// The backward's arguments: the call's inputs, the forward's lse and upstream gradient, and
/// the gradients to write.
template <class Element, class Grad>
lce::backward_args<Element, Grad> make_backward_args(const call& c, const gradients& g) {
  lce::backward_args<Element, Grad> a;
  a.x = pointer<const Element>(c.x);
  a.w = pointer<const Element>(c.weight);
  a.bias = pointer<const Element>(c.bias);
  a.targets = pointer<const std::int64_t>(c.targets);
  a.class_weight = pointer<const float>(c.class_weight);
  a.lse = pointer<const float>(g.lse);
  a.grad = pointer<const float>(g.grad);
  a.dx = pointer<Element>(g.dx);
  a.dw = pointer<Grad>(g.dw);
  a.db = pointer<Grad>(g.db);
  return a;
}

/// forward_backward's arguments: the forward's (make_forward_args) and the gradients.
template <class Element, class Grad>
lce::forward_backward_args<Element, Grad> make_forward_backward_args(const call& c,
                                                                     const forward_outputs& o,
                                                                     const gradients& g) {
  const lce::forward_args<Element> f = make_forward_args<Element>(c, o);
  lce::forward_backward_args<Element, Grad> a;
  a.x = f.x;
  a.w = f.w;
  a.bias = f.bias;
  a.targets = f.targets;
  a.class_weight = f.class_weight;
  a.loss = f.loss;
  a.token_loss = f.token_loss;
  a.lse = f.lse;
  a.z_loss = f.z_loss;
  a.token_z_loss = f.token_z_loss;
  a.argmax = f.argmax;
  a.correct = f.correct;
  a.entropy = f.entropy;
  a.target_logprob = f.target_logprob;
  a.dx = pointer<Element>(g.dx);
  a.dw = pointer<Grad>(g.dw);
  a.db = pointer<Grad>(g.db);
  return a;
}

template <class Element>
void forward(const call& c, const forward_outputs& o) {
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const lce::forward_args<Element> args = make_forward_args<Element>(c, o);
  std::size_t bytes = 0;
  check(lce::forward<Element>(nullptr, bytes, args, c.shape, c.options, stream), "lce forward");
  workspace ws(bytes, c.x.device());
  check(lce::forward<Element>(ws.data, bytes, args, c.shape, c.options, stream), "lce forward");
}

template <class Element, class Grad>
void backward_as(const call& c, const gradients& g) {
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  // PyTorch's handle for this device and stream, with PyTorch's cuBLAS workspace installed;
  // lce sets the handle's pointer mode for the call and restores it.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const lce::backward_args<Element, Grad> a = make_backward_args<Element, Grad>(c, g);
  std::size_t bytes = 0;
  check(lce::backward<Element, Grad>(nullptr, bytes, a, c.shape, c.options, c.bopt, handle, stream),
        "lce backward");
  workspace ws(bytes, c.x.device());
  check(lce::backward<Element, Grad>(ws.data, bytes, a, c.shape, c.options, c.bopt, handle, stream),
        "lce backward");
}

template <class Element, class Grad>
void forward_backward_as(const call& c, const forward_outputs& o, const gradients& g) {
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const lce::forward_backward_args<Element, Grad> a =
      make_forward_backward_args<Element, Grad>(c, o, g);
  std::size_t bytes = 0;
  check(lce::forward_backward<Element, Grad>(nullptr, bytes, a, c.shape, c.options, c.bopt, handle,
                                             stream),
        "lce forward_backward");
  workspace ws(bytes, c.x.device());
  check(lce::forward_backward<Element, Grad>(ws.data, bytes, a, c.shape, c.options, c.bopt, handle,
                                             stream),
        "lce forward_backward");
}

/// dW/db in fp32 when they are fp32 tensors (or, without them, when the call asks for it);
/// float inputs always have fp32 gradients.
inline bool fp32_grad(const call& c, const gradients& g) {
  if (g.dw.defined()) return g.dw.scalar_type() == at::kFloat;
  if (g.db.defined()) return g.db.scalar_type() == at::kFloat;
  return c.fp32_grad;
}

template <class Element>
void backward(const call& c, const gradients& g) {
  if constexpr (std::is_same_v<Element, float>) {
    backward_as<float, float>(c, g);
  } else {
    if (fp32_grad(c, g))
      backward_as<Element, float>(c, g);
    else
      backward_as<Element, Element>(c, g);
  }
}

template <class Element>
void forward_backward(const call& c, const forward_outputs& o, const gradients& g) {
  if constexpr (std::is_same_v<Element, float>) {
    forward_backward_as<float, float>(c, o, g);
  } else {
    if (fp32_grad(c, g))
      forward_backward_as<Element, float>(c, o, g);
    else
      forward_backward_as<Element, Element>(c, o, g);
  }
}

template <class Element, class Grad>
lce::backward_choice choose(const lce::problem& shape, const lce::backward_options& bopt,
                            bool with_forward, bool bias_or_weights) {
  return with_forward ? lce::choose_forward_backward<Element, Grad>(shape, bopt, bias_or_weights)
                      : lce::choose_backward<Element, Grad>(shape, bopt, bias_or_weights);
}

template <class Element>
backward_plan_info choose_backward(const lce::problem& shape, const lce::backward_options& bopt,
                                   bool fp32, bool with_forward, bool bias_or_weights) {
  const lce::backward_choice choice =
      std::is_same_v<Element, float> || fp32
          ? choose<Element, float>(shape, bopt, with_forward, bias_or_weights)
          : choose<Element, Element>(shape, bopt, with_forward, bias_or_weights);
  return {static_cast<std::int64_t>(choice.strategy),
          choice.chunk,
          static_cast<std::int64_t>(choice.workspace_bytes),
          static_cast<std::int64_t>(choice.accumulator_bytes),
          choice.fused_recompute,
          choice.reason};
}

/// t *= *scale in place, elementwise, unless *scale is 1: the gradients that forward_backward
/// computed in the forward, times the upstream gradient that autograd hands the backward as a
/// device scalar. Read on the device, so no host synchronization decides (graph capture stays
/// possible) and the common 1 costs a launch; other values (a loss scale) one read and one write
/// of t, in place, where t·scale out of place took a second buffer of t's size.
template <class Element>
__global__ void scale_kernel(Element* t, std::int64_t count, const float* scale) {
  const float s = *scale;
  if (s == 1.0f) return;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    t[i] = static_cast<Element>(static_cast<float>(t[i]) * s);
  }
}

template <class Element>
void scale(const at::Tensor& t, const at::Tensor& scale) {
  const std::int64_t count = t.numel();
  if (count == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  constexpr int threads = 256;
  // A few waves of blocks: each block reads the scale once and, at 1, returns at once.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto blocks = static_cast<unsigned>(
      std::min<std::int64_t>((count + threads - 1) / threads, std::int64_t{8} * sms));
  scale_kernel<Element>
      <<<blocks, threads, 0, stream>>>(pointer<Element>(t), count, scale.data_ptr<float>());
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, "lce_torch scale_: ", cudaGetErrorString(status));
}

}  // namespace detail
}  // namespace lce_torch

/// Defines the entry points of lce_torch.h for one element type.
#define LCE_TORCH_DEFINE_ENTRY_POINTS(suffix, Element)                                            \
  namespace lce_torch {                                                                           \
  void forward_##suffix(const call& c, const forward_outputs& out) {                              \
    detail::forward<Element>(c, out);                                                             \
  }                                                                                               \
  void backward_##suffix(const call& c, const gradients& g) { detail::backward<Element>(c, g); }  \
  void forward_backward_##suffix(const call& c, const forward_outputs& out, const gradients& g) { \
    detail::forward_backward<Element>(c, out, g);                                                 \
  }                                                                                               \
  backward_plan_info choose_backward_##suffix(const lce::problem& shape,                          \
                                              const lce::backward_options& bopt, bool fp32,       \
                                              bool with_forward, bool bias_or_weights) {          \
    return detail::choose_backward<Element>(shape, bopt, fp32, with_forward, bias_or_weights);    \
  }                                                                                               \
  std::int64_t forward_workspace_##suffix(const lce::problem& shape) {                            \
    return static_cast<std::int64_t>(lce::forward_workspace_size<Element>(shape));                \
  }                                                                                               \
  void scale_##suffix(const at::Tensor& t, const at::Tensor& scale) {                             \
    detail::scale<Element>(t, scale);                                                             \
  }                                                                                               \
  }
