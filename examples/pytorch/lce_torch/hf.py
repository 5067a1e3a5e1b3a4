"""Hugging Face transformers causal LMs with lce's loss: ``lce_torch.hf.patch(model)``.

    import lce_torch.hf
    model = AutoModelForCausalLM.from_config(config)   # or from_pretrained(...)
    lce_torch.hf.patch(model)
    loss = model(input_ids, labels=labels).loss          # no [B, T, V] logits in training

After ``patch``, a training forward with ``labels`` runs the decoder, then computes the loss
of the LM head with lce_torch.linear_cross_entropy instead of materializing the logits; the
output's ``logits`` is None. Everything else is the model's own: the causal shift (or the
``shift_labels`` a caller passes), ``ignore_index`` (-100 unless given), Gemma's
``final_logit_softcapping``, and ``num_items_in_batch`` (the gradient-accumulation
normalization of recent transformers: the summed loss divided by it, as the Trainer passes
it). The plain forward runs, logits and all, when there are no labels, in eval mode (unless
``patch(model, in_eval=True)``), when ``logits_to_keep`` is set, or when a call passes
``skip_logits=False``; ``skip_logits=True`` asks for lce even in eval mode.

The LM head's loss is computed inside a call of the ``lm_head`` module, so module hooks on it
run as they do for the plain forward: FSDP2's ``fully_shard(model.lm_head)`` gathers the
weight for lce's forward and backward, and the gradient reaches the same parameter (tied
embeddings included).

Supported: the causal LMs of the Llama, Mistral, Qwen 2/2.5, Qwen 3, Gemma, Gemma 2, Gemma 3
(text) and Phi-3 families in transformers 5.x (tested with 5.25.0; see
examples/pytorch/tests/requirements-hf.txt). Any other class, or a supported class whose
``forward`` or ``loss_function`` was replaced, raises TypeError at ``patch`` time: the patch
never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["SUPPORTED", "is_patched", "patch", "unpatch"]

#: Class names of the causal LMs the patch supports; each computes
#: ``lm_head(decoder(...).last_hidden_state)``, an optional final-logit softcap, then
#: transformers' ForCausalLMLoss.
SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)

_MIN_TRANSFORMERS = (5, 0)

#: linear_cross_entropy options a caller may set through patch(); the model decides the rest
#: (softcap, ignore_index, the shift, the reduction, the bias).
_CALLER_OPTIONS = frozenset({
    "strategy", "memory_budget", "fp32_weight_grad", "grad_in_forward", "z_loss",
    "label_smoothing", "filter_eps", "check_targets",
})

_STATE = "_lce_patch"


@dataclasses.dataclass
class _PatchState:
    supported_class: type
    signature: inspect.Signature
    options: dict
    in_eval: bool


def _linear_cross_entropy():
    # Imported at call time: lce_torch's package import loads the compiled extension.
    from . import linear_cross_entropy

    return linear_cross_entropy


def _transformers_version() -> tuple:
    import transformers

    parts = []
    for piece in transformers.__version__.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _supported_class(model) -> type:
    """The supported transformers class model is an instance of, with its forward unchanged."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers.models."):
            if type(model).forward is not cls.forward:
                raise TypeError(
                    f"lce_torch.hf.patch: {type(model).__name__} overrides the forward of "
                    f"{cls.__name__}; the patch would replace code it does not know"
                )
            return cls
    raise TypeError(
        f"lce_torch.hf.patch: {type(model).__name__} is not supported (supported: "
        f"{', '.join(SUPPORTED)}); pass the causal LM itself, not a wrapper or a base model"
    )


