"""pytest hooks and fixtures of lce_torch's tests: no TF32 in any test, a fresh seed per test
(LCE_TEST_SEED=<n> replays one), and a summary of the measured relative errors.

Every comparison against the fp64 reference is recorded (test_lce_torch.record); at the end
of the session the largest error per (check, dtype, quantity) is printed, for lce and for
PyTorch computing in the same dtype, so that the closing note of a GPU run can quote them.
"""

import collections
import os
import random

import pytest
import torch

ERRORS = []  # (check, dtype, quantity, lce error, torch-at-dtype error or None)


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 anywhere (the fp32 baselines and the references must be exact fp32/fp64)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def seed():
    """A fresh seed every run (LCE_TEST_SEED=<n> replays one), set as torch's."""
    value = int(os.environ.get("LCE_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    return value


def pytest_terminal_summary(terminalreporter):
    if not ERRORS:
        return
    worst = collections.OrderedDict()
    for check, dtype, quantity, lce_error, torch_error in ERRORS:
        key = (check, dtype, quantity)
        lce_max, torch_max = worst.get(key, (0.0, None))
        if torch_error is not None:
            torch_max = torch_error if torch_max is None else max(torch_max, torch_error)
        worst[key] = (max(lce_max, lce_error), torch_max)
    write = terminalreporter.write_line
    terminalreporter.section("lce_torch: largest relative error vs the fp64 reference")
    write(f"{'check':<22} {'dtype':<9} {'quantity':<15} {'lce':>10} {'torch@dtype':>12}")
    for (check, dtype, quantity), (lce_max, torch_max) in worst.items():
        torch_text = "-" if torch_max is None else f"{torch_max:.2e}"
        write(f"{check:<22} {dtype:<9} {quantity:<15} {lce_max:>10.2e} {torch_text:>12}")
