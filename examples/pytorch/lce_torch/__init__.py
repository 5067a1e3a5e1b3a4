"""lce_torch: fused linear cross-entropy for PyTorch, over the lce CUDA library.

``linear_cross_entropy(x, weight, target)`` computes ``F.cross_entropy(x @ weight.T, target)``
(and its gradients dx, dweight, dbias) without ever materializing the [N, V] logits::

    import lce_torch
    loss = lce_torch.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True)
    loss.backward()

Every option of lce is exposed (ignore_index, reduction, label_smoothing, class weights,
z-loss, softcap, temperature, the causal shift, the opt-in approximate gradient filter
filter_eps) together with its per-token outputs (lse, z-loss, argmax and accuracy, entropy,
target log-probability). The work is enqueued on the current CUDA stream with the workspace
from PyTorch's caching allocator and PyTorch's cuBLAS handle, and never synchronizes with the
host: the function can be captured in a CUDA graph and used inside torch.compile'd code (the
operators have fake implementations). See docs/pytorch.md.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import _inputs
from ._targets import _check_targets, _parse_check_targets

__all__ = [
    "LinearCrossEntropy",
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyOutput",
    "choose_backward",
    "choose_forward_backward",
    "forward_workspace_size",
    "linear_cross_entropy",
    "linear_cross_entropy_backward_into",
    "linear_cross_entropy_forward_backward_into",
    "lce_version",
]


def _load_extension():
    """The compiled extension: the installed/in-place build, else a JIT build (load.py)."""
    try:
        from . import _C  # built by setup.py

        return _C
    except ImportError as error:
        if os.environ.get("LCE_TORCH_NO_JIT") == "1":
            raise ImportError(
                "lce_torch: the extension is not built (pip install --no-build-isolation "
                "./examples/pytorch) and LCE_TORCH_NO_JIT=1 forbids the JIT build"
            ) from error
    from .load import build

    return build(verbose=os.environ.get("LCE_TORCH_VERBOSE") == "1")


_C = _load_extension()
_ops = torch.ops.lce_torch
lce_version: str = _C.lce_version

# ------------------------------------------------------------------------------------------
# Encodings shared with csrc/lce_torch.cpp

_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
_NONE = 2
_STRATEGIES = {
    "auto": 0,
    "automatic": 0,
    "vocab_chunked": 1,
    "vocab": 1,
    "row_chunked": 2,
    "row": 2,
    "stored": 3,
}
_ROW_CHUNKED = 2
_STORED = 3

_WANT_TOKEN_LOSS = 1
_WANT_LSE = 2
_WANT_Z_LOSS = 4
_WANT_TOKEN_Z_LOSS = 8
_WANT_ARGMAX = 16
_WANT_CORRECT = 32
_WANT_ENTROPY = 64
_WANT_TARGET_LOGPROB = 128

# ------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes of every operator's outputs, for
# torch.compile and FakeTensor tracing. They must mirror lce_torch.cpp exactly.


def _fake_forward_outputs(x: Tensor, reduction: int, outputs: int):
    n = x.shape[0]
    reduced = reduction != _NONE

    def out(wanted, shape, dtype):
        return x.new_empty(shape if wanted else (0,), dtype=dtype)

    f32, i64 = torch.float32, torch.int64
    return (
        out(reduced, (), f32),
        out(not reduced or bool(outputs & _WANT_TOKEN_LOSS), (n,), f32),
        out(outputs & _WANT_LSE, (n,), f32),
        out(reduced and bool(outputs & _WANT_Z_LOSS), (), f32),
        out(outputs & _WANT_TOKEN_Z_LOSS, (n,), f32),
        out(outputs & _WANT_ARGMAX, (n,), i64),
        out(outputs & _WANT_CORRECT, (), i64),
        out(outputs & _WANT_ENTROPY, (n,), f32),
        out(outputs & _WANT_TARGET_LOGPROB, (n,), f32),
    )


def _fake_gradients(x, weight, need_dx, need_dw, need_db, fp32_weight_grad):
    grad_dtype = torch.float32 if fp32_weight_grad or x.dtype == torch.float32 else x.dtype
    n, d = x.shape
    v = weight.shape[0]
    return (
        x.new_empty((n, d) if need_dx else (0,)),
        x.new_empty((v, d) if need_dw else (0,), dtype=grad_dtype if need_dw else x.dtype),
        x.new_empty((v,) if need_db else (0,), dtype=grad_dtype if need_db else x.dtype),
    )


@torch.library.register_fake("lce_torch::forward")
def _(x, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, temperature, shift_seq_len, filter_eps, outputs):
    return _fake_forward_outputs(x, reduction, outputs)


@torch.library.register_fake("lce_torch::backward")
def _(x, weight, bias, target, lse, grad, class_weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, temperature, shift_seq_len, filter_eps, strategy,
      memory_budget, need_dx, need_dw, need_db, fp32_weight_grad):
    return _fake_gradients(x, weight, need_dx, need_dw, need_db, fp32_weight_grad)


@torch.library.register_fake("lce_torch::forward_backward")
def _(x, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, temperature, shift_seq_len, filter_eps, outputs, strategy, memory_budget, need_dx,
      need_dw, need_db, fp32_weight_grad):
    return _fake_forward_outputs(x, reduction, outputs) + _fake_gradients(
        x, weight, need_dx, need_dw, need_db, fp32_weight_grad
    )


@torch.library.register_fake("lce_torch::backward_into")
def _(x, weight, bias, target, lse, grad, class_weight, ignore_index, reduction,
      label_smoothing, z_loss, softcap, temperature, shift_seq_len, filter_eps, strategy,
      memory_budget, accumulate, dx, dw, db):
    return None


@torch.library.register_fake("lce_torch::scale_")
def _(t, scale):
    return None


@torch.library.register_fake("lce_torch::forward_backward_into")
def _(x, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, temperature, shift_seq_len, filter_eps, outputs, strategy, memory_budget,
      accumulate, dx, dw, db):
    return _fake_forward_outputs(x, reduction, outputs)


def _fused_gradients(ctx, grad_loss, needed):
    """The gradients computed in the forward (saved in ctx), times the upstream gradient.

    grad_loss is a device scalar, read on the device (no host synchronization, so CUDA graphs
    and torch.compile keep working): at 1, the usual case, nothing is written; otherwise one
    pass over each gradient, in place, where ``dw * grad_loss`` wrote a second dW-sized buffer
    and cost that pass every step. In place means the saved gradients are handed over once: a
    second backward through the same graph (retain_graph=True) is refused. Under torch.compile
    the product stays out of place, for the compiler to fuse (no bookkeeping on ctx there).
    """
    if torch.compiler.is_compiling():
        return tuple(grad * grad_loss if need else grad
                     for grad, need in zip(ctx.saved_tensors, needed))
    if getattr(ctx, "gradients_consumed", False):
        raise RuntimeError(
            "lce_torch: with grad_in_forward=True (or strategy='stored') the gradients are "
            "computed once, in the forward, and handed over by the first backward; a second "
            "backward through the same graph (retain_graph=True) is not supported: use "
            "grad_in_forward=False"
        )
    ctx.gradients_consumed = True
    grads = ctx.saved_tensors
    scale = grad_loss.detach().to(torch.float32).reshape(1)
    for grad, need in zip(grads, needed):
        if need:
            _ops.scale_(grad, scale)
    return grads


# ------------------------------------------------------------------------------------------
# The autograd function


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over the lce operators, on 2-D inputs (linear_cross_entropy flattens).

    forward(x [n, d], weight [v, d], bias [v] | None, target [n] int64, class_weight [v] fp32
    | None, ignore_index, reduction (0 mean, 1 sum, 2 none), label_smoothing, z_loss, softcap
    (0: off), temperature, shift_seq_len (0: off), outputs (bit mask), strategy (0 auto,
    1 vocab_chunked, 2 row_chunked), memory_budget (bytes, -1: lce's default),
    fp32_weight_grad, grad_in_forward, filter_eps (0: exact gradients; optional, last so that
    calls without it keep working) returns nine tensors: the loss (a scalar; [n] per-token
    losses with reduction none), then token_loss, lse, z_loss, token_z_loss, argmax, correct,
    entropy, target_logprob (empty when not asked for). Only the first is differentiable.

    Default: the forward saves the lse (n floats) and the backward recomputes the logits in
    chunks, with the upstream gradient passed to lce as a device pointer. grad_in_forward
    (reduction mean/sum only): lce's forward_backward computes the gradients during the
    forward, as Liger-Kernel does, and the backward scales them by the upstream gradient;
    with row_chunked it does the work of 3 GEMMs instead of 4, but holds dx/dw from the
    forward to the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, temperature, shift_seq_len, outputs, strategy,
                memory_budget, fp32_weight_grad, grad_in_forward, filter_eps=0.0):
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        loss_options = (ignore_index, reduction, label_smoothing, z_loss, softcap, temperature,
                        shift_seq_len, filter_eps)
        ctx.need = (need_dx, need_dw, need_db)
        ctx.fused = bool(grad_in_forward and reduction != _NONE and
                         (need_dx or need_dw or need_db))
        if ctx.fused:
            result = _ops.forward_backward(x, weight, bias, target, class_weight, *loss_options,
                                           outputs, strategy, memory_budget, need_dx, need_dw,
                                           need_db, fp32_weight_grad)
            forward_outputs = result[:9]
            ctx.save_for_backward(*result[9:])
        else:
            wants_grad = need_dx or need_dw or need_db
            forward_outputs = _ops.forward(x, weight, bias, target, class_weight, *loss_options,
                                           outputs | (_WANT_LSE if wants_grad else 0))
            if wants_grad:
                ctx.save_for_backward(x, weight, bias, target, class_weight, forward_outputs[2])
            ctx.loss_options = loss_options
            ctx.backward_options = (strategy, memory_budget)
            ctx.fp32_weight_grad = fp32_weight_grad
        loss, token_loss = forward_outputs[0], forward_outputs[1]
        if reduction == _NONE:  # the per-token losses are the loss
            loss, token_loss = token_loss, x.new_empty((0,), dtype=torch.float32)
        rest = (token_loss,) + tuple(forward_outputs[2:])
        ctx.mark_non_differentiable(*rest)
        return (loss,) + rest

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        need_dx, need_dw, need_db = ctx.need
        # One gradient per forward input (18; autograd drops trailing Nones when a caller
        # passed 17, without filter_eps).
        if not (need_dx or need_dw or need_db):
            return (None,) * 18
        if ctx.fused:
            dx, dw, db = _fused_gradients(ctx, grad_loss, (need_dx, need_dw, need_db))
        else:
            x, weight, bias, target, class_weight, lse = ctx.saved_tensors
            dx, dw, db = _ops.backward(x, weight, bias, target, lse, grad_loss, class_weight,
                                       *ctx.loss_options, *ctx.backward_options, need_dx,
                                       need_dw, need_db, ctx.fp32_weight_grad)
        # An fp32 dw/db for a 16-bit parameter is cast to the parameter's dtype by autograd.
        return ((dx if need_dx else None), (dw if need_dw else None),
                (db if need_db else None)) + (None,) * 15


# ------------------------------------------------------------------------------------------
# The public functions


class LinearCrossEntropyOutput(NamedTuple):
    """What linear_cross_entropy returns when any ``return_*`` flag is set.

    Per-token fields have x's leading shape; fields not asked for are None. Only ``loss`` is
    differentiable.
    """

    loss: Tensor  #: the reduced loss (float32 scalar), or per-token losses with reduction none
    lse: Optional[Tensor] = None  #: log-sum-exp of each row of the (transformed) logits
    z_loss: Optional[Tensor] = None  #: the z-loss term (included in loss); per token for none
    token_loss: Optional[Tensor] = None  #: per-token losses (mean/sum reductions)
    argmax: Optional[Tensor] = None  #: predicted token of each row (int64)
    correct: Optional[Tensor] = None  #: number of valid rows whose argmax is the target
    accuracy: Optional[Tensor] = None  #: correct / number of valid rows (0 when none)
    entropy: Optional[Tensor] = None  #: entropy of each row's softmax, in nats
    target_logprob: Optional[Tensor] = None  #: log softmax of the target (0 for ignored)


def _parse_reduction(reduction: str) -> int:
    try:
        return _REDUCTIONS[reduction]
    except KeyError:
        raise ValueError(
            f"lce_torch: reduction must be 'mean', 'sum' or 'none', got {reduction!r}"
        ) from None


def _parse_strategy(strategy: str) -> int:
    try:
        return _STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            "lce_torch: strategy must be 'auto', 'vocab_chunked', 'row_chunked' or 'stored', "
            f"got {strategy!r}"
        ) from None


def _prepare(x, weight, bias, target, class_weight, shift):
    """Checks the inputs and brings them to what the operators take (_inputs.prepare)."""
    return _inputs.prepare(x, weight, bias, target, class_weight, shift)


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    class_weight: Optional[Tensor] = None,
    shift: Union[bool, int] = False,
    strategy: str = "auto",
    memory_budget: Optional[int] = None,
    fp32_weight_grad: bool = False,
    grad_in_forward: bool = False,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_token_loss: bool = False,
    return_argmax: bool = False,
    return_accuracy: bool = False,
    return_entropy: bool = False,
    return_target_logprob: bool = False,
    *,
    filter_eps: float = 0.0,
    check_targets: Union[str, bool] = "device",
) -> Union[Tensor, LinearCrossEntropyOutput]:
    """Cross-entropy of the logits ``x @ weight.T + bias`` against ``target``, fused.

    Equal (up to rounding; fp32 accumulation throughout) to::

        z = (x @ weight.T + bias).float() / temperature
        if softcap: z = softcap * torch.tanh(z / softcap)
        F.cross_entropy(z.flatten(0, -2), target.flatten(), weight=class_weight,
                        ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing)
          + z_loss * mean over valid rows of logsumexp(z)**2   (sum for 'sum'; per token for 'none')

    Its gradients are exactly this expression's unless ``filter_eps`` > 0 asks for filtered
    (approximate) ones.

    Args:
        x: [..., D] hidden states, float32 / float16 / bfloat16, on a CUDA device. Any leading
            shape; rows are read with their stride (a dense copy only for layouts such as a
            transposed view).
        weight: [V, D] classifier (the LM head), x's dtype. A row-strided view (a slice of a
            padded embedding) is read in place.
        target: x's leading shape (or as many elements), int64 or int32 token ids in [0, V)
            or ``ignore_index``; any other value fails (see check_targets).
        bias: optional [V] bias, x's dtype.
        ignore_index: rows with this target contribute nothing and are not counted.
        reduction: 'mean' (over valid rows; 0 when all are ignored, never NaN), 'sum' or
            'none' (per-token losses of x's leading shape, 0 for ignored rows).
        label_smoothing: α in [0, 1], PyTorch's semantics (with class weights too).
        z_loss: scale s of the z-loss s·lse² added to each valid row's loss (PaLM; Liger's
            lse_square_scale). With 'mean' it is averaged over the valid rows.
        softcap: c > 0 caps the logits to c·tanh(z/c) (Gemma 2's final_logit_softcapping).
        temperature: τ > 0 divides the logits (before the softcap).
        class_weight: optional [V] class weights (F.cross_entropy's ``weight=``); 'mean'
            divides by the sum of the valid rows' target weights.
        shift: the causal shift of LM training: True scores position t of each sequence
            against target t + 1 of the same sequence (x [B, T, D] or [T, D], target of the
            same leading shape, unshifted) and ignores the last position; an int T does the
            same on rows grouped by T. No copy of the targets is made.
        strategy: the backward's organisation, 'auto', 'vocab_chunked', 'row_chunked' or
            'stored' (docs/algorithm.md). row_chunked computes dW in fp32 (see
            fp32_weight_grad). 'stored' keeps e^(z - m) of every logit in 16 bits from the
            forward instead of recomputing (n·V·2 bytes; row chunks within memory_budget
            where that does not fit, with fp32 dW/db accumulators of V·(D+1)·4 bytes inside it
            unless fp32_weight_grad; else whatever memory_budget says):
            it computes the gradients in the forward (grad_in_forward), so 'mean' or 'sum'
            only.
        memory_budget: upper bound in bytes on the backward's workspace (default 256 MiB).
        fp32_weight_grad: compute dW/db in fp32 (one rounding instead of one per chunk, and
            what 'auto' needs to choose row_chunked); autograd casts them to the parameter's
            dtype.
        grad_in_forward: compute the gradients during the forward (lce forward_backward, as
            Liger-Kernel does) and scale them in the backward: with row_chunked, 3 GEMMs of
            work instead of 4. mean/sum only; holds dx/dw from forward to backward.
        return_*: also return these (non-differentiable) outputs; then the result is a
            LinearCrossEntropyOutput instead of the loss tensor.
        filter_eps: gradient filtering, opt-in and approximate (keyword only; 0, the
            default, computes exact gradients). In the backward, every entry of the logit
            gradient dZ other than the target's whose softmax probability p_v is below
            filter_eps is taken as 0, its label-smoothing and z-loss terms included; dx,
            dweight and dbias follow from that dZ. The forward and the loss do not change. In
            [0, 1): a negative, NaN or >= 1 value raises ValueError (lce's own check). Cut
            Cross-Entropy filters by default with eps(dtype)/32, 2**-12 in bfloat16; pass
            filter_eps=2**-12 to compare with it. lce's gradient GEMMs do not skip the zeroed
            entries, so filtering saves no time.
        check_targets: what a scored target outside [0, V) that is not ignore_index does
            (keyword only). 'device' (default): a device-side assertion, as F.cross_entropy
            makes on CUDA: no host synchronization, legal under CUDA graph capture and
            torch.compile; it costs a few tiny kernels (a few microseconds) and a failure ends
            the process's CUDA context. 'host': a ValueError with the count, at the price of
            a host synchronization (not under graph capture). 'off': no check; such a row is
            treated as ignored (lce's C++ behaviour).

    Returns:
        The loss (float32: a scalar, or per-token losses with reduction 'none'), or a
        LinearCrossEntropyOutput when a ``return_*`` flag is set.
    """
    red = _parse_reduction(reduction)
    strat = _parse_strategy(strategy)
    if strat == _STORED:
        if red == _NONE:
            raise ValueError(
                "lce_torch: strategy='stored' computes the gradients in the forward, which "
                "needs reduction 'mean' or 'sum'"
            )
        grad_in_forward = True
    x2, w2, bias, target2, class_weight, lead, seq_len = _prepare(
        x, weight, bias, target, class_weight, shift
    )
    outputs = _outputs_mask(red, return_token_loss, return_lse, return_z_loss, return_argmax,
                            return_accuracy, return_entropy, return_target_logprob)
    _check_targets(_parse_check_targets(check_targets), target2, w2.shape[0], int(ignore_index),
                   seq_len)
    fp32_grad = bool(fp32_weight_grad or strat == _ROW_CHUNKED)
    results = LinearCrossEntropyFunction.apply(
        x2, w2, bias, target2, class_weight, int(ignore_index), red, float(label_smoothing),
        float(z_loss), float(softcap) if softcap is not None else 0.0, float(temperature),
        seq_len, outputs, strat, -1 if memory_budget is None else int(memory_budget), fp32_grad,
        bool(grad_in_forward), float(filter_eps),
    )
    valid_rows = None
    if return_accuracy:
        valid = target2 != ignore_index
        if seq_len:
            valid = valid.reshape(-1, seq_len)[:, 1:]
        valid_rows = valid.sum().clamp(min=1).float()
    return _pack_outputs(results, red, lead, outputs, valid_rows, return_lse, return_z_loss,
                         return_token_loss, return_argmax, return_accuracy, return_entropy,
                         return_target_logprob)


def _outputs_mask(red, token_loss, lse, z_loss, argmax, accuracy, entropy, logprob) -> int:
    """The operators' `outputs` bits for the return_* flags."""
    outputs = 0
    if token_loss:
        outputs |= _WANT_TOKEN_LOSS
    if lse:
        outputs |= _WANT_LSE
    if z_loss:
        outputs |= _WANT_TOKEN_Z_LOSS if red == _NONE else _WANT_Z_LOSS
    if argmax:
        outputs |= _WANT_ARGMAX
    if accuracy:
        outputs |= _WANT_CORRECT
    if entropy:
        outputs |= _WANT_ENTROPY
    if logprob:
        outputs |= _WANT_TARGET_LOGPROB
    return outputs


def _pack_outputs(results, red, lead, outputs, valid_rows, return_lse, return_z_loss,
                  return_token_loss, return_argmax, return_accuracy, return_entropy,
                  return_target_logprob):
    """The loss, or a LinearCrossEntropyOutput with the requested fields in x's leading shape,
    from the nine outputs of the autograd function (`valid_rows`: the accuracy's denominator)."""
    loss = results[0].view(lead) if red == _NONE else results[0]
    if outputs == 0:
        return loss
    (token_loss, lse, z_reduced, token_z, argmax, correct, entropy, logprob) = results[1:]
    return LinearCrossEntropyOutput(
        loss=loss,
        lse=lse.view(lead) if return_lse else None,
        z_loss=(token_z.view(lead) if red == _NONE else z_reduced) if return_z_loss else None,
        token_loss=(loss if red == _NONE else token_loss.view(lead)) if return_token_loss else None,
        argmax=argmax.view(lead) if return_argmax else None,
        correct=correct if return_accuracy else None,
        accuracy=correct.float() / valid_rows if return_accuracy else None,
        entropy=entropy.view(lead) if return_entropy else None,
        target_logprob=logprob.view(lead) if return_target_logprob else None,
    )


class LinearCrossEntropy(nn.Module):
    """Module form of linear_cross_entropy: ``loss = LinearCrossEntropy(...)(x, weight, target)``.

    Holds the options (class_weight as a buffer; filter_eps, the opt-in approximate gradient
    filter, and check_targets as linear_cross_entropy documents them); forward(x, weight, target, bias=None)
    returns what linear_cross_entropy returns. The weight is an argument, not a parameter, so
    that a tied or sharded LM head stays where the model keeps it (Liger-Kernel's
    LigerFusedLinearCrossEntropyLoss does the same, with (weight, x, target) order).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        temperature: float = 1.0,
        class_weight: Optional[Tensor] = None,
        shift: Union[bool, int] = False,
        strategy: str = "auto",
        memory_budget: Optional[int] = None,
        fp32_weight_grad: bool = False,
        grad_in_forward: bool = False,
        filter_eps: float = 0.0,
        check_targets: Union[str, bool] = "device",
    ):
        super().__init__()
        _parse_reduction(reduction)
        _parse_strategy(strategy)
        _parse_check_targets(check_targets)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = temperature
        self.shift = shift
        self.strategy = strategy
        self.memory_budget = memory_budget
        self.fp32_weight_grad = fp32_weight_grad
        self.grad_in_forward = grad_in_forward
        self.filter_eps = filter_eps
        self.check_targets = check_targets
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(self, x: Tensor, weight: Tensor, target: Tensor,
                bias: Optional[Tensor] = None, **returns) -> Union[Tensor,
                                                                   LinearCrossEntropyOutput]:
        return linear_cross_entropy(
            x, weight, target, bias, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            temperature=self.temperature, class_weight=self.class_weight, shift=self.shift,
            strategy=self.strategy, memory_budget=self.memory_budget,
            fp32_weight_grad=self.fp32_weight_grad, grad_in_forward=self.grad_in_forward,
            filter_eps=self.filter_eps, check_targets=self.check_targets, **returns,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, temperature={self.temperature}, shift={self.shift}, "
                f"strategy={self.strategy!r}, check_targets={self.check_targets!r}"
                + (f", filter_eps={self.filter_eps}" if self.filter_eps else ""))


# ------------------------------------------------------------------------------------------
# Without autograd: gradients written into (or accumulated in) caller-owned buffers


def _grad_rows(buffer: Optional[Tensor], name: str, width: int) -> Optional[Tensor]:
    if buffer is None:
        return None
    try:
        return buffer.view(-1, width)
    except RuntimeError as error:
        raise ValueError(
            f"lce_torch: {name} must be viewable as [-1, {width}] (lce writes it in place), got "
            f"shape {tuple(buffer.shape)} strides {buffer.stride()}"
        ) from error


def linear_cross_entropy_forward_backward_into(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    dx: Optional[Tensor] = None,
    dw: Optional[Tensor] = None,
    db: Optional[Tensor] = None,
    accumulate: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    class_weight: Optional[Tensor] = None,
    shift: Union[bool, int] = False,
    strategy: str = "auto",
    memory_budget: Optional[int] = None,
    filter_eps: float = 0.0,
    check_targets: Union[str, bool] = "device",
) -> Tensor:
    """Loss and gradients in one call, outside autograd (lce::forward_backward).

    The gradients of the returned loss (upstream gradient 1; for 'none', of the sum of the
    per-token losses) are written into dx ([..., D] like x, x's dtype), dw ([V, D]) and db
    ([V]) — each optional — or, with ``accumulate=True``, added to what they hold: gradient
    accumulation over micro-batches into fp32 "main grad" buffers, Megatron-style. dw and db
    may be float32 or x's dtype (float32 allows row_chunked). Returns the loss (per-token for
    'none'). ``filter_eps`` > 0 filters the gradients (approximate; the loss is unchanged) as
    linear_cross_entropy documents, and so does ``check_targets``.
    """
    red = _parse_reduction(reduction)
    x2, w2, bias, target2, class_weight, lead, seq_len = _prepare(
        x, weight, bias, target, class_weight, shift
    )
    _check_targets(_parse_check_targets(check_targets), target2, w2.shape[0], int(ignore_index),
                   seq_len)
    outputs = _ops.forward_backward_into(
        x2, w2, bias, target2, class_weight, int(ignore_index), red, float(label_smoothing),
        float(z_loss), float(softcap) if softcap is not None else 0.0, float(temperature),
        seq_len, float(filter_eps), 0, _parse_strategy(strategy),
        -1 if memory_budget is None else int(memory_budget), bool(accumulate),
        _grad_rows(dx, "dx", x.shape[-1]), dw, db,
    )
    return outputs[1].view(lead) if red == _NONE else outputs[0]


def linear_cross_entropy_backward_into(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    lse: Tensor,
    bias: Optional[Tensor] = None,
    *,
    grad: Optional[Tensor] = None,
    dx: Optional[Tensor] = None,
    dw: Optional[Tensor] = None,
    db: Optional[Tensor] = None,
    accumulate: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    class_weight: Optional[Tensor] = None,
    shift: Union[bool, int] = False,
    strategy: str = "auto",
    memory_budget: Optional[int] = None,
    filter_eps: float = 0.0,
    check_targets: Union[str, bool] = "device",
) -> None:
    """The backward alone, outside autograd (lce::backward), from the lse a forward returned
    (``linear_cross_entropy(..., return_lse=True).lse``) with the same options. ``grad`` is
    the upstream gradient (a scalar for mean/sum, x's leading shape for none; None means 1).
    Writes (or, with ``accumulate=True``, adds into) dx, dw and db as
    linear_cross_entropy_forward_backward_into does; ``filter_eps`` > 0 filters them
    (approximate) as linear_cross_entropy documents, and so does ``check_targets``."""
    red = _parse_reduction(reduction)
    x2, w2, bias, target2, class_weight, lead, seq_len = _prepare(
        x, weight, bias, target, class_weight, shift
    )
    _check_targets(_parse_check_targets(check_targets), target2, w2.shape[0], int(ignore_index),
                   seq_len)
    _ops.backward_into(
        x2, w2, bias, target2, lse.reshape(-1), grad, class_weight, int(ignore_index), red,
        float(label_smoothing), float(z_loss), float(softcap) if softcap is not None else 0.0,
        float(temperature), seq_len, float(filter_eps), _parse_strategy(strategy),
        -1 if memory_budget is None else int(memory_budget), bool(accumulate),
        _grad_rows(dx, "dx", x.shape[-1]), dw, db,
    )


def _choose(n, d, v, dtype, fp32_weight_grad, strategy, memory_budget, with_forward,
            bias_or_weights):
    strat = _parse_strategy(strategy)
    fp32_grad = bool(fp32_weight_grad or strat == _ROW_CHUNKED)
    out = _C.choose_backward(
        n, d, v, str(dtype).removeprefix("torch."), fp32_grad, strat,
        -1 if memory_budget is None else int(memory_budget), bool(with_forward),
        bool(bias_or_weights),
    )
    # A 16-bit weight with fp32 gradients: the binding allocates dW in fp32 (autograd casts it).
    out["fp32_weight_grad_bytes"] = v * d * 4 if fp32_grad and dtype != torch.float32 else 0
    return out


def choose_backward(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16,
                    fp32_weight_grad: bool = False, strategy: str = "auto",
                    memory_budget: Optional[int] = None, bias_or_weights: bool = False) -> dict:
    """What the backward will do for a shape (lce::choose_backward): {'strategy', 'chunk',
    'workspace_bytes', 'accumulator_bytes' (the fp32 accumulators inside workspace_bytes),
    'fused_recompute' (the sm_90a kernel recomputes the chunks on the current device),
    'reason', 'fp32_weight_grad_bytes' (the fp32 dW the binding allocates for a 16-bit weight,
    beyond the workspace)}. bias_or_weights: a bias or class weights will be passed. Launches
    nothing."""
    return _choose(n, d, v, dtype, fp32_weight_grad, strategy, memory_budget, False,
                   bias_or_weights)


def choose_forward_backward(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16,
                            fp32_weight_grad: bool = False, strategy: str = "auto",
                            memory_budget: Optional[int] = None,
                            bias_or_weights: bool = False) -> dict:
    """What the gradients in the forward (grad_in_forward=True, strategy='stored') will do for a
    shape (lce::choose_forward_backward): the keys of choose_backward; 'strategy' may be
    'stored' (then 'chunk' is the rows per chunk, 0 for all rows at once) and
    'workspace_bytes' is the whole call's. Launches nothing."""
    return _choose(n, d, v, dtype, fp32_weight_grad, strategy, memory_budget, True,
                   bias_or_weights)


def forward_workspace_size(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of workspace lce's forward takes for the shape (lce::forward_workspace_size)."""
    return _C.forward_workspace_size(n, d, v, str(dtype).removeprefix("torch."))


from . import distributed  # noqa: E402,F401  (vocabulary parallelism: docs/vocab_parallel.md)