def patch(model, *, in_eval: bool = False, **options):
    """Makes ``model`` (a supported transformers causal LM) compute its training loss with
    lce_torch.linear_cross_entropy, in place; returns the model.

    Args:
        model: an instance of one of :data:`SUPPORTED` (or a subclass that keeps its
            forward), not yet wrapped (patch before DDP/FSDP/torch.compile wrap it).
        in_eval: use lce in eval mode too (the output then has no logits); by default eval
            forwards keep the logits, which evaluation metrics usually need.
        **options: linear_cross_entropy options: strategy, memory_budget, fp32_weight_grad,
            grad_in_forward, z_loss, label_smoothing, filter_eps, check_targets. The softcap,
            ignore_index, the shift and the reduction come from the model and the call.

    Patching twice replaces the options; :func:`unpatch` restores the model.
    """
    if _transformers_version() < _MIN_TRANSFORMERS:
        import transformers

        raise TypeError(
            f"lce_torch.hf.patch: transformers {transformers.__version__} is not supported "
            f"(needs >= {'.'.join(map(str, _MIN_TRANSFORMERS))})"
        )
    unknown = set(options) - _CALLER_OPTIONS
    if unknown:
        raise TypeError(
            f"lce_torch.hf.patch: unknown or model-owned option(s) {sorted(unknown)}; the "
            f"options are {sorted(_CALLER_OPTIONS)}"
        )
    cls = _supported_class(model)
    if getattr(model, "_loss_function", None) is not None:
        raise TypeError(
            "lce_torch.hf.patch: the model has its own loss_function; the patch computes "
            "transformers' causal-LM cross-entropy only"
        )
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"lce_torch.hf.patch: {type(model).__name__}.lm_head is "
            f"{type(head).__name__}, not a Linear layer"
        )
    setattr(model, _STATE, _PatchState(cls, inspect.signature(cls.forward), dict(options),
                                       bool(in_eval)))
    model.forward = types.MethodType(_forward, model)
    head.forward = types.MethodType(_head_forward, head)
    return model


def unpatch(model):
    """Undoes :func:`patch` (a model that is not patched is returned unchanged)."""
    if getattr(model, _STATE, None) is None:
        return model
    delattr(model, _STATE)
    model.__dict__.pop("forward", None)
    model.lm_head.__dict__.pop("forward", None)
    return model


def is_patched(model) -> bool:
    return getattr(model, _STATE, None) is not None


def _head_forward(self, hidden: Tensor, *, lce_target: Optional[Tensor] = None,
                  lce_options: Optional[dict] = None) -> Tensor:
    """The patched lm_head: the plain linear layer, or with lce_target the loss of its
    logits (computed by lce without forming them)."""
    if lce_target is None:
        return F.linear(hidden, self.weight, self.bias)
    return _linear_cross_entropy()(hidden, self.weight, lce_target, self.bias, **lce_options)


def _plain(model, state: _PatchState, args, kwargs):
    return state.supported_class.forward(model, *args, **kwargs)


def _forward(self, *args, **kwargs):
    """The patched forward of a causal LM (see the module's docstring)."""
    state: _PatchState = getattr(self, _STATE)
    skip_logits = kwargs.pop("skip_logits", None)
    bound = state.signature.bind(self, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(state.signature.parameters)))  # self
    extra = {}
    for name, parameter in state.signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(named.pop(name, {}))
    labels = named.pop("labels", None)
    logits_to_keep = named.pop("logits_to_keep", 0)
    keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if skip_logits is None:
        use_lce = labels is not None and keeps_all and (self.training or state.in_eval)
    elif skip_logits:
        if labels is None or not keeps_all:
            raise ValueError(
                "lce_torch.hf: skip_logits=True needs labels and no logits_to_keep"
            )
        use_lce = True
    else:
        use_lce = False
    if not use_lce:
        return _plain(self, state, args, kwargs)

    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    # As the model's own forward does: every keyword (the loss's included) goes to the
    # decoder, which takes what it knows.
    outputs = self.model(**named, **extra)
    hidden = outputs.last_hidden_state
    loss = _loss(self, state, hidden, labels, extra)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {"loss": loss, "logits": None}
    for field in dataclasses.fields(CausalLMOutputWithPast):
        if field.name not in fields and hasattr(outputs, field.name):
            fields[field.name] = getattr(outputs, field.name)
    result = CausalLMOutputWithPast(**fields)
    return result if return_dict else result.to_tuple()


def _loss(model, state: _PatchState, hidden: Tensor, labels: Tensor, loss_kwargs: dict):
    """transformers' ForCausalLMLoss of lm_head(hidden) (after the model's softcap), by lce."""
    ignore_index = int(loss_kwargs.get("ignore_index", -100))
    shift_labels = loss_kwargs.get("shift_labels")
    num_items = loss_kwargs.get("num_items_in_batch")
    if shift_labels is not None:
        target, shift = shift_labels, False
    else:
        target, shift = labels, True
        if hidden.dim() != 3 or target.shape != hidden.shape[:2]:
            raise ValueError(
                f"lce_torch.hf: labels {tuple(target.shape)} must match the hidden states "
                f"{tuple(hidden.shape[:-1])} ([batch, sequence])"
            )
    target = target.to(hidden.device)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    options = dict(state.options)
    options.update(
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        softcap=softcap if softcap else None,
        shift=shift,
    )
    loss = model.lm_head(hidden, lce_target=target, lce_options=options)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss

