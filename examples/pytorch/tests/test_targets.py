"""check_targets: a scored target outside [0, V) that is not ignore_index must not pass
silently (lce's C++ API treats such a row as ignored; PyTorch's cross_entropy fails).

The check itself (lce_torch/_targets.py) is plain PyTorch and is tested on the CPU and, when
there is one, the GPU. The end-to-end tests call linear_cross_entropy on the GPU; the default
mode's failure is a device-side assertion, which ends the CUDA context, so it runs in a child
process.
"""

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

import lce_standin
from lce_standin import ON_GPU, PACKAGE_DIR

DEVICES = ["cpu"] + (["cuda"] if ON_GPU else [])
lce_torch = lce_standin.load()
targets = importlib.import_module("lce_torch._targets")

V = 50


def check(mode, t, ignore_index=-100, seq_len=0):
    targets._check_targets(targets._parse_check_targets(mode), t, V, ignore_index, seq_len)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [V, V + 7, -1, -101, 2**40])
def test_host_mode_counts_and_raises(device, bad):
    t = torch.randint(0, V, (4, 8), device=device)
    t[1, 3] = -100
    check("host", t.view(-1))  # every target valid or ignored: passes
    t[2, 5] = bad
    t[0, 1] = bad
    with pytest.raises(ValueError, match=r"2 scored target\(s\) lie outside \[0, 50\)"):
        check("host", t.view(-1))
    check("off", t.view(-1))  # no check


@pytest.mark.parametrize("device", DEVICES)
def test_shift_scores_only_the_next_tokens(device):
    """With the causal shift the first token of each sequence is never a target."""
    t = torch.randint(0, V, (3, 6), device=device)
    t[:, 0] = V + 1
    check("host", t.view(-1), seq_len=6)
    with pytest.raises(ValueError):
        check("host", t.view(-1), seq_len=0)
    t[1, 4] = V
    with pytest.raises(ValueError, match="1 scored"):
        check("host", t.view(-1), seq_len=6)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index(device):
    t = torch.randint(0, V, (16,), device=device)
    t[3] = V + 3
    check("host", t, ignore_index=V + 3)
    with pytest.raises(ValueError):
        check("host", t, ignore_index=-100)


def test_device_mode_on_cpu_raises_at_once():
    """On the CPU, torch._assert_async fails synchronously (on CUDA it is a device assert)."""
    t = torch.tensor([1, 2, V])
    check("device", torch.tensor([1, 2, -100]))
    with pytest.raises(RuntimeError):
        check("device", t)


def test_modes_parse():
    assert targets._parse_check_targets(True) == "device"
    assert targets._parse_check_targets(False) == "off"
    for bad in ("yes", None, 2.5, "Device"):
        with pytest.raises(ValueError, match="check_targets must be"):
            targets._parse_check_targets(bad)


def test_compiles_without_graph_breaks():
    """The default mode is what a torch.compile'd training step runs: no graph break."""
    def step(t):
        check("device", t)
        return t + 1

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.tensor([1, 2, 3])), torch.tensor([2, 3, 4]))


# ------------------------------------------------------------------------------------------
# End to end, on the GPU


gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


@gpu
def test_linear_cross_entropy_modes():
    x = torch.randn(8, 32, device="cuda")
    w = torch.randn(V, 32, device="cuda")
    t = torch.full((8,), V, device="cuda")
    assert lce_torch.linear_cross_entropy(x, w, t, check_targets="off").item() == 0.0
    with pytest.raises(ValueError, match="8 scored"):
        lce_torch.linear_cross_entropy(x, w, t, check_targets="host")
    with pytest.raises(ValueError, match="8 scored"):
        lce_torch.LinearCrossEntropy(check_targets="host")(x, w, t)
    with pytest.raises(ValueError, match="8 scored"):
        lce_torch.linear_cross_entropy_forward_backward_into(
            x, w, t, dx=torch.empty_like(x), check_targets="host")
    t[:] = 3
    assert torch.isfinite(lce_torch.linear_cross_entropy(x, w, t))  # default, valid: passes
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("bad", ["V", "-1"])
def test_default_mode_fails_like_pytorch(bad):
    """`linear_cross_entropy(x, w, full(t, V))` used to return 0.0: now a device assert (the
    child process dies with CUDA's error), as F.cross_entropy's own on CUDA."""
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(PACKAGE_DIR)!r})
        import lce_torch
        V = {V}
        x = torch.randn(8, 32, device="cuda")
        w = torch.randn(V, 32, device="cuda")
        t = torch.full((8,), {bad}, device="cuda")
        loss = lce_torch.linear_cross_entropy(x, w, t)
        print("loss", loss.item())
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode != 0, f"no failure: {child.stdout}"
    assert "loss" not in child.stdout
    assert "assert" in (child.stderr + child.stdout).lower(), child.stderr[-2000:]
