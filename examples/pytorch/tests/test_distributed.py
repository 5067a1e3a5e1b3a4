"""GPU tests of lce_torch.distributed: the vocabulary-parallel loss over torch.distributed.

The world comes from torchrun (RANK, WORLD_SIZE, LOCAL_RANK: one process per GPU); run plainly,
the tests make a one-rank NCCL process group themselves (MASTER_ADDR=127.0.0.1, a free port),
so they also run on one GPU:

    python -m pytest examples/pytorch/tests/test_distributed.py -q -rs
    torchrun --nproc_per_node=2 -m pytest examples/pytorch/tests/test_distributed.py -q -rs

Every rank builds the full head W [V, D] (and bias, class weights, x, targets) from one seed,
chosen by rank 0 and broadcast (LCE_TEST_SEED=<n> replays one), and takes its shard; the
vocabulary-parallel call is compared with lce_torch.linear_cross_entropy on the full head (itself
tested against an fp64 reference in test_lce_torch.py): the loss, every per-token output, dX (or
this rank's rows of it with sequence parallelism) and this rank's rows of dW and db, with the
library's tolerances; the loss and the per-token outputs must also be bitwise identical on every
rank. Skipped without CUDA, without NCCL in the extension, or without torch.distributed.
"""

import os
import pathlib
import random
import socket
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("lce_torch needs a CUDA device; none is available", allow_module_level=True)

