"""The check of the targets that lce alone would treat as ignored (linear_cross_entropy's
check_targets). Pure PyTorch, apart from the extension, so that it runs anywhere."""

from __future__ import annotations

import torch
from torch import Tensor

_CHECK_TARGETS = {"device": "device", True: "device", "host": "host", "off": "off", False: "off"}


def _parse_check_targets(check_targets) -> str:
    try:
        return _CHECK_TARGETS[check_targets]
    except (KeyError, TypeError):
        raise ValueError(
            "lce_torch: check_targets must be 'device', 'host' or 'off' (True/False), got "
            f"{check_targets!r}"
        ) from None


def _check_targets(mode: str, target: Tensor, v: int, ignore_index: int, seq_len: int) -> None:
    """Fails on a scored target outside [0, v) that is not ignore_index (PyTorch's
    cross_entropy fails on it too; lce alone would treat it as ignored).

    'device': a device-side assertion (torch._assert_async): no host synchronization, legal
    under CUDA graph capture and torch.compile; like F.cross_entropy on CUDA, a failure is a
    device-side assert that ends the process's CUDA context. 'host': counts the bad targets,
    copies the count to the host (a synchronization) and raises ValueError with it; not under
    graph capture. 'off': no check (the targets are treated as ignored, as lce's C++ API does).
    """
    if mode == "off" or target.device.type == "meta" or target.numel() == 0:
        return
    scored = target.view(-1, seq_len)[:, 1:] if seq_len else target
    bad = (scored != ignore_index) & ((scored < 0) | (scored >= v))
    if mode == "device":
        torch._assert_async(
            torch.logical_not(bad.any()),
            "lce_torch: a target is outside [0, V) and not ignore_index",
        )
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "lce_torch: check_targets='host' reads a count on the host, which CUDA graph "
            "capture forbids; use check_targets='device' (or 'off')"
        )
    count = int(bad.sum().item())
    if count:
        raise ValueError(
            f"lce_torch: {count} scored target(s) lie outside [0, {v}) and are not "
            f"ignore_index ({ignore_index}): a vocabulary mismatch between the data and the head?"
        )
