// lce_torch.cpp: the PyTorch operators over lce (namespace torch.ops.lce_torch), their argument
// checks, and a small Python module (lce_torch._C) with the library's size queries.
//
// Operators (all CUDA; the Python package registers their fake implementations for
// torch.compile and wraps them in a torch.autograd.Function):
//   forward               -> loss, token_loss, lse, z_loss, token_z_loss, argmax, correct,
//                            entropy, target_logprob   (an output not asked for is empty, [0])
//   backward              -> dx, dw, db               (from the forward's lse)
//   forward_backward      -> the forward's nine outputs, then dx, dw, db (upstream gradient 1)
//   backward_into         writes dx, dw, db (accumulate: adds into them)
//   forward_backward_into the forward's nine outputs; writes dx, dw, db (accumulate: adds)
// x is [n, d] and weight [v, d], both with unit column stride and any row stride >= d (others
// are copied to a dense layout); targets [n] int64 (int32 is converted); bias [v] in x's
// dtype; class_weight [v] (converted to fp32). Errors are ValueError (bad argument) or
// RuntimeError, with lce's own message.
#include "lce_torch.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <lce/version.hpp>
#include <optional>
#include <string>
#include <tuple>

#include "host.h"

namespace lce_torch {
namespace {

using forward_backward_result =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void dispatch_forward(const call& c, const forward_outputs& o) {
  switch (c.x.scalar_type()) {
    case at::kFloat:
      return forward_fp32(c, o);
    case at::kHalf:
      return forward_fp16(c, o);
    default:
      return forward_bf16(c, o);
  }
}

void dispatch_backward(const call& c, const gradients& g) {
  switch (c.x.scalar_type()) {
    case at::kFloat:
      return backward_fp32(c, g);
    case at::kHalf:
      return backward_fp16(c, g);
    default:
      return backward_bf16(c, g);
  }
}

void dispatch_forward_backward(const call& c, const forward_outputs& o, const gradients& g) {
  switch (c.x.scalar_type()) {
    case at::kFloat:
      return forward_backward_fp32(c, o, g);
    case at::kHalf:
      return forward_backward_fp16(c, o, g);
    default:
      return forward_backward_bf16(c, o, g);
  }
}

/// New gradient buffers (overwritten by lce): dx in x's dtype, dw/db in fp32 or weight's dtype.
gradients make_gradients(call& c, bool need_dx, bool need_dw, bool need_db, bool fp32_grad) {
  c.fp32_grad = fp32_grad || c.x.scalar_type() == at::kFloat;
  const auto grad_options = c.x.options().dtype(c.fp32_grad ? at::kFloat : c.x.scalar_type());
  gradients g;
  g.dx = optional_output(need_dx, {c.shape.n, c.shape.d}, c.x.options());
  g.dw = optional_output(need_dw, {c.shape.v, c.shape.d}, grad_options);
  g.db = optional_output(need_db, {c.shape.v}, grad_options);
  return g;
}

/// Caller-owned gradient buffers of the *_into operators: checked, never copied (lce writes
/// them in place, so a layout lce cannot write is an error, not a silent copy).
gradients take_gradients(call& c, const std::optional<at::Tensor>& dx,
                         const std::optional<at::Tensor>& dw, const std::optional<at::Tensor>& db,
                         bool accumulate) {
  gradients g;
  const at::ScalarType element = c.x.scalar_type();
  if (dx.has_value() && dx->defined()) {
    TORCH_CHECK_VALUE(dx->scalar_type() == element, "lce_torch: dx must have x's dtype (", element,
                      "), got ", dx->scalar_type());
    TORCH_CHECK_VALUE(dx->dim() == 2 && dx->size(0) == c.shape.n && dx->size(1) == c.shape.d,
                      "lce_torch: dx must be [", c.shape.n, ", ", c.shape.d, "], got ",
                      dx->sizes());
    TORCH_CHECK_VALUE(row_major(*dx).is_same(*dx),
                      "lce_torch: dx must have unit column stride and non-overlapping rows, got "
                      "strides ",
                      dx->strides());
    g.dx = *dx;
    c.shape.lddx = row_stride(g.dx);
  }
  std::optional<at::ScalarType> grad_type;
  if (dw.has_value() && dw->defined()) {
    TORCH_CHECK_VALUE(dw->dim() == 2 && dw->size(0) == c.shape.v && dw->size(1) == c.shape.d,
                      "lce_torch: dw must be [", c.shape.v, ", ", c.shape.d, "], got ",
                      dw->sizes());
    TORCH_CHECK_VALUE(row_major(*dw).is_same(*dw),
                      "lce_torch: dw must have unit column stride and non-overlapping rows, got "
                      "strides ",
                      dw->strides());
    grad_type = dw->scalar_type();
    g.dw = *dw;
    c.shape.lddw = row_stride(g.dw);
  }
  if (db.has_value() && db->defined()) {
    TORCH_CHECK_VALUE(db->dim() == 1 && db->size(0) == c.shape.v && db->is_contiguous(),
                      "lce_torch: db must be a contiguous [", c.shape.v, "], got ", db->sizes());
    TORCH_CHECK_VALUE(!grad_type || *grad_type == db->scalar_type(),
                      "lce_torch: dw and db must have the same dtype, got ", *grad_type, " and ",
                      db->scalar_type());
    grad_type = db->scalar_type();
    g.db = *db;
  }
  if (grad_type) {
    TORCH_CHECK_VALUE(*grad_type == element || *grad_type == at::kFloat,
                      "lce_torch: dw and db must be float32 or x's dtype (", element, "), got ",
                      *grad_type);
    c.fp32_grad = *grad_type == at::kFloat;
  }
  for (const at::Tensor* t : {&g.dx, &g.dw, &g.db}) {
    if (t->defined())
      TORCH_CHECK_VALUE(t->device() == c.x.device(), "lce_torch: gradient buffers must be on ",
                        c.x.device(), ", got ", t->device());
  }
  c.options.accumulate = accumulate;
  return g;
}

// ----------------------------------------------------------------------------------------------
// Operators

forward_result forward_op(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& target,
                          const std::optional<at::Tensor>& class_weight, std::int64_t ignore_index,
                          std::int64_t reduction, double label_smoothing, double z_loss,
                          double softcap, double temperature, std::int64_t shift_seq_len,
                          double filter_eps, std::int64_t outputs) {
  const call c = make_call(x, weight, bias, target, class_weight,
                           make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                        temperature, shift_seq_len, filter_eps));
  const forward_outputs o = make_forward_outputs(c, outputs);
  dispatch_forward(c, o);
  return to_result(c, o);
}

gradient_result backward_op(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& target,
                            const at::Tensor& lse, const std::optional<at::Tensor>& grad,
                            const std::optional<at::Tensor>& class_weight,
                            std::int64_t ignore_index, std::int64_t reduction,
                            double label_smoothing, double z_loss, double softcap,
                            double temperature, std::int64_t shift_seq_len, double filter_eps,
                            std::int64_t strategy, std::int64_t memory_budget, bool need_dx,
                            bool need_dw, bool need_db, bool fp32_weight_grad) {
  call c = make_call(x, weight, bias, target, class_weight,
                     make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  temperature, shift_seq_len, filter_eps));
  c.bopt = make_backward_options(strategy, memory_budget);
  gradients g = make_gradients(c, need_dx, need_dw, need_db, fp32_weight_grad);
  g.lse = checked_lse(lse, c);
  g.grad = upstream(grad, c);
  dispatch_backward(c, g);
  return to_result(c, g);
}

