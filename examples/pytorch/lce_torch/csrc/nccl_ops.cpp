// nccl_ops.cpp: the vocabulary-parallel operators over lce::nccl (torch.ops.lce_torch.nccl_*),
// their argument checks, and the NCCL communicators lce_torch.distributed makes for a
// torch.distributed group. Compiled only when NCCL is found (load.py, LCE_TORCH_WITH_NCCL).
//
// Communicators (functions of lce_torch._C; lce_torch.distributed caches one per (group,
// device) and destroys them):
//   nccl_version()                           -> NCCL_VERSION_CODE of the library loaded
//   nccl_unique_id()                         -> bytes (ncclGetUniqueId; rank 0 of the group
//                                               calls it, the group broadcasts it)
//   nccl_comm_init(id, ranks, rank, device)  -> int handle (ncclCommInitRank; collective)
//   nccl_comm_destroy(handle, abort)            ncclCommDestroy, or ncclCommAbort
// Operators (CUDA; fake implementations in lce_torch/distributed.py):
//   nccl_forward          -> the nine outputs of lce_torch::forward, identical on every rank
//   nccl_backward         -> dx (all-reduced [n, d], or this rank's [n/k, d] rows when
//                            reduce-scattered), dw and db (this rank's rows)
//   nccl_forward_backward -> the forward's nine outputs, then dx, dw, db (upstream gradient 1)
//   nccl_all_gather       -> [ranks * rows, ...]: the ranks' x concatenated along dim 0 in rank
//                            order (ncclAllGather; the sequence-parallel input of the head)
// x [n, d], target [n] and class_weight [V] are global (the same on every rank); weight
// [v_end - v_begin, d] and bias are this rank's rows of the global [V, d] head; `vocab_size`
// is V. Every rank of the communicator makes the same call in the same order.
#include "nccl_ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "host.h"

#ifndef LCE_TORCH_WITH_NCCL
#error "nccl_ops.cpp is compiled only with NCCL (load.py defines LCE_TORCH_WITH_NCCL)"
#endif

