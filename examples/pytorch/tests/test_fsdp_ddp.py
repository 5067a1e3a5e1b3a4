"""lce_torch inside DistributedDataParallel and FSDP2 (fully_shard): a tiny LM trained for a
few steps with lce's loss must have the gradients and parameters of the same model trained
without wrapping, on the whole batch, with F.cross_entropy.

Written for any world size: under torchrun each process takes its rank's rows of the global
batch (`torchrun --nproc_per_node=2 -m pytest examples/pytorch/tests/test_fsdp_ddp.py`);
launched by plain pytest, the test makes a process group of one rank itself. NCCL on a GPU;
without one, gloo on the CPU with the PyTorch stand-in for lce (tests/lce_standin.py), which
checks the wrapping and the comparison, not lce.
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lce_standin
from lce_standin import ON_GPU

lce_torch = lce_standin.load()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

VOCAB, DIM, SEQ, BATCH_PER_RANK, STEPS = 1031, 64, 24, 2, 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group():
    """The default process group: torchrun's, or one of a single rank made here."""
    made_here = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if ON_GPU:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if ON_GPU else "gloo")
        made_here = True
    yield dist.group.WORLD
    if made_here:
        dist.destroy_process_group()


class HeadLoss(nn.Module):
    """The LM head as a module whose forward is the loss: FSDP2's hooks on it gather the
    weight around lce's forward and backward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, DIM) * DIM**-0.5)

    def forward(self, hidden, tokens, use_lce=True):
        if use_lce:
            return lce_torch.linear_cross_entropy(hidden, self.weight, tokens, shift=True)
        logits = F.linear(hidden, self.weight).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(),
                          nn.Linear(2 * DIM, DIM)) for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.head = HeadLoss()

    def forward(self, tokens, use_lce=True):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h), tokens, use_lce)


def batches(world, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH_PER_RANK * world, SEQ), generator=g).to(DEVICE)
            for _ in range(STEPS)]


def reference_run(model, data):
    """The unwrapped model on the whole batch, F.cross_entropy: losses, grads, parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    for tokens in data:
        optimizer.zero_grad()
        loss = model(tokens, use_lce=False)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        optimizer.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def check_run(wrapped, reference, data, rank, world, what):
    ref_losses, ref_grads, ref_params = reference
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    for step, tokens in enumerate(data):
        mine = tokens[rank * BATCH_PER_RANK:(rank + 1) * BATCH_PER_RANK]
        optimizer.zero_grad()
        loss = wrapped(mine)
        loss.backward()
        # Every row is valid, so the mean of the ranks' means is the global mean.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world
        assert abs(global_loss.item() - ref_losses[step]) <= 1e-5 * abs(ref_losses[step]), \
            f"{what} step {step}: loss {global_loss.item()} vs {ref_losses[step]}"
        for name, p in wrapped.named_parameters():
            key = name.replace("module.", "")
            error = rel(full(p.grad), ref_grads[step][key])
            assert error <= 1e-4, f"{what} step {step} {key}: gradient error {error:.2e}"
        optimizer.step()
    for name, p in wrapped.named_parameters():
        key = name.replace("module.", "")
        assert rel(full(p), ref_params[key]) <= 1e-4, f"{what}: parameter {key} after training"


def test_ddp(group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)  # one initial model on every rank
    model = TinyLM().to(DEVICE)
    data = batches(world, 99)
    reference = reference_run(copy.deepcopy(model), data)
    ddp = DDP(model, device_ids=[torch.cuda.current_device()] if ON_GPU else None)
    check_run(ddp, reference, data, rank, world, "DDP")


@pytest.mark.parametrize("head_sharded", [False, True], ids=["root", "per_module"])
def test_fsdp2(group, head_sharded):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(4321)
    model = TinyLM().to(DEVICE)
    data = batches(world, 7)
    reference = reference_run(copy.deepcopy(model), data)
    mesh = init_device_mesh(DEVICE.type, (world,))
    if head_sharded:  # the head its own FSDP unit: lce must see the gathered weight
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    check_run(model, reference, data, rank, world, f"FSDP2 ({'per module' if head_sharded else 'root'})")