forward_backward_result forward_backward_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    std::int64_t ignore_index, std::int64_t reduction, double label_smoothing, double z_loss,
    double softcap, double temperature, std::int64_t shift_seq_len, double filter_eps,
    std::int64_t outputs, std::int64_t strategy, std::int64_t memory_budget, bool need_dx,
    bool need_dw, bool need_db, bool fp32_weight_grad) {
  call c = make_call(x, weight, bias, target, class_weight,
                     make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  temperature, shift_seq_len, filter_eps));
  c.bopt = make_backward_options(strategy, memory_budget);
  const forward_outputs o = make_forward_outputs(c, outputs);
  const gradients g = make_gradients(c, need_dx, need_dw, need_db, fp32_weight_grad);
  dispatch_forward_backward(c, o, g);
  return std::tuple_cat(to_result(c, o), to_result(c, g));
}

void backward_into_op(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& target,
                      const at::Tensor& lse, const std::optional<at::Tensor>& grad,
                      const std::optional<at::Tensor>& class_weight, std::int64_t ignore_index,
                      std::int64_t reduction, double label_smoothing, double z_loss, double softcap,
                      double temperature, std::int64_t shift_seq_len, double filter_eps,
                      std::int64_t strategy, std::int64_t memory_budget, bool accumulate,
                      const std::optional<at::Tensor>& dx, const std::optional<at::Tensor>& dw,
                      const std::optional<at::Tensor>& db) {
  call c = make_call(x, weight, bias, target, class_weight,
                     make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  temperature, shift_seq_len, filter_eps));
  c.bopt = make_backward_options(strategy, memory_budget);
  gradients g = take_gradients(c, dx, dw, db, accumulate);
  g.lse = checked_lse(lse, c);
  g.grad = upstream(grad, c);
  dispatch_backward(c, g);
}