namespace lce_torch {
namespace {

void check_nccl(ncclResult_t result, const char* what, ncclComm_t comm = nullptr) {
  if (result == ncclSuccess) return;
  TORCH_CHECK(false, "lce_torch: ", what, " failed: ", ncclGetErrorString(result),
              comm != nullptr ? " (" : "", comm != nullptr ? ncclGetLastError(comm) : "",
              comm != nullptr ? ")" : "");
}

ncclComm_t comm_of(std::int64_t handle) {
  TORCH_CHECK_VALUE(handle != 0, "lce_torch: the NCCL communicator handle is null");
  return reinterpret_cast<ncclComm_t>(static_cast<std::intptr_t>(handle));
}

// ----------------------------------------------------------------------------------------------
// Communicators

std::int64_t nccl_version() {
  int version = 0;
  check_nccl(ncclGetVersion(&version), "ncclGetVersion");
  return version;
}

pybind11::bytes nccl_unique_id() {
  ncclUniqueId id;
  check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return pybind11::bytes(id.internal, sizeof(id.internal));
}

std::int64_t nccl_comm_init(const std::string& unique_id, std::int64_t ranks, std::int64_t rank,
                            std::int64_t device) {
  ncclUniqueId id;
  TORCH_CHECK_VALUE(unique_id.size() == sizeof(id.internal),
                    "lce_torch: the NCCL unique id must have ", sizeof(id.internal), " bytes, got ",
                    unique_id.size());
  TORCH_CHECK_VALUE(ranks > 0 && rank >= 0 && rank < ranks, "lce_torch: rank ", rank,
                    " is not in [0, ", ranks, ")");
  TORCH_CHECK_VALUE(device >= 0, "lce_torch: device must be a CUDA device index, got ", device);
  unique_id.copy(id.internal, sizeof(id.internal));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  ncclComm_t comm = nullptr;
  ncclResult_t result = ncclSuccess;
  {
    // Blocks until every rank of the group has joined.
    const pybind11::gil_scoped_release release;
    result = ncclCommInitRank(&comm, static_cast<int>(ranks), id, static_cast<int>(rank));
  }
  check_nccl(result, "ncclCommInitRank");
  return static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(comm));
}

void nccl_comm_destroy(std::int64_t handle, bool abort) {
  ncclComm_t comm = comm_of(handle);
  int device = 0;
  check_nccl(ncclCommCuDevice(comm, &device), "ncclCommCuDevice", comm);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const pybind11::gil_scoped_release release;
  check_nccl(abort ? ncclCommAbort(comm) : ncclCommDestroy(comm),
             abort ? "ncclCommAbort" : "ncclCommDestroy");
}

// ----------------------------------------------------------------------------------------------
// Argument checks

/// Checks and normalizes the inputs of every vocabulary-parallel operator (make_call for a
/// shard: weight and bias this rank's rows, class weights and V global).
shard_call make_shard_call(const at::Tensor& x_in, const at::Tensor& weight_in,
                           const std::optional<at::Tensor>& bias, const at::Tensor& target,
                           const std::optional<at::Tensor>& class_weight, std::int64_t comm,
                           std::int64_t v_begin, std::int64_t vocab_size, bool scatter_dx,
                           const lce::loss_options& options) {
  shard_call s;
  s.c = make_call(x_in, weight_in, bias, target, class_weight, options, vocab_size);
  s.comm = comm_of(comm);
  s.v_begin = v_begin;
  s.v_end = v_begin + s.c.weight.size(0);  // lce checks 0 <= v_begin < v_end <= V
  s.scatter_dx = scatter_dx;
  return s;
}

/// The communicator's size, checked against the caller's `ranks` (the output shape of a
/// reduce-scattered dX depends on it, and the fake implementations know only the argument).
void check_ranks(const shard_call& s, std::int64_t ranks) {
  int count = 0;
  check_nccl(ncclCommCount(s.comm, &count), "ncclCommCount", s.comm);
  TORCH_CHECK_VALUE(count == ranks, "lce_torch: ranks is ", ranks, " but the communicator has ",
                    count);
  if (s.scatter_dx)
    TORCH_CHECK_VALUE(s.c.shape.n % ranks == 0, "lce_torch: with dX reduce-scattered the ",
                      s.c.shape.n, " rows of x must be a multiple of the ", ranks, " ranks");
}

/// New gradient buffers: dx [n, d] (all-reduced) or [n / ranks, d] (reduce-scattered) in x's
/// dtype; dw [rows, d] and db [rows] in fp32 or x's dtype.
gradients make_gradients(shard_call& s, std::int64_t ranks, bool need_dx, bool need_dw,
                         bool need_db, bool fp32_grad) {
  call& c = s.c;
  c.fp32_grad = fp32_grad || c.x.scalar_type() == at::kFloat;
  const auto grad_options = c.x.options().dtype(c.fp32_grad ? at::kFloat : c.x.scalar_type());
  const std::int64_t dx_rows = s.scatter_dx ? c.shape.n / ranks : c.shape.n;
  const std::int64_t rows = s.v_end - s.v_begin;
  gradients g;
  g.dx = optional_output(need_dx, {dx_rows, c.shape.d}, c.x.options());
  g.dw = optional_output(need_dw, {rows, c.shape.d}, grad_options);
  g.db = optional_output(need_db, {rows}, grad_options);
  return g;
}

void dispatch_forward(const shard_call& s, const forward_outputs& o) {
  switch (s.c.x.scalar_type()) {
    case at::kFloat:
      return nccl_forward_fp32(s, o);
    case at::kHalf:
      return nccl_forward_fp16(s, o);
    default:
      return nccl_forward_bf16(s, o);
  }
}

void dispatch_backward(const shard_call& s, const gradients& g) {
  switch (s.c.x.scalar_type()) {
    case at::kFloat:
      return nccl_backward_fp32(s, g);
    case at::kHalf:
      return nccl_backward_fp16(s, g);
    default:
      return nccl_backward_bf16(s, g);
  }
}

void dispatch_forward_backward(const shard_call& s, const forward_outputs& o, const gradients& g) {
  switch (s.c.x.scalar_type()) {
    case at::kFloat:
      return nccl_forward_backward_fp32(s, o, g);
    case at::kHalf:
      return nccl_forward_backward_fp16(s, o, g);
    default:
      return nccl_forward_backward_bf16(s, o, g);
  }
}

// ----------------------------------------------------------------------------------------------
// Operators

forward_result nccl_forward_op(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, std::int64_t comm,
                               std::int64_t ranks, std::int64_t v_begin, std::int64_t vocab_size,
                               std::int64_t ignore_index, std::int64_t reduction,
                               double label_smoothing, double z_loss, double softcap,
                               double temperature, std::int64_t shift_seq_len, double filter_eps,
                               std::int64_t outputs) {
  const shard_call s =
      make_shard_call(x, weight, bias, target, class_weight, comm, v_begin, vocab_size, false,
                      make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                   temperature, shift_seq_len, filter_eps));
  check_ranks(s, ranks);
  const forward_outputs o = make_forward_outputs(s.c, outputs);
  dispatch_forward(s, o);
  return to_result(s.c, o);
}

