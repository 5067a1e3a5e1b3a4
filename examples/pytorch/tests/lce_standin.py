"""lce_torch for the tests that also run without a GPU.

With a CUDA device, `load()` imports the real package (building the extension in place or by
JIT as usual). Without one, the package's __init__ (which loads the CUDA extension) is not run:
a stand-in module takes its place whose `linear_cross_entropy` is `reference` below, and the
pure-Python submodules (hf.py, _targets.py) import from the real sources under it. Tests that
use the stand-in check their own wiring (a patch, a distributed wrapper), never lce's kernels.
"""

import pathlib
import sys
import types

import torch
import torch.nn.functional as F

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]  # examples/pytorch
ON_GPU = torch.cuda.is_available()


def reference(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
              softcap=None, shift=False, label_smoothing=0.0, z_loss=0.0, temperature=1.0,
              **unused):
    """What lce_torch.linear_cross_entropy computes, with materialized fp32 logits."""
    z = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    z = z / temperature
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if shift:
        pad = torch.full_like(target[..., :1], ignore_index)
        target = torch.cat([target[..., 1:], pad], dim=-1)
    lead = target.shape
    z, target = z.reshape(-1, z.shape[-1]), target.reshape(-1)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = target != ignore_index
        term = z_loss * torch.logsumexp(z, -1) ** 2 * valid
        if reduction == "mean":
            term = term.sum() / valid.sum().clamp(min=1)
        elif reduction == "sum":
            term = term.sum()
        loss = loss + term
    return loss.reshape(lead) if reduction == "none" else loss


def load():
    """The lce_torch package: the real one on a GPU machine, else the stand-in."""
    if ON_GPU:
        if str(PACKAGE_DIR) not in sys.path:
            sys.path.insert(0, str(PACKAGE_DIR))
        import lce_torch

        return lce_torch
    stub = sys.modules.get("lce_torch")
    if stub is None:
        stub = types.ModuleType("lce_torch")
        stub.__path__ = [str(PACKAGE_DIR / "lce_torch")]
        stub.linear_cross_entropy = reference
        stub.is_standin = True
        sys.modules["lce_torch"] = stub
    return stub