forward_result forward_backward_into_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    std::int64_t ignore_index, std::int64_t reduction, double label_smoothing, double z_loss,
    double softcap, double temperature, std::int64_t shift_seq_len, double filter_eps,
    std::int64_t outputs, std::int64_t strategy, std::int64_t memory_budget, bool accumulate,
    const std::optional<at::Tensor>& dx, const std::optional<at::Tensor>& dw,
    const std::optional<at::Tensor>& db) {
  call c = make_call(x, weight, bias, target, class_weight,
                     make_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  temperature, shift_seq_len, filter_eps));
  c.bopt = make_backward_options(strategy, memory_budget);
  const gradients g = take_gradients(c, dx, dw, db, accumulate);
  const forward_outputs o = make_forward_outputs(c, outputs);
  dispatch_forward_backward(c, o, g);
  return to_result(c, o);
}

/// t *= scale in place, scale one float32 on t's device (read there: where it is 1 nothing is
/// written). The gradients computed in the forward (grad_in_forward) meet the upstream
/// gradient this way in the backward.
void scale_op(const at::Tensor& t, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.is_contiguous(),
                    "lce_torch scale_: t must be a contiguous CUDA tensor");
  TORCH_CHECK_VALUE(
      scale.device() == t.device() && scale.numel() == 1 && scale.scalar_type() == at::kFloat,
      "lce_torch scale_: scale must be one float32 on t's device");
  switch (t.scalar_type()) {
    case at::kFloat:
      return scale_fp32(t, scale);
    case at::kHalf:
      return scale_fp16(t, scale);
    case at::kBFloat16:
      return scale_bf16(t, scale);
    default:
      TORCH_CHECK_VALUE(false, "lce_torch scale_: t must be float32, float16 or bfloat16, got ",
                        t.scalar_type());
  }
}

// ----------------------------------------------------------------------------------------------
// Size queries (Python module functions)

lce::problem query_shape(std::int64_t n, std::int64_t d, std::int64_t v) {
  TORCH_CHECK_VALUE(n > 0 && d > 0 && v > 0, "lce_torch: n, d and v must be positive");
  lce::problem s;
  s.n = n;
  s.d = d;
  s.v = v;
  return s;
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "float") return at::kFloat;
  if (name == "float16" || name == "half") return at::kHalf;
  TORCH_CHECK_VALUE(name == "bfloat16",
                    "lce_torch: dtype must be float32, float16 or bfloat16, got ", name);
  return at::kBFloat16;
}

const char* strategy_name(std::int64_t s) {
  switch (s) {
    case 1:
      return "vocab_chunked";
    case 2:
      return "row_chunked";
    case 3:
      return "stored";
    default:
      return "auto";
  }
}

pybind11::dict choose_backward_py(std::int64_t n, std::int64_t d, std::int64_t v,
                                  const std::string& dtype, bool fp32_weight_grad,
                                  std::int64_t strategy, std::int64_t memory_budget,
                                  bool with_forward, bool bias_or_weights) {
  const lce::problem s = query_shape(n, d, v);
  const lce::backward_options b = make_backward_options(strategy, memory_budget);
  backward_plan_info info;
  switch (parse_dtype(dtype)) {
    case at::kFloat:
      info = choose_backward_fp32(s, b, true, with_forward, bias_or_weights);
      break;
    case at::kHalf:
      info = choose_backward_fp16(s, b, fp32_weight_grad, with_forward, bias_or_weights);
      break;
    default:
      info = choose_backward_bf16(s, b, fp32_weight_grad, with_forward, bias_or_weights);
      break;
  }
  pybind11::dict out;
  out["strategy"] = strategy_name(info.strategy);
  out["chunk"] = info.chunk;
  out["workspace_bytes"] = info.workspace_bytes;
  out["accumulator_bytes"] = info.accumulator_bytes;
  out["fused_recompute"] = info.fused_recompute;
  out["reason"] = std::string(info.reason);
  return out;
}