gradient_result nccl_backward_op(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                 const at::Tensor& lse, const std::optional<at::Tensor>& grad,
                                 const std::optional<at::Tensor>& class_weight, std::int64_t comm,
                                 std::int64_t ranks, std::int64_t v_begin, std::int64_t vocab_size,
                                 bool scatter_dx, std::int64_t ignore_index, std::int64_t reduction,
                                 double label_smoothing, double z_loss, double softcap,
                                 double temperature, std::int64_t shift_seq_len, double filter_eps,
                                 std::int64_t strategy, std::int64_t memory_budget, bool need_dx,
                                 bool need_dw, bool need_db, bool fp32_weight_grad) {
  shard_call s =
      make_shard_call(x, weight, bias, target, class_weight, comm, v_begin, vocab_size, scatter_dx,
                      make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                   temperature, shift_seq_len, filter_eps));
  check_ranks(s, ranks);
  s.c.bopt = make_backward_options(strategy, memory_budget, /*stored_allowed=*/false);
  gradients g = make_gradients(s, ranks, need_dx, need_dw, need_db, fp32_weight_grad);
  g.lse = checked_lse(lse, s.c);
  g.grad = upstream(grad, s.c);
  dispatch_backward(s, g);
  return to_result(s.c, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
nccl_forward_backward_op(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& target,
                         const std::optional<at::Tensor>& class_weight, std::int64_t comm,
                         std::int64_t ranks, std::int64_t v_begin, std::int64_t vocab_size,
                         bool scatter_dx, std::int64_t ignore_index, std::int64_t reduction,
                         double label_smoothing, double z_loss, double softcap, double temperature,
                         std::int64_t shift_seq_len, double filter_eps, std::int64_t outputs,
                         std::int64_t strategy, std::int64_t memory_budget, bool need_dx,
                         bool need_dw, bool need_db, bool fp32_weight_grad) {
  shard_call s =
      make_shard_call(x, weight, bias, target, class_weight, comm, v_begin, vocab_size, scatter_dx,
                      make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                   temperature, shift_seq_len, filter_eps));
  check_ranks(s, ranks);
  s.c.bopt = make_backward_options(strategy, memory_budget, /*stored_allowed=*/true);
  const forward_outputs o = make_forward_outputs(s.c, outputs);
  const gradients g = make_gradients(s, ranks, need_dx, need_dw, need_db, fp32_weight_grad);
  dispatch_forward_backward(s, o, g);
  return std::tuple_cat(to_result(s.c, o), to_result(s.c, g));
}

