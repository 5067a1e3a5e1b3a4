// nccl_ops.cuh: the launches of lce::nccl (the vocabulary-parallel loss) for one element type,
// on PyTorch's current stream, with the workspace from PyTorch's caching allocator and
// PyTorch's cuBLAS handle. Included by nccl_ops_<dtype>.cu only.
//
// The collectives run on the communicator of the shard_call (made by nccl_ops.cpp for a
// torch.distributed group) and on the current stream: nothing here synchronizes with the host.
#pragma once

#include <lce/nccl/vocab_parallel.cuh>
#include <type_traits>

#include "nccl_ops.h"
#include "ops.cuh"

namespace lce_torch {
namespace detail {

inline lce::nccl::vocab_shard make_shard(const shard_call& s) {
  lce::nccl::vocab_shard shard;
  shard.comm = s.comm;
  shard.v_begin = s.v_begin;
  shard.v_end = s.v_end;
  shard.dx =
      s.scatter_dx ? lce::nccl::dx_reduction::reduce_scatter : lce::nccl::dx_reduction::all_reduce;
  return shard;
}

template <class Element>
void nccl_forward(const shard_call& s, const forward_outputs& o) {
  const c10::cuda::CUDAGuard guard(s.c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const lce::forward_args<Element> args = make_forward_args<Element>(s.c, o);
  const lce::nccl::vocab_shard shard = make_shard(s);
  std::size_t bytes = 0;
  check(lce::nccl::forward<Element>(nullptr, bytes, args, s.c.shape, shard, s.c.options, stream),
        "lce::nccl forward");
  workspace ws(bytes, s.c.x.device());
  check(lce::nccl::forward<Element>(ws.data, bytes, args, s.c.shape, shard, s.c.options, stream),
        "lce::nccl forward");
}

template <class Element, class Grad>
void nccl_backward_as(const shard_call& s, const gradients& g) {
  const call& c = s.c;
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const lce::backward_args<Element, Grad> a = make_backward_args<Element, Grad>(c, g);
  const lce::nccl::vocab_shard shard = make_shard(s);
  std::size_t bytes = 0;
  check(lce::nccl::backward<Element, Grad>(nullptr, bytes, a, c.shape, shard, c.options, c.bopt,
                                           handle, stream),
        "lce::nccl backward");
  workspace ws(bytes, c.x.device());
  check(lce::nccl::backward<Element, Grad>(ws.data, bytes, a, c.shape, shard, c.options, c.bopt,
                                           handle, stream),
        "lce::nccl backward");
}

template <class Element, class Grad>
void nccl_forward_backward_as(const shard_call& s, const forward_outputs& o, const gradients& g) {
  const call& c = s.c;
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const lce::forward_backward_args<Element, Grad> a =
      make_forward_backward_args<Element, Grad>(c, o, g);
  const lce::nccl::vocab_shard shard = make_shard(s);
  std::size_t bytes = 0;
  check(lce::nccl::forward_backward<Element, Grad>(nullptr, bytes, a, c.shape, shard, c.options,
                                                   c.bopt, handle, stream),
        "lce::nccl forward_backward");
  workspace ws(bytes, c.x.device());
  check(lce::nccl::forward_backward<Element, Grad>(ws.data, bytes, a, c.shape, shard, c.options,
                                                   c.bopt, handle, stream),
        "lce::nccl forward_backward");
}

template <class Element>
void nccl_backward(const shard_call& s, const gradients& g) {
  if constexpr (std::is_same_v<Element, float>) {
    nccl_backward_as<float, float>(s, g);
  } else {
    if (fp32_grad(s.c, g))
      nccl_backward_as<Element, float>(s, g);
    else
      nccl_backward_as<Element, Element>(s, g);
  }
}

template <class Element>
void nccl_forward_backward(const shard_call& s, const forward_outputs& o, const gradients& g) {
  if constexpr (std::is_same_v<Element, float>) {
    nccl_forward_backward_as<float, float>(s, o, g);
  } else {
    if (fp32_grad(s.c, g))
      nccl_forward_backward_as<Element, float>(s, o, g);
    else
      nccl_forward_backward_as<Element, Element>(s, o, g);
  }
}

}  // namespace detail
}  // namespace lce_torch

/// Defines the entry points of nccl_ops.h for one element type.
#define LCE_TORCH_DEFINE_NCCL_ENTRY_POINTS(suffix, Element)                            \
  namespace lce_torch {                                                                \
  void nccl_forward_##suffix(const shard_call& s, const forward_outputs& out) {        \
    detail::nccl_forward<Element>(s, out);                                             \
  }                                                                                    \
  void nccl_backward_##suffix(const shard_call& s, const gradients& g) {               \
    detail::nccl_backward<Element>(s, g);                                              \
  }                                                                                    \
  void nccl_forward_backward_##suffix(const shard_call& s, const forward_outputs& out, \
                                      const gradients& g) {                            \
    detail::nccl_forward_backward<Element>(s, out, g);                                 \
  }                                                                                    \
  }
