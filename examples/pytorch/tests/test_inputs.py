"""The input checks every entry point shares (lce_torch/_inputs.py), on meta tensors: they run
without a GPU, and the extension is not needed (tests/lce_standin.py)."""

import importlib

import pytest
import torch

import lce_standin

lce_standin.load()
inputs = importlib.import_module("lce_torch._inputs")
META = torch.device("meta")


def make(n=12, d=16, v=50, dtype=torch.bfloat16, lead=None):
    x = torch.empty(*(lead or (n,)), d, device=META, dtype=dtype)
    w = torch.empty(v, d, device=META, dtype=dtype)
    t = torch.empty(*(lead or (n,)), device=META, dtype=torch.int64)
    return x, w, t


def test_normalizes():
    x, w, t = make(lead=(3, 4))
    p = inputs.prepare(x, w, None, t.int(), torch.ones(50), True)
    assert p.x.shape == (12, 16) and p.lead == (3, 4) and p.seq_len == 4
    assert p.target.dtype == torch.int64 and p.target.shape == (12,)
    assert p.class_weight.dtype == torch.float32 and p.class_weight.device == META
    assert inputs.prepare(x, w, None, t, None, 6).seq_len == 6
    assert inputs.prepare(x, w, None, t, None, False).seq_len == 0
    # A transposed weight is copied to rows lce can read; a row-strided slice is not.
    wt = torch.empty(16, 50, device=META, dtype=torch.bfloat16).t()
    assert inputs.prepare(x, wt, None, t, None, False).weight.stride() == (16, 1)
    wide = torch.empty(50, 24, device=META, dtype=torch.bfloat16)[:, :16]
    assert inputs.prepare(x, wide, None, t, None, False).weight.stride() == (24, 1)


@pytest.mark.parametrize("shard", [False, True])
def test_errors_name_the_argument(shard):
    who = "lce_torch.distributed" if shard else "lce_torch"
    weight = "weight_shard" if shard else "weight"
    x, w, t = make()

    def call(*args, **kwargs):
        return inputs.prepare(*args, who=who, shard=shard, **kwargs)

    with pytest.raises(ValueError, match=f"^{who}: x must be a CUDA tensor"):
        call(torch.empty(12, 16), w, None, t, None, False)
    with pytest.raises(TypeError, match=f"x and {weight} must be tensors"):
        call(x, None, None, t, None, False)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        call(x, torch.empty(50, 8, device=META, dtype=torch.bfloat16), None, t, None, False)
    with pytest.raises(TypeError, match="one dtype"):
        call(x, w.float(), None, t, None, False)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        call(x.double(), w.double(), None, t, None, False)
    bias = "bias_shard" if shard else "bias"
    with pytest.raises(ValueError, match=f"{bias} must be \\[50\\]"):
        call(x, w, torch.empty(3, device=META, dtype=torch.bfloat16), t, None, False)
    with pytest.raises(TypeError, match="int64"):
        call(x, w, None, t.float(), None, False)
    with pytest.raises(ValueError, match="shift"):
        call(x, w, None, t, None, -2)
    if not shard:  # the distributed function checks these against the gathered rows and V
        with pytest.raises(ValueError, match="target must have one id per row"):
            call(x, w, None, t[:5], None, False)
        with pytest.raises(ValueError, match="class_weight must be \\[50\\]"):
            call(x, w, None, t, torch.ones(7), False)
        with pytest.raises(ValueError, match="divisor of the 12 rows"):
            call(x, w, None, t, None, 5)
    else:
        call(x, w, None, t[:5], torch.ones(7), 5)  # left to the caller