at::Tensor nccl_all_gather_op(const at::Tensor& x, std::int64_t comm, std::int64_t ranks) {
  TORCH_CHECK_VALUE(x.is_cuda(), "lce_torch: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "lce_torch: x must have a leading dimension to gather");
  ncclDataType_t type = ncclFloat32;
  switch (x.scalar_type()) {
    case at::kFloat:
      type = ncclFloat32;
      break;
    case at::kHalf:
      type = ncclFloat16;
      break;
    case at::kBFloat16:
      type = ncclBfloat16;
      break;
    case at::kLong:
      type = ncclInt64;
      break;
    case at::kInt:
      type = ncclInt32;
      break;
    default:
      TORCH_CHECK_VALUE(false, "lce_torch: cannot all-gather ", x.scalar_type());
  }
  ncclComm_t c = comm_of(comm);
  int count = 0;
  check_nccl(ncclCommCount(c, &count), "ncclCommCount", c);
  TORCH_CHECK_VALUE(count == ranks, "lce_torch: ranks is ", ranks, " but the communicator has ",
                    count);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor send = x.contiguous();
  std::vector<std::int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[0] *= ranks;
  at::Tensor out = at::empty(sizes, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const ncclResult_t result = ncclAllGather(
      send.data_ptr(), out.data_ptr(), static_cast<std::size_t>(send.numel()), type, c, stream);
  check_nccl(result == ncclInProgress ? ncclSuccess : result, "ncclAllGather", c);
  return out;
}

}  // namespace

void define_nccl_functions(pybind11::module_& m) {
  m.def("nccl_version", &nccl_version, "NCCL_VERSION_CODE of the NCCL library loaded");
  m.def("nccl_unique_id", &nccl_unique_id, "ncclGetUniqueId, as bytes");
  m.def("nccl_comm_init", &nccl_comm_init, pybind11::arg("unique_id"), pybind11::arg("ranks"),
        pybind11::arg("rank"), pybind11::arg("device"),
        "ncclCommInitRank on `device` (collective: every rank calls it); returns the handle "
        "the nccl_* operators take");
  m.def("nccl_comm_destroy", &nccl_comm_destroy, pybind11::arg("comm"),
        pybind11::arg("abort") = false, "ncclCommDestroy (or ncclCommAbort) of a handle");
}

}  // namespace lce_torch

#define LCE_TORCH_NCCL_SHARD_ARGS "int comm, int ranks, int v_begin, int vocab_size"
#define LCE_TORCH_NCCL_LOSS_ARGS                                                          \
  "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, " \
  "float temperature, int shift_seq_len, float filter_eps"
#define LCE_TORCH_NCCL_FORWARD_RETURNS                                               \
  "Tensor loss, Tensor token_loss, Tensor lse, Tensor z_loss, Tensor token_z_loss, " \
  "Tensor argmax, Tensor correct, Tensor entropy, Tensor target_logprob"

TORCH_LIBRARY_FRAGMENT(lce_torch, m) {
  m.def("nccl_all_gather(Tensor x, int comm, int ranks) -> Tensor");
  m.def(
      "nccl_forward(Tensor x, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, " LCE_TORCH_NCCL_SHARD_ARGS ", " LCE_TORCH_NCCL_LOSS_ARGS
      ", int outputs) -> (" LCE_TORCH_NCCL_FORWARD_RETURNS ")");
  m.def(
      "nccl_backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "Tensor? grad, Tensor? class_weight, " LCE_TORCH_NCCL_SHARD_ARGS
      ", bool scatter_dx, " LCE_TORCH_NCCL_LOSS_ARGS
      ", int strategy, int memory_budget, bool need_dx, bool need_dw, bool need_db, "
      "bool fp32_weight_grad) -> (Tensor dx, Tensor dw, Tensor db)");
  m.def(
      "nccl_forward_backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, " LCE_TORCH_NCCL_SHARD_ARGS
      ", bool scatter_dx, " LCE_TORCH_NCCL_LOSS_ARGS
      ", int outputs, int strategy, int memory_budget, bool need_dx, "
      "bool need_dw, bool need_db, bool fp32_weight_grad) -> (" LCE_TORCH_NCCL_FORWARD_RETURNS
      ", Tensor dx, Tensor dw, Tensor db)");
}

TORCH_LIBRARY_IMPL(lce_torch, CUDA, m) {
  m.impl("nccl_forward", &lce_torch::nccl_forward_op);
  m.impl("nccl_backward", &lce_torch::nccl_backward_op);
  m.impl("nccl_forward_backward", &lce_torch::nccl_forward_backward_op);
  m.impl("nccl_all_gather", &lce_torch::nccl_all_gather_op);
}