import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_nccl_available():
    pytest.skip("torch.distributed with NCCL is not available", allow_module_level=True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # examples/pytorch
import lce_torch  # noqa: E402
import lce_torch.distributed as lced  # noqa: E402

if not lced.is_available():
    pytest.skip("lce_torch was built without NCCL (no vocabulary-parallel operators)",
                allow_module_level=True)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def loss_tolerance(dtype):
    return 2e-5 if dtype == torch.float32 else 1e-4


def grad_tolerance(dtype):
    return 2e-5 if dtype == torch.float32 else 1e-2


# ------------------------------------------------------------------------------------------
# The process group


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world():
    """(rank, world size, device): torchrun's group, or a one-rank NCCL group made here."""
    created = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                pytest.skip(f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
            torch.cuda.set_device(0)
            dist.init_process_group("nccl", rank=0, world_size=1,
                                    device_id=torch.device("cuda", 0))
        created = True
    yield dist.get_rank(), dist.get_world_size(), torch.device("cuda", torch.cuda.current_device())
    lced.destroy_communicators()
    if created:
        dist.destroy_process_group()


@pytest.fixture
def seed(world):
    """One seed for every rank: rank 0's (fresh every run, or LCE_TEST_SEED)."""
    value = [int(os.environ.get("LCE_TEST_SEED", random.randrange(2**31)))]
    dist.broadcast_object_list(value, src=0)
    return value[0]


# ------------------------------------------------------------------------------------------
# Data


def shard_sizes(v, ranks, uneven):
    """Row counts of the ranks' shards: torch.chunk-like even ones, or sizes proportional to
    rank + 1 (the last rank takes the remainder), none empty."""
    if not uneven:
        return [v // ranks + (1 if r < v % ranks else 0) for r in range(ranks)]
    total = ranks * (ranks + 1) // 2
    sizes = [max(1, v * (r + 1) // total) for r in range(ranks - 1)]
    return sizes + [v - sum(sizes)]


def make_problem(seed, lead, d, v, dtype, device, *, bias=False, class_weight=False,
                 ignore_fraction=0.0, ignore_index=-100):
    """The same full problem on every rank (drawn on the CPU from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    scale = d ** -0.25
    x = (torch.randn(*lead, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) * scale).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    cw = torch.rand(v, generator=g) + 0.5 if class_weight else None
    y = torch.randint(0, v, tuple(lead), generator=g)
    if ignore_fraction > 0:
        y[torch.rand(tuple(lead), generator=g) < ignore_fraction] = ignore_index
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return to(x), to(w), to(b), to(cw), to(y)


def upstream_of(loss, seed):
    """A random upstream gradient (scalar, or per token for 'none'), the same on every rank."""
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(tuple(loss.shape), generator=g) + 0.5).to(loss.device)


def rel(value, ref):
    value = value.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert value.shape == ref.shape, f"shape {tuple(value.shape)} != {tuple(ref.shape)}"
    denom = ref.norm().item()
    diff = (value - ref).norm().item()
    return diff / denom if denom > 0 else diff


def leaf(t):
    return t.detach().clone().requires_grad_() if t is not None else None


def check_identical_on_ranks(tensors, context):
    """Each tensor must be bitwise the same on every rank."""
    ranks = dist.get_world_size()
    if ranks == 1:
        return
    for name, t in tensors.items():
        t = t.detach().reshape(-1).contiguous()
        gathered = [torch.empty_like(t) for _ in range(ranks)]
        dist.all_gather(gathered, t)
        for r, other in enumerate(gathered):
            assert torch.equal(other, t), f"{name} differs between this rank and rank {r} {context}"


OUTPUT_FIELDS = ("lse", "z_loss", "token_loss", "entropy", "target_logprob")


def compare(world, seed, dtype, *, lead=(96,), d=64, v=1037, uneven=False, explicit_range=None,
            bias=False, class_weight=False, ignore_fraction=0.0, ignore_index=-100,
            sequence_parallel=False, local_targets=True, returns=(), **options):
    """Runs the vocabulary-parallel function and linear_cross_entropy on the full head with the
    same options and upstream gradient; checks the loss, the outputs and the gradients."""
    rank, ranks, device = world
    x, w, b, cw, y = make_problem(seed, lead, d, v, dtype, device, bias=bias,
                                  class_weight=class_weight, ignore_fraction=ignore_fraction,
                                  ignore_index=ignore_index)
    sizes = shard_sizes(v, ranks, uneven)
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    flags = {f"return_{name}": True for name in returns}
    context = (f"[{DTYPE_NAMES[dtype]}, seed {seed}, rank {rank}/{ranks}, shard "
               f"[{start}, {end}) of {v}, options {options} {returns}, sp={sequence_parallel}]")

    # The reference: the single-GPU call on the full head.
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    ref = lce_torch.linear_cross_entropy(xr, wr, y, br, ignore_index=ignore_index,
                                         class_weight=cw, **options, **flags)
    ref_loss = ref.loss if returns else ref
    upstream = upstream_of(ref_loss, seed)
    (ref_loss * upstream).sum().backward()

    # The vocabulary-parallel call on this rank's rows.
    if sequence_parallel:
        assert lead[0] % ranks == 0, "the gathered rows must split into the ranks' parts"
        part = lead[0] // ranks
        x_in = x[rank * part:(rank + 1) * part]
        y_in = y[rank * part:(rank + 1) * part] if local_targets else y
    else:
        x_in, y_in = x, y
    xs, ws = leaf(x_in), leaf(w[start:end])
    bs = leaf(b[start:end]) if b is not None else None
    # Uneven shards pass their range by default, even ones derive it (vocab_range).
    explicit = uneven if explicit_range is None else explicit_range
    range_args = dict(vocab_start=start, vocab_size=v) if explicit else {}
    got = lced.vocab_parallel_linear_cross_entropy(
        xs, ws, y_in, bs, ignore_index=ignore_index, class_weight=cw,
        sequence_parallel=sequence_parallel, **range_args, **options, **flags)
    loss = got.loss if returns else got
    (loss * upstream).sum().backward()

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape, context
    error = rel(loss, ref_loss)
    assert error <= loss_tolerance(dtype), f"loss: relative error {error:.3e} {context}"
    identical = {"loss": loss}
    if returns:
        for name in OUTPUT_FIELDS:
            r, g = getattr(ref, name), getattr(got, name)
            assert (r is None) == (g is None), f"{name} {context}"
            if r is not None:
                error = rel(g, r)
                assert error <= loss_tolerance(dtype), \
                    f"{name}: relative error {error:.3e} {context}"
                identical[name] = g
        if ref.argmax is not None:
            mismatched = (got.argmax != ref.argmax).sum().item()
            # Near-ties may resolve differently after reassociation; allow one row in 16-bit.
            assert mismatched <= (0 if dtype == torch.float32 else 1), \
                f"argmax differs in {mismatched} rows {context}"
            identical["argmax"] = got.argmax
        if ref.correct is not None:
            assert abs(got.correct.item() - ref.correct.item()) <= \
                (0 if dtype == torch.float32 else 1), f"correct {context}"
            assert abs(got.accuracy.item() - ref.accuracy.item()) <= 1e-2, f"accuracy {context}"
            identical["correct"] = got.correct
    check_identical_on_ranks(identical, context)

    dx_ref = xr.grad
    if sequence_parallel:
        dx_ref = dx_ref[rank * part:(rank + 1) * part]
    grads = [("dx", xs.grad, dx_ref), ("dw", ws.grad, wr.grad[start:end])]
    if b is not None:
        grads.append(("db", bs.grad, br.grad[start:end]))
    for name, g, r in grads:
        assert g is not None, f"{name} missing {context}"
        assert g.dtype == dtype and g.shape == r.shape, f"{name} {g.dtype} {g.shape} {context}"
        assert torch.isfinite(g).all(), f"{name} is not finite {context}"
        error = rel(g, r)
        assert error <= grad_tolerance(dtype), f"{name}: relative error {error:.3e} {context}"
    if not sequence_parallel:
        check_identical_on_ranks({"dx": xs.grad}, context)
    return got


# ------------------------------------------------------------------------------------------
# Every option, even and uneven shards

CASES = {
    "default": dict(),
    "bias": dict(bias=True),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3, returns=("z_loss",)),
    "softcap": dict(softcap=5.0),
    "temperature": dict(temperature=1.5),
    "class_weight": dict(class_weight=True),
    "weighted_smoothing": dict(class_weight=True, label_smoothing=0.2),
    "ignore_index": dict(ignore_fraction=0.2),
    "ignore_in_vocab": dict(ignore_fraction=0.2, ignore_index=3),
    "all_ignored": dict(ignore_fraction=1.1),
    "shift": dict(lead=(4, 24), shift=True),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none", returns=("z_loss",), z_loss=1e-3),
    "outputs": dict(returns=("lse", "token_loss", "argmax", "accuracy", "entropy",
                             "target_logprob", "z_loss"), z_loss=1e-4, ignore_fraction=0.1),
    "outputs_none": dict(reduction="none", returns=("lse", "argmax", "entropy",
                                                    "target_logprob")),
    "vocab_chunked": dict(strategy="vocab_chunked", memory_budget=96 * 1024),
    "row_chunked": dict(strategy="row_chunked", memory_budget=64 * 1024),
    "stored": dict(strategy="stored"),
    "stored_options": dict(strategy="stored", lead=(4, 24), shift=True, label_smoothing=0.1,
                           z_loss=1e-3, softcap=20.0, temperature=0.8, ignore_fraction=0.1,
                           returns=("lse", "z_loss", "accuracy")),
    "stored_fp32_weight_grad": dict(strategy="stored", fp32_weight_grad=True,
                                    reduction="sum"),
    "fp32_weight_grad": dict(fp32_weight_grad=True, bias=True),
    "grad_in_forward": dict(grad_in_forward=True, bias=True, label_smoothing=0.1),
    "filter_eps": dict(filter_eps=2.0**-12),
    "everything": dict(lead=(4, 24), shift=True, bias=True, class_weight=True,
                       label_smoothing=0.1, z_loss=1e-3, softcap=20.0, temperature=0.8,
                       ignore_fraction=0.1, returns=("lse", "z_loss", "accuracy")),
}


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_gpu(world, seed, case, dtype, uneven):
    compare(world, seed, dtype, uneven=uneven, **CASES[case])


@pytest.mark.parametrize("case", ["default", "everything"])
def test_fp16(world, seed, case):
    compare(world, seed, torch.float16, **CASES[case])


def test_uneven_derived_range(world, seed):
    """Uneven shards with the range derived from the row counts (an all-gather)."""
    compare(world, seed, torch.float32, uneven=True, explicit_range=False, bias=True)


def test_even_explicit_range(world, seed):
    compare(world, seed, torch.bfloat16, explicit_range=True, label_smoothing=0.1)


def test_shapes(world, seed):
    """Rows not a multiple of the tiles, one row, a vocabulary smaller than a tile per rank."""
    _, ranks, _ = world
    compare(world, seed, torch.float32, lead=(1,), d=40, v=7 * ranks)
    compare(world, seed, torch.bfloat16, lead=(131,), d=72, v=301 * ranks + 5, uneven=True)


# ------------------------------------------------------------------------------------------
# Sequence parallelism: dX reduce-scattered


@pytest.mark.parametrize("local_targets", [True, False], ids=["local_targets", "full_targets"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sequence_parallel(world, seed, dtype, local_targets):
    _, ranks, _ = world
    compare(world, seed, dtype, lead=(24 * ranks,), sequence_parallel=True,
            local_targets=local_targets, bias=True, label_smoothing=0.1, ignore_fraction=0.1)


@pytest.mark.parametrize("case", ["none", "grad_in_forward", "outputs", "stored"])
def test_sequence_parallel_options(world, seed, case):
    _, ranks, _ = world
    options = dict(CASES[case])
    compare(world, seed, torch.float32, **{**options, "lead": (16 * ranks,)},
            sequence_parallel=True)


def test_sequence_parallel_shift(world, seed):
    """Whole sequences per rank ([B/k, T, D]) gathered along the batch, shifted by T."""
    _, ranks, _ = world
    compare(world, seed, torch.bfloat16, lead=(2 * ranks, 20), shift=True,
            sequence_parallel=True, uneven=True)


# ------------------------------------------------------------------------------------------
# Module, communicators, DTensor, errors


def test_module(world, seed):
    rank, ranks, device = world
    v, d = 515, 32
    x, w, b, cw, y = make_problem(seed, (40,), d, v, torch.float32, device, class_weight=True)
    sizes = shard_sizes(v, ranks, True)
    start = sum(sizes[:rank])
    shard = w[start:start + sizes[rank]]
    head = lced.VocabParallelLinearCrossEntropy(label_smoothing=0.1, class_weight=cw)
    first = head(x, shard, y)
    assert head.shard_range(shard) == (start, v)  # derived once, then cached
    again = head(x, shard, y)
    ref = lce_torch.linear_cross_entropy(x, w, y, class_weight=cw, label_smoothing=0.1)
    assert torch.equal(first, again)
    assert rel(first, ref) <= loss_tolerance(torch.float32)
    assert "sequence_parallel=False" in repr(head)
    out = head(x, shard, y, return_lse=True)
    assert out.lse.shape == (40,)


def test_communicator_cached_and_destroyed(world):
    _, ranks, device = world
    first = lced.communicator()
    assert lced.communicator(None, device) is first
    assert first.ranks == ranks and first.device == device.index
    lced.destroy_communicators()
    second = lced.communicator()  # a fresh one, made collectively again
    assert second.ranks == ranks


def test_subgroup(world, seed):
    """A group made with new_group (every rank, as in tensor parallelism of the whole world)."""
    _, ranks, _ = world
    group = dist.new_group(list(range(ranks)))
    rank, _, device = world
    v, d = 257, 32
    x, w, _, _, y = make_problem(seed, (33,), d, v, torch.float32, device)
    sizes = shard_sizes(v, ranks, False)
    start = sum(sizes[:rank])
    loss = lced.vocab_parallel_linear_cross_entropy(x, w[start:start + sizes[rank]], y,
                                                    group=group)
    ref = lce_torch.linear_cross_entropy(x, w, y)
    assert rel(loss, ref) <= loss_tolerance(torch.float32)
    lced.destroy_communicators(group)


def test_dtensor_weight(world, seed):
    """TorchTitan's head: a DTensor sharded Shard(0) on a 1-D mesh (torch.chunk's sizes)."""
    tensor_api = pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.device_mesh import init_device_mesh

    rank, ranks, device = world
    v, d = 301, 48
    x, w, _, _, y = make_problem(seed, (37,), d, v, torch.float32, device)
    mesh = init_device_mesh("cuda", (ranks,))
    w_dt = tensor_api.distribute_tensor(w, mesh, [tensor_api.Shard(0)])
    w_param = torch.nn.Parameter(w_dt)
    loss = lced.vocab_parallel_linear_cross_entropy(x, w_param, y)
    loss.backward()
    wr = leaf(w)
    ref = lce_torch.linear_cross_entropy(x, wr, y)
    ref.backward()
    assert rel(loss, ref) <= loss_tolerance(torch.float32)
    local = w_param.grad.to_local()
    rows = w_dt.to_local().shape[0]
    start = sum(shard_sizes_chunk(v, ranks)[:rank])
    assert local.shape[0] == rows
    assert rel(local, wr.grad[start:start + rows]) <= grad_tolerance(torch.float32)


def shard_sizes_chunk(v, ranks):
    """torch.chunk's sizes (DTensor's Shard(0)): ceil(v / ranks) each, the last ones smaller."""
    return [t.numel() for t in torch.arange(v).chunk(ranks)]


def test_no_grad(world, seed):
    rank, ranks, device = world
    x, w, _, _, y = make_problem(seed, (50,), 32, 200, torch.bfloat16, device)
    sizes = shard_sizes(200, ranks, False)
    start = sum(sizes[:rank])
    with torch.no_grad():
        loss = lced.vocab_parallel_linear_cross_entropy(x, w[start:start + sizes[rank]], y)
    ref = lce_torch.linear_cross_entropy(x, w, y)
    assert rel(loss, ref) <= loss_tolerance(torch.bfloat16)


def test_errors(world):
    rank, ranks, device = world
    x = torch.randn(8, 16, device=device)
    w = torch.randn(10, 16, device=device)
    y = torch.randint(0, 10 * ranks, (8,), device=device)
    call = lced.vocab_parallel_linear_cross_entropy
    with pytest.raises(ValueError, match="stored"):
        call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks, strategy="stored",
             reduction="none")
    with pytest.raises(ValueError, match="together"):
        call(x, w, y, vocab_start=10 * rank)
    with pytest.raises(ValueError, match="not inside the vocabulary"):
        call(x, w, y, vocab_start=10 * ranks, vocab_size=10 * ranks)
    with pytest.raises(ValueError, match="class_weight"):
        call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks,
             class_weight=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="bias_shard"):
        call(x, w, y, torch.zeros(3, device=device), vocab_start=10 * rank,
             vocab_size=10 * ranks)
    with pytest.raises(ValueError, match="target"):
        call(x, w, y[:5], vocab_start=10 * rank, vocab_size=10 * ranks)
    with pytest.raises(ValueError, match="reduction"):
        call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):  # lce's own check, as a ValueError
        call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks, temperature=0.0)
    with pytest.raises(TypeError, match="dtype"):
        call(x, w.double(), y, vocab_start=10 * rank, vocab_size=10 * ranks)
    with pytest.raises(ValueError, match="stored"):
        lced.VocabParallelLinearCrossEntropy(strategy="stored", reduction="none")


def test_check_targets(world):
    """A target outside the global [0, V) fails ('host': ValueError with the count; 'off':
    ignored as in lce's C++ API); ids of other ranks' shards are valid."""
    rank, ranks, device = world
    x = torch.randn(8, 16, device=device)
    w = torch.randn(10, 16, device=device)
    y = torch.randint(0, 10 * ranks, (8,), device=device)
    call = lced.vocab_parallel_linear_cross_entropy
    call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks, check_targets="host")
    y[3] = 10 * ranks
    with pytest.raises(ValueError, match="1 scored target"):
        call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks, check_targets="host")
    y[:] = 10 * ranks
    loss = call(x, w, y, vocab_start=10 * rank, vocab_size=10 * ranks, check_targets="off")
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="check_targets"):
        lced.VocabParallelLinearCrossEntropy(check_targets="sometimes")
