"""The checks and normalization of the inputs every lce_torch entry point shares (the single-GPU
functions and lce_torch.distributed). Pure PyTorch, apart from the extension, so that it runs
anywhere."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

# Devices the operators have kernels for: CUDA, and meta (shape inference through the fake
# implementations).
DEVICE_TYPES = ("cuda", "meta")


def rows(t: Tensor) -> Tensor:
    """t as [rows, cols] with unit column stride and non-overlapping rows, copying only when
    lce could not read it with a row stride (a transposed or broadcast view)."""
    if (t.shape[1] <= 1 or t.stride(1) == 1) and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


class Prepared(NamedTuple):
    x: Tensor  # [n, D], rows lce can read
    weight: Tensor  # [rows, D]
    bias: Optional[Tensor]
    target: Tensor  # [n] int64 (with a shard: this rank's rows or the gathered ones)
    class_weight: Optional[Tensor]  # fp32
    lead: tuple  # x's leading shape
    seq_len: int  # the causal shift's sequence length, 0: off


def prepare(x, weight, bias, target, class_weight, shift, *, who: str = "lce_torch",
            shard: bool = False) -> Prepared:
    """Checks the inputs and brings them to what the operators take. `who` prefixes the
    messages. With `shard` (lce_torch.distributed): the weight and bias are this rank's rows
    (named weight_shard, bias_shard), and the target's length, the class weights' (global V)
    and the shift's divisibility are checked by the caller, which knows the gathered rows."""
    weight_name, bias_name = ("weight_shard", "bias_shard") if shard else ("weight", "bias")
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{who}: x and {weight_name} must be tensors")
    if x.device.type not in DEVICE_TYPES:
        raise ValueError(f"{who}: x must be a CUDA tensor, got device {x.device}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"{who}: x must be [..., D] and {weight_name} [{'rows' if shard else 'V'}, D], got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who}: x is {tuple(x.shape)} and {weight_name} {tuple(weight.shape)}: the hidden "
            "sizes differ"
        )
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # Under autocast, compute in autocast's dtype as F.linear would (the casts are
        # recorded by autograd, so fp32 parameters get fp32 gradients).
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"{who}: x, {weight_name} and {bias_name} must have one dtype (float32, float16 or "
            f"bfloat16), got {x.dtype}, {weight.dtype}"
            + (f", {bias.dtype}" if bias is not None else "")
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{who}: dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{who}: {bias_name} must be [{weight.shape[0]}]"
            + (" (this rank's rows)" if shard else "") + f", got {tuple(bias.shape)}"
        )
    if not isinstance(target, Tensor):
        raise TypeError(f"{who}: target must be a tensor")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{who}: target must be int64 (or int32), got {target.dtype}")
    lead = tuple(x.shape[:-1])
    x2 = rows(x.reshape(-1, x.shape[-1]))
    n = x2.shape[0]
    if not shard and target.numel() != n:
        raise ValueError(
            f"{who}: target must have one id per row of x ({lead}), got {tuple(target.shape)}"
        )
    target2 = target.reshape(-1)
    if target2.dtype != torch.int64:
        target2 = target2.long()
    if class_weight is not None:
        if not shard and class_weight.shape != (weight.shape[0],):
            raise ValueError(
                f"{who}: class_weight must be [{weight.shape[0]}], got "
                f"{tuple(class_weight.shape)}"
            )
        class_weight = class_weight.to(device=x.device, dtype=torch.float32)
    if shift is True:
        if x.dim() < 2:
            raise ValueError(f"{who}: shift=True needs x of shape [B, T, D] or [T, D]")
        seq_len = x.shape[-2]
    elif shift is False or shift is None:
        seq_len = 0
    else:
        seq_len = int(shift)
        if seq_len <= 0 or (not shard and n % seq_len != 0):
            raise ValueError(
                f"{who}: shift={shift} must be a positive"
                + ("" if shard else f" divisor of the {n} rows of x")
            )
    return Prepared(x2, rows(weight), bias, target2, class_weight, lead, seq_len)