std::int64_t forward_workspace_py(std::int64_t n, std::int64_t d, std::int64_t v,
                                  const std::string& dtype) {
  const lce::problem s = query_shape(n, d, v);
  switch (parse_dtype(dtype)) {
    case at::kFloat:
      return forward_workspace_fp32(s);
    case at::kHalf:
      return forward_workspace_fp16(s);
    default:
      return forward_workspace_bf16(s);
  }
}

}  // namespace

#ifdef LCE_TORCH_WITH_NCCL
void define_nccl_functions(pybind11::module_& m);  // nccl_ops.cpp
#endif

}  // namespace lce_torch

#define LCE_TORCH_LOSS_ARGS                                                               \
  "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, " \
  "float temperature, int shift_seq_len, float filter_eps"
#define LCE_TORCH_FORWARD_RETURNS                                                    \
  "Tensor loss, Tensor token_loss, Tensor lse, Tensor z_loss, Tensor token_z_loss, " \
  "Tensor argmax, Tensor correct, Tensor entropy, Tensor target_logprob"

TORCH_LIBRARY(lce_torch, m) {
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? "
      "class_weight, " LCE_TORCH_LOSS_ARGS ", int outputs) -> (" LCE_TORCH_FORWARD_RETURNS ")");
  m.def(
      "backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "Tensor? grad, Tensor? class_weight, " LCE_TORCH_LOSS_ARGS
      ", int strategy, int memory_budget, bool need_dx, bool need_dw, bool need_db, "
      "bool fp32_weight_grad) -> (Tensor dx, Tensor dw, Tensor db)");
  m.def(
      "forward_backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, " LCE_TORCH_LOSS_ARGS
      ", int outputs, int strategy, int memory_budget, bool need_dx, bool need_dw, "
      "bool need_db, bool fp32_weight_grad) -> (" LCE_TORCH_FORWARD_RETURNS
      ", Tensor dx, Tensor dw, Tensor db)");
  m.def(
      "backward_into(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "Tensor? grad, Tensor? class_weight, " LCE_TORCH_LOSS_ARGS
      ", int strategy, int memory_budget, bool accumulate, Tensor(a!)? dx, Tensor(b!)? dw, "
      "Tensor(c!)? db) -> ()");
  m.def(
      "forward_backward_into(Tensor x, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, " LCE_TORCH_LOSS_ARGS
      ", int outputs, int strategy, int memory_budget, bool accumulate, Tensor(a!)? dx, "
      "Tensor(b!)? dw, Tensor(c!)? db) -> (" LCE_TORCH_FORWARD_RETURNS ")");
  m.def("scale_(Tensor(a!) t, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(lce_torch, CUDA, m) {
  m.impl("forward", &lce_torch::forward_op);
  m.impl("backward", &lce_torch::backward_op);
  m.impl("forward_backward", &lce_torch::forward_backward_op);
  m.impl("backward_into", &lce_torch::backward_into_op);
  m.impl("forward_backward_into", &lce_torch::forward_backward_into_op);
  m.impl("scale_", &lce_torch::scale_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lce_torch: PyTorch operators over lce (torch.ops.lce_torch) and its size queries";
  m.attr("lce_version") = LCE_VERSION_STRING;
  m.def("choose_backward", &lce_torch::choose_backward_py, pybind11::arg("n"), pybind11::arg("d"),
        pybind11::arg("v"), pybind11::arg("dtype"), pybind11::arg("fp32_weight_grad") = false,
        pybind11::arg("strategy") = 0, pybind11::arg("memory_budget") = -1,
        pybind11::arg("with_forward") = false, pybind11::arg("bias_or_weights") = false,
        "lce::choose_backward (with_forward: lce::choose_forward_backward): the strategy 'auto' "
        "resolves to, the chunk extent and the workspace in bytes (dtype: 'float32', 'float16' "
        "or 'bfloat16')");
  m.def("forward_workspace_size", &lce_torch::forward_workspace_py, pybind11::arg("n"),
        pybind11::arg("d"), pybind11::arg("v"), pybind11::arg("dtype"),
        "lce::forward_workspace_size in bytes");
#ifdef LCE_TORCH_WITH_NCCL
  m.attr("with_nccl") = true;  // the vocabulary-parallel operators (lce_torch.distributed)
  lce_torch::define_nccl_functions(m);
#else
  m.attr("with_nccl") = false;
#endif
}
