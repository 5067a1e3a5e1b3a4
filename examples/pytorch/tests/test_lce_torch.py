"""GPU tests of lce_torch against PyTorch's own F.cross_entropy on upcast (fp64) inputs.

Run from the repository root (the extension is built in place or JIT-compiled on first import):

    python -m pytest examples/pytorch/tests -q -rs

Every comparison is a relative Frobenius error against an fp64 reference computed by PyTorch
(F.cross_entropy and autograd in float64, on the GPU) from the very same rounded inputs; for
the gradient filter (filter_eps), the same reference with the filtered entries of dZ set to 0.
The tolerances are the library's (DESIGN.md §4): float32 1e-5 for the loss and the gradients;
float16/bfloat16 1e-4 for the loss, 1e-2 for the gradients. PyTorch computing in the input
dtype is measured against the same reference and reported beside lce (conftest.py prints the
largest errors at the end). Data are fresh random draws every run; the seed is in every
failure message (LCE_TEST_SEED=<n> replays one).
"""

import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("lce_torch needs a CUDA device; none is available", allow_module_level=True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # examples/pytorch
import lce_torch  # noqa: E402

from conftest import ERRORS  # noqa: E402

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def loss_tolerance(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-4


def grad_tolerance(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


# ------------------------------------------------------------------------------------------
# Data and reference


def make_problem(lead, d, v, dtype, *, bias=False, logit_std=1.0, ignore_fraction=0.0,
                 ignore_index=-100):
    """x [*lead, d], weight [v, d], bias [v] in `dtype`, targets [*lead]; logits with standard
    deviation about `logit_std`; a fraction of targets set to ignore_index."""
    scale = math.sqrt(logit_std) * d ** -0.25
    x = (torch.randn(*lead, d, device=DEVICE) * scale).to(dtype)
    w = (torch.randn(v, d, device=DEVICE) * scale).to(dtype)
    b = (torch.randn(v, device=DEVICE) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, v, tuple(lead), device=DEVICE)
    if ignore_fraction > 0:
        y[torch.rand(tuple(lead), device=DEVICE) < ignore_fraction] = ignore_index
    return x, w, b, y


def shifted_targets(y, ignore_index):
    """The causal shift, done the usual way (what lce does without copying): position t of a
    sequence is scored against target t + 1; the last position is ignored."""
    pad = torch.full_like(y[..., :1], ignore_index)
    return torch.cat([y[..., 1:], pad], dim=-1)


def logits(x, w, b, *, temperature=1.0, softcap=None, dtype):
    """The logits lce scores, [rows, V] in `dtype`: (x·wᵀ + b)/τ, then the softcap."""
    d = x.shape[-1]
    z = x.to(dtype).reshape(-1, d) @ w.to(dtype).T
    if b is not None:
        z = z + b.to(dtype)
    z = z / temperature
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def loss_of_logits(z, t, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss=0.0, class_weight=None):
    """What lce computes from the logits z [rows, V] and the scored targets t [rows], in z's
    dtype (flat per-token losses for 'none')."""
    dtype = z.dtype
    cw = class_weight.to(dtype) if class_weight is not None else None
    loss = F.cross_entropy(z, t, weight=cw, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = t != ignore_index
        term = z_loss * torch.logsumexp(z.to(torch.float64 if dtype == torch.float64
                                             else torch.float32), dim=-1) ** 2 * valid
        if reduction == "mean":
            term = term.sum() / valid.sum().clamp(min=1)
        elif reduction == "sum":
            term = term.sum()
        loss = loss + term.to(loss.dtype)
    return loss


def torch_loss(x, w, b, y, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               z_loss=0.0, softcap=None, temperature=1.0, class_weight=None, shift=False,
               dtype=None):
    """What lce computes, written with PyTorch ops on the full logits, in `dtype` (the inputs'
    own by default; float64 for the reference). Returns the loss (per token for 'none')."""
    z = logits(x, w, b, temperature=temperature, softcap=softcap, dtype=dtype or x.dtype)
    t = (shifted_targets(y, ignore_index) if shift else y).reshape(-1)
    loss = loss_of_logits(z, t, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing, z_loss=z_loss,
                          class_weight=class_weight)
    return loss.reshape(y.shape) if reduction == "none" else loss


def run(fn, x, w, b, upstream):
    """Loss and gradients (dx, dw, db) of fn(x, w, b) with the given upstream gradient."""
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    bs = b.detach().clone().requires_grad_() if b is not None else None
    loss = fn(xs, ws, bs)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), xs.grad, ws.grad, (bs.grad if bs is not None else None)


def rel(value, ref):
    """Relative Frobenius error of value against the float64 reference."""
    value = value.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert value.shape == ref.shape, f"shape {tuple(value.shape)} != {tuple(ref.shape)}"
    denom = ref.norm().item()
    diff = (value - ref).norm().item()
    return diff / denom if denom > 0 else diff


def record(check, dtype, quantity, lce_error, torch_error=None):
    ERRORS.append((check, DTYPE_NAMES[dtype], quantity, lce_error, torch_error))


def compare(check, x, w, b, y, *, seed, options=None, lce_options=None, upstream_scale=0.37,
            compare_torch=True):
    """Runs lce and PyTorch (in x's dtype and in float64) with the same options; checks lce's
    loss and gradients against the fp64 reference and records both errors."""
    options = dict(options or {})
    lce_options = dict(lce_options or {})
    dtype = x.dtype
    reduction = options.get("reduction", "mean")
    shape = y.shape if reduction == "none" else ()
    upstream = torch.randn(shape, device=DEVICE, dtype=torch.float64) if reduction == "none" \
        else torch.tensor(upstream_scale, device=DEVICE, dtype=torch.float64)

    ref = run(lambda a, c, e: torch_loss(a, c, e, y, dtype=torch.float64, **options),
              x.double(), w.double(), b.double() if b is not None else None, upstream)
    got = run(lambda a, c, e: lce_torch.linear_cross_entropy(a, c, y, e, **options,
                                                             **lce_options), x, w, b, upstream)
    low = run(lambda a, c, e: torch_loss(a, c, e, y, **options), x, w, b, upstream) \
        if compare_torch else (None,) * 4

    context = f"[{check}, {DTYPE_NAMES[dtype]}, seed {seed}, options {options} {lce_options}]"
    assert got[0].dtype == torch.float32, context
    names = ("loss", "dx", "dw", "db")
    for name, g, r, t in zip(names, got, ref, low):
        if r is None:
            assert g is None, f"{name} should be None {context}"
            continue
        assert g is not None, f"{name} missing {context}"
        assert g.dtype == (torch.float32 if name == "loss" else dtype), f"{name} dtype {context}"
        assert torch.isfinite(g).all(), f"{name} is not finite {context}"
        error = rel(g, r)
        torch_error = rel(t, r) if t is not None else None
        record(check, dtype, name, error, torch_error)
        tolerance = loss_tolerance(dtype) if name == "loss" else grad_tolerance(dtype)
        assert error <= tolerance, (
            f"{name}: relative error {error:.3e} > {tolerance:.0e} {context}"
            + (f" (torch in {DTYPE_NAMES[dtype]}: {torch_error:.3e})" if torch_error else "")
        )
    return got, ref


# ------------------------------------------------------------------------------------------
# Loss and gradients, plain and with every option


SHAPES = [  # (leading shape, d, v)
    ((1,), 72, 3),  # N = 1, V = 3 (below every tile), D = 72
    ((257,), 136, 1000),  # nothing a multiple of a tile
    ((4, 64), 256, 4099),  # [B, T, D], V prime
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("lead,d,v", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_plain(dtype, lead, d, v, reduction, bias, seed):
    x, w, b, y = make_problem(lead, d, v, dtype, bias=bias)
    compare("plain", x, w, b, y, seed=seed, options={"reduction": reduction})


OPTION_SETS = {
    "ignore_index": {"ignore_index": -100},
    "ignore_index_in_vocab": {"ignore_index": 5},
    "label_smoothing": {"label_smoothing": 0.1},
    "class_weight": {"class_weight": "random"},
    "class_weight_smoothing": {"class_weight": "random", "label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "temperature": {"temperature": 0.7},
    "shift": {"shift": True},
    "everything": {"ignore_index": -100, "label_smoothing": 0.1, "class_weight": "random",
                   "z_loss": 1e-3, "softcap": 5.0, "temperature": 1.3, "shift": True},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_option(dtype, name, reduction, seed):
    options = dict(OPTION_SETS[name], reduction=reduction)
    lead, d, v = (3, 77), 136, 1000
    ignore_index = options.get("ignore_index", -100)
    logit_std = 4.0 if "softcap" in options else 1.0  # so that the cap bites
    x, w, b, y = make_problem(lead, d, v, dtype, bias=True, logit_std=logit_std,
                              ignore_fraction=0.2 if "ignore_index" in options else 0.0,
                              ignore_index=ignore_index)
    if ignore_index == 5:
        y[0, :10] = 5  # a real class id used as ignore_index
    if options.get("class_weight") == "random":
        options["class_weight"] = torch.rand(v, device=DEVICE) * 1.5 + 0.5
    compare(name, x, w, b, y, seed=seed, options=options)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("strategy,fp32_weight_grad,grad_in_forward,budget", [
    ("auto", False, False, None),
    ("vocab_chunked", False, False, 1),  # the smallest chunk: 128 columns
    ("vocab_chunked", True, False, 1 << 20),
    ("row_chunked", True, False, None),
    ("row_chunked", True, False, 1),  # one row per chunk
    ("auto", True, True, None),
    ("vocab_chunked", False, True, 1 << 20),
    ("row_chunked", True, True, 1 << 20),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_strategy(dtype, strategy, fp32_weight_grad, grad_in_forward, budget, reduction, seed):
    x, w, b, y = make_problem((300,), 200, 3001, dtype, bias=True, ignore_fraction=0.1)
    compare(f"strategy:{strategy}", x, w, b, y, seed=seed,
            options={"reduction": reduction, "label_smoothing": 0.05, "z_loss": 1e-4},
            lce_options={"strategy": strategy, "fp32_weight_grad": fp32_weight_grad,
                         "grad_in_forward": grad_in_forward, "memory_budget": budget},
            compare_torch=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("bias", [False, True])  # with a bias: its fallback (automatic)
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_strategy_stored(dtype, bias, softcap, seed):
    """The stored strategy (gradients in the forward, no recomputation)."""
    x, w, b, y = make_problem((300,), 200, 3001, dtype, bias=bias, ignore_fraction=0.1)
    compare("strategy:stored", x, w, b, y, seed=seed,
            options={"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": softcap},
            lce_options={"strategy": "stored"}, compare_torch=False)


def test_strategy_stored_needs_a_reduction():
    x, w, b, y = make_problem((8,), 16, 33, torch.bfloat16, bias=False)
    with pytest.raises(ValueError, match="stored"):
        lce_torch.linear_cross_entropy(x, w, y, strategy="stored", reduction="none")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_outputs(dtype, seed):
    """lse, z-loss, token loss, argmax, accuracy, entropy and target log-probability."""
    lead, d, v = (2, 50), 96, 777
    x, w, b, y = make_problem(lead, d, v, dtype, bias=True, logit_std=3.0, ignore_fraction=0.2)
    options = {"z_loss": 1e-3, "softcap": 8.0, "temperature": 0.9}
    out = lce_torch.linear_cross_entropy(
        x, w, y, b, **options, return_lse=True, return_z_loss=True, return_token_loss=True,
        return_argmax=True, return_accuracy=True, return_entropy=True,
        return_target_logprob=True)
    z = (x.double().reshape(-1, d) @ w.double().T + b.double()) / options["temperature"]
    z = options["softcap"] * torch.tanh(z / options["softcap"])
    t = y.reshape(-1)
    valid = t != -100
    lse = torch.logsumexp(z, -1)
    logp = z - lse[:, None]
    token_z = options["z_loss"] * lse**2 * valid
    token = F.cross_entropy(z, t, reduction="none") + token_z
    logprob = torch.where(valid, logp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    entropy = -(logp.exp() * logp).sum(-1)
    context = f"[{DTYPE_NAMES[dtype]}, seed {seed}]"
    tol = loss_tolerance(dtype)
    for name, value, ref in [("lse", out.lse, lse), ("token_loss", out.token_loss, token),
                             ("entropy", out.entropy, entropy),
                             ("target_logprob", out.target_logprob, logprob),
                             ("z_loss", out.z_loss, token_z.sum() / valid.sum())]:
        assert value.shape == (ref.shape if name == "z_loss" else lead), f"{name} {context}"
        error = rel(value, ref.reshape(value.shape))
        record("outputs", dtype, name, error)
        # entropy sums p·log p over the vocabulary: fp32 rounding of each term adds up
        assert error <= (10 * tol if name == "entropy" else tol), f"{name}: {error:.3e} {context}"
    # argmax: exact wherever the top two logits are apart by more than the rounding
    top2 = z.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * top2[:, 0].abs().clamp(min=1)
    argmax = out.argmax.reshape(-1)
    assert out.argmax.dtype == torch.int64
    assert torch.equal(argmax[clear], z.argmax(-1)[clear]), f"argmax {context}"
    correct = ((z.argmax(-1) == t) & valid)
    assert abs(out.correct.item() - correct.sum().item()) <= (~clear).sum().item(), context
    assert math.isclose(out.accuracy.item(), out.correct.item() / valid.sum().item(),
                        rel_tol=1e-6), context
    assert torch.allclose(out.loss, (token.sum() / valid.sum()).float(), rtol=tol), context


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(dtype, reduction):
    """A batch where every row is ignored: loss 0 and zero gradients, never NaN."""
    x, w, b, y = make_problem((33,), 64, 100, dtype, bias=True)
    y.fill_(-100)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    loss = lce_torch.linear_cross_entropy(xs, ws, y, bs, reduction=reduction, z_loss=1e-3)
    assert torch.all(loss == 0)
    loss.sum().backward()
    for grad in (xs.grad, ws.grad, bs.grad):
        assert torch.all(grad == 0)


# ------------------------------------------------------------------------------------------
# Gradient filter (filter_eps): opt-in, approximate, backward only


def filtered_reference(x, w, b, y, upstream, filter_eps, *, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0,
                       class_weight=None, shift=False):
    """fp64 loss and gradients (dx, dw, db) of lce with `filter_eps`, and the fraction of dZ
    entries the filter zeroes. dZ, the gradient of the loss w.r.t. the scored logits z (for
    'mean' without options: (P − Y)/n_valid), comes from autograd through the same
    loss_of_logits as the exact reference; every entry of it other than the target's whose
    p_v = softmax(z)_v is below filter_eps is set to 0 (its label-smoothing and z-loss terms
    with it), and autograd carries the result back through the softcap and temperature to
    x, w and b."""
    xs = x.detach().double().requires_grad_()
    ws = w.detach().double().requires_grad_()
    bs = b.detach().double().requires_grad_() if b is not None else None
    z = logits(xs, ws, bs, temperature=temperature, softcap=softcap, dtype=torch.float64)
    scored = z.detach().requires_grad_()
    t = (shifted_targets(y, ignore_index) if shift else y).reshape(-1)
    loss = loss_of_logits(scored, t, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing, z_loss=z_loss,
                          class_weight=class_weight)
    loss = loss.reshape(y.shape) if reduction == "none" else loss
    loss.backward(upstream.to(loss.dtype))
    keep = torch.softmax(scored.detach(), dim=-1) >= filter_eps
    rows = torch.arange(t.numel(), device=t.device)
    in_vocab = (t >= 0) & (t < z.shape[1])
    keep[rows[in_vocab], t[in_vocab]] = True  # the target's entry is never filtered
    z.backward(scored.grad * keep)
    filtered = 1.0 - keep.double().mean().item()
    return (loss.detach(), xs.grad, ws.grad, bs.grad if bs is not None else None), filtered


def ignore_rows_near_eps(x, w, b, y, filter_eps, *, ignore_index=-100, softcap=None,
                         temperature=1.0, shift=False, margin=5e-4, **unused_options):
    """y with every row that has a probability within a relative `margin` of filter_eps
    ignored. lce compares fp32 probabilities with filter_eps, the reference fp64 ones, so such
    an entry may fall on either side; one entry moves dX by about filter_eps/sqrt(rows)
    relative, above the fp32 tolerance. An ignored row's dZ is 0 with or without the filter."""
    z = logits(x, w, b, temperature=temperature, softcap=softcap, dtype=torch.float64)
    near = ((torch.log_softmax(z, dim=-1) - math.log(filter_eps)).abs() < margin).any(dim=-1)
    y = y.clone()
    if shift:  # row t of a sequence is scored against target t + 1
        seq = y.view(-1, y.shape[-1])
        seq[:, 1:][near.view(seq.shape)[:, :-1]] = ignore_index
    else:
        y.view(-1)[near] = ignore_index
    return y


def check_filtered(check, x, w, b, y, filter_eps, *, seed, options, lce_options=None):
    """lce with filter_eps against filtered_reference: the loss unchanged (bitwise equal to
    lce's without the filter), dx/dw/db within the gradient tolerance of the filtered
    reference and measurably away from the exact one (the filter must have changed them)."""
    lce_options = dict(lce_options or {})
    dtype = x.dtype
    reduction = options.get("reduction", "mean")
    upstream = torch.randn(y.shape, device=DEVICE, dtype=torch.float64) if reduction == "none" \
        else torch.tensor(0.37, device=DEVICE, dtype=torch.float64)
    ref, filtered = filtered_reference(x, w, b, y, upstream, filter_eps, **options)
    exact_ref = run(lambda a, c, e: torch_loss(a, c, e, y, dtype=torch.float64, **options),
                    x.double(), w.double(), b.double() if b is not None else None, upstream)

    def lce(eps):
        return run(lambda a, c, e: lce_torch.linear_cross_entropy(
            a, c, y, e, **options, **lce_options, filter_eps=eps), x, w, b, upstream)

    got, exact = lce(filter_eps), lce(0.0)
    context = (f"[{check}, {DTYPE_NAMES[dtype]}, filter_eps {filter_eps}, seed {seed}, options "
               f"{options} {lce_options}]")
    # The data must make the filter bite: many entries of dZ are below eps
    assert filtered >= 0.4, f"only {filtered:.1%} of dZ is filtered {context}"
    assert torch.equal(got[0], exact[0]), f"the filter changed the loss {context}"
    error = rel(got[0], ref[0])
    record(check, dtype, "loss", error)
    assert error <= loss_tolerance(dtype), f"loss: relative error {error:.3e} {context}"
    for name, g, r, r_exact in zip(("dx", "dw", "db"), got[1:], ref[1:], exact_ref[1:]):
        if r is None:
            assert g is None, f"{name} should be None {context}"
            continue
        assert g is not None and g.dtype == dtype, f"{name} missing or of the wrong dtype {context}"
        assert torch.isfinite(g).all(), f"{name} is not finite {context}"
        error = rel(g, r)
        record(check, dtype, name, error)
        assert error <= grad_tolerance(dtype), (
            f"{name}: relative error {error:.3e} > {grad_tolerance(dtype):.0e} against the "
            f"filtered reference {context}")
        # The filter moved the gradient by `effect`; lce must be nearer the filtered reference
        # than the exact one, and about that far from the exact one.
        effect = rel(r, r_exact)
        error_exact = rel(g, r_exact)
        assert error_exact > error and error_exact >= 0.5 * effect, (
            f"{name}: {error_exact:.3e} from the exact gradient, {error:.3e} from the filtered "
            f"one (the filter's effect: {effect:.3e}): was the filter applied? {context}")


FILTER_EPS = [2**-12, 1e-2]  # Cut Cross-Entropy's default in bf16, and one that bites harder
FILTER_OPTION_SETS = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "class_weight_smoothing": {"class_weight": "random", "label_smoothing": 0.2},
    "softcap_temperature": {"softcap": 5.0, "temperature": 0.7},
    "everything": {"ignore_index": -100, "label_smoothing": 0.1, "class_weight": "random",
                   "z_loss": 1e-3, "softcap": 5.0, "temperature": 1.3, "shift": True},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("filter_eps", FILTER_EPS, ids=["2^-12", "1e-2"])
@pytest.mark.parametrize("name", list(FILTER_OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_filter_eps(dtype, filter_eps, name, reduction, seed):
    """dZ entries other than the target's with p < filter_eps are 0 (smoothing and z-loss
    terms too); dx, dw, db follow; the loss is unchanged."""
    options = dict(FILTER_OPTION_SETS[name], reduction=reduction)
    lead, d, v = (4, 75), 136, 1000
    # Without bias and class weights the sm_90a backward takes its lean epilogue (exp2 and the
    # softcap on the special-function unit), with them the general one: both filter.
    bias = name not in ("plain", "softcap_temperature")
    # Logits of standard deviation 4: most probabilities are far below either eps
    x, w, b, y = make_problem(lead, d, v, dtype, bias=bias, logit_std=4.0, ignore_fraction=0.1)
    if options.get("class_weight") == "random":
        options["class_weight"] = torch.rand(v, device=DEVICE) * 1.5 + 0.5
    y = ignore_rows_near_eps(x, w, b, y, filter_eps, **options)
    check_filtered(f"filter:{name}", x, w, b, y, filter_eps, seed=seed, options=options)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("strategy,fp32_weight_grad,grad_in_forward,budget", [
    ("auto", False, False, None),
    ("vocab_chunked", False, False, 1),  # the smallest chunk: 128 columns
    ("row_chunked", True, False, 1),  # one row per chunk
    ("auto", True, True, None),
    ("row_chunked", True, True, 1 << 20),  # one pass: each chunk's own lse
])
def test_filter_eps_strategy(dtype, strategy, fp32_weight_grad, grad_in_forward, budget, seed):
    """Every backward strategy, and the gradients computed in the forward, filter alike."""
    filter_eps = 2**-12
    x, w, b, y = make_problem((300,), 200, 3001, dtype, logit_std=4.0, ignore_fraction=0.1)
    y = ignore_rows_near_eps(x, w, b, y, filter_eps)
    check_filtered(f"filter:{strategy}", x, w, b, y, filter_eps, seed=seed,
                   options={"label_smoothing": 0.05, "z_loss": 1e-4},
                   lce_options={"strategy": strategy, "fp32_weight_grad": fp32_weight_grad,
                                "grad_in_forward": grad_in_forward, "memory_budget": budget})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("lce_options", [
    {},
    {"strategy": "vocab_chunked", "memory_budget": 1},
    {"strategy": "row_chunked", "grad_in_forward": True},
], ids=["default", "vocab_chunked", "row_chunked_in_forward"])
def test_filter_eps_zero_is_exact(dtype, lce_options, seed):
    """filter_eps=0 (the default, passed explicitly) gives bitwise the same loss and
    gradients as not passing it."""
    x, w, b, y = make_problem((2, 150), 136, 1000, dtype, bias=True, logit_std=4.0,
                              ignore_fraction=0.1)
    options = dict(lce_options, label_smoothing=0.1, z_loss=1e-3)
    upstream = torch.tensor(0.37, device=DEVICE)
    default = run(lambda a, c, e: lce_torch.linear_cross_entropy(a, c, y, e, **options),
                  x, w, b, upstream)
    zero = run(lambda a, c, e: lce_torch.linear_cross_entropy(a, c, y, e, **options,
                                                              filter_eps=0.0), x, w, b, upstream)
    for name, value, ref in zip(("loss", "dx", "dw", "db"), zero, default):
        assert torch.equal(value, ref), f"{name} [{DTYPE_NAMES[dtype]}, {lce_options}, seed {seed}]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_filter_eps_entry_points(dtype, seed):
    """The module and the functions without autograd pass filter_eps through."""
    filter_eps = 1e-2
    d, v = 96, 700
    x, w, b, y = make_problem((2, 60), d, v, dtype, bias=True, logit_std=4.0)
    y = ignore_rows_near_eps(x, w, b, y, filter_eps)
    context = f"[{DTYPE_NAMES[dtype]}, seed {seed}]"

    module = lce_torch.LinearCrossEntropy(label_smoothing=0.1, filter_eps=filter_eps)
    assert "filter_eps=0.01" in repr(module)
    one = torch.tensor(1.0, device=DEVICE)
    by_module = run(lambda a, c, e: module(a, c, y, e), x, w, b, one)
    by_function = run(lambda a, c, e: lce_torch.linear_cross_entropy(
        a, c, y, e, label_smoothing=0.1, filter_eps=filter_eps), x, w, b, one)
    for name, value, ref in zip(("loss", "dx", "dw", "db"), by_module, by_function):
        assert torch.equal(value, ref), f"module {name} {context}"

    # forward_backward_into: gradients of the loss (upstream 1) into fp32 buffers
    ref, _ = filtered_reference(x, w, b, y, one.double(), filter_eps, label_smoothing=0.1)
    dx = torch.zeros_like(x)
    dw = torch.zeros(v, d, device=DEVICE)
    db = torch.zeros(v, device=DEVICE)
    loss = lce_torch.linear_cross_entropy_forward_backward_into(
        x, w, y, b, dx=dx, dw=dw, db=db, label_smoothing=0.1, filter_eps=filter_eps)
    assert rel(loss, ref[0]) <= loss_tolerance(dtype), f"forward_backward_into loss {context}"
    for name, value, r in (("dx", dx, ref[1]), ("dw", dw, ref[2]), ("db", db, ref[3])):
        error = rel(value, r)
        record("filter:forward_backward_into", dtype, name, error)
        assert error <= grad_tolerance(dtype), (
            f"forward_backward_into {name}: {error:.3e} {context}")

    # backward_into: per-token upstream gradients, from the forward's lse
    grad = torch.randn(2, 60, device=DEVICE)
    ref, _ = filtered_reference(x, w, b, y, grad.double(), filter_eps, reduction="none")
    lse = lce_torch.linear_cross_entropy(x, w, y, b, reduction="none", return_lse=True).lse
    dx = torch.zeros_like(x)
    dw = torch.zeros(v, d, device=DEVICE)
    db = torch.zeros(v, device=DEVICE)
    lce_torch.linear_cross_entropy_backward_into(x, w, y, lse, b, grad=grad, dx=dx, dw=dw, db=db,
                                                 reduction="none", filter_eps=filter_eps)
    for name, value, r in (("dx", dx, ref[1]), ("dw", dw, ref[2]), ("db", db, ref[3])):
        error = rel(value, r)
        record("filter:backward_into", dtype, name, error)
        assert error <= grad_tolerance(dtype), f"backward_into {name}: {error:.3e} {context}"


def test_filter_eps_errors():
    """filter_eps outside [0, 1) (negative, NaN, 1 and above) is rejected by lce's own check,
    as ValueError like the other option values, by every entry point."""
    x, w, b, y = make_problem((16,), 32, 40, torch.float32, bias=True)
    for bad in (-1e-3, float("nan"), 1.0, 2.0):
        with pytest.raises(ValueError, match=r"lce: options\.filter_eps must be in \[0, 1\)"):
            lce_torch.linear_cross_entropy(x, w, y, filter_eps=bad)
    with pytest.raises(ValueError, match="lce: options.filter_eps"):
        lce_torch.linear_cross_entropy_forward_backward_into(x, w, y, dx=torch.empty_like(x),
                                                             filter_eps=-1.0)
    lse = lce_torch.linear_cross_entropy(x, w, y, return_lse=True).lse
    with pytest.raises(ValueError, match="lce: options.filter_eps"):
        lce_torch.linear_cross_entropy_backward_into(x, w, y, lse, dx=torch.empty_like(x),
                                                     filter_eps=float("nan"))
    # The failed calls left nothing behind; an eps just below 1 is accepted
    assert torch.isfinite(lce_torch.linear_cross_entropy(x, w, y, filter_eps=0.999))


# ------------------------------------------------------------------------------------------
# Shapes, layouts, dtypes and errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("layout", ["x_row_stride", "x_transposed_batch", "w_row_stride",
                                    "w_transposed", "w_vocab_slice", "target_int32"])
def test_layouts(dtype, layout, seed):
    """Inputs that are views of larger or differently ordered tensors: read with their row
    stride, or copied when lce cannot; the gradients reach the viewed elements only."""
    b_, t_, d, v = 3, 40, 128, 515
    x, w, b, y = make_problem((b_, t_), d, v, dtype, bias=True)
    x_base, w_base = x, w  # the leaves; x_view/w_view give what lce is called with

    def x_view(t):
        return t

    def w_view(t):
        return t

    if layout == "x_row_stride":  # [B, T, D] slice of a wider activation
        x_base = torch.randn(b_, t_, d + 24, device=DEVICE).to(dtype)
        x_base[..., :d] = x

        def x_view(t):
            return t[..., :d]
    elif layout == "x_transposed_batch":  # [T, B, D] memory seen as [B, T, D]
        x_base = x.transpose(0, 1).contiguous()

        def x_view(t):
            return t.transpose(0, 1)
    elif layout == "w_row_stride":
        w_base = torch.randn(v, d + 8, device=DEVICE).to(dtype)
        w_base[:, :d] = w

        def w_view(t):
            return t[:, :d]
    elif layout == "w_transposed":  # the weight kept as [D, V]
        w_base = w.T.contiguous()

        def w_view(t):
            return t.T
    elif layout == "w_vocab_slice":  # the used rows of a padded vocabulary
        w_base = torch.randn(v + 61, d, device=DEVICE).to(dtype)
        w_base[:v] = w

        def w_view(t):
            return t[:v]
    elif layout == "target_int32":
        y = y.int()

    xs, ws = x_base.clone().requires_grad_(), w_base.clone().requires_grad_()
    loss = lce_torch.linear_cross_entropy(x_view(xs), w_view(ws), y, b, label_smoothing=0.1)
    upstream = torch.tensor(0.5, device=DEVICE)
    loss.backward(upstream)
    _, rdx, rdw, _ = run(lambda a, c, e: torch_loss(a, c, e, y.long(), label_smoothing=0.1,
                                                    dtype=torch.float64),
                         x.double(), w.double(), b.double(), upstream.double())
    context = f"[{layout}, {DTYPE_NAMES[dtype]}, seed {seed}]"
    error = rel(loss, torch_loss(x, w, b, y.long(), label_smoothing=0.1, dtype=torch.float64))
    assert error <= loss_tolerance(dtype), context
    for name, grad, view, ref in (("dx", xs.grad, x_view, rdx), ("dw", ws.grad, w_view, rdw)):
        error = rel(view(grad), ref)
        record(f"layout:{layout}", dtype, name, error)
        assert error <= grad_tolerance(dtype), f"{name}: {error:.3e} {context}"
        # nothing outside the view: its elements sum to the whole gradient's
        assert torch.allclose(view(grad).double().abs().sum(), grad.double().abs().sum()), context


def test_view_gradients_keep_shape(seed):
    x, w, b, y = make_problem((2, 3, 5), 64, 50, torch.float32, bias=True)
    xs = x.clone().requires_grad_()
    loss = lce_torch.linear_cross_entropy(xs, w, y, reduction="none")
    assert loss.shape == (2, 3, 5)
    loss.sum().backward()  # an expanded (stride-0) upstream gradient
    assert xs.grad.shape == xs.shape


def test_requires_grad_subsets(seed):
    """Only the gradients asked for are computed; a frozen head gets none."""
    x, w, b, y = make_problem((64,), 96, 300, torch.float32, bias=True)
    xs = x.clone().requires_grad_()
    lce_torch.linear_cross_entropy(xs, w, y, b).backward()
    assert xs.grad is not None
    ws = w.clone().requires_grad_()
    lce_torch.linear_cross_entropy(x, ws, y, b).backward()
    assert ws.grad is not None
    with torch.no_grad():
        loss = lce_torch.linear_cross_entropy(x, w, y, b)
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_autocast(seed):
    """Under autocast, fp32 parameters are cast to bf16 (as F.linear would) and get fp32
    gradients from autograd."""
    x, w, b, y = make_problem((128,), 128, 1000, torch.float32, bias=True)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lce_torch.linear_cross_entropy(xs, ws, y)
    loss.backward()
    assert ws.grad.dtype == torch.float32 and xs.grad.dtype == torch.float32
    ref = torch_loss(x.bfloat16(), w.bfloat16(), None, y, dtype=torch.float64)
    assert rel(loss, ref) <= 1e-4


def test_deterministic(seed):
    x, w, b, y = make_problem((200,), 128, 2000, torch.bfloat16, bias=True)
    results = [run(lambda a, c, e: lce_torch.linear_cross_entropy(a, c, y, e), x, w, b,
                   torch.tensor(1.0, device=DEVICE)) for _ in range(2)]
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("lce_options", [
    {"grad_in_forward": True},
    {"grad_in_forward": True, "fp32_weight_grad": True},
    {"strategy": "stored"},
], ids=["bf16", "fp32_dw", "stored"])
def test_fused_gradients_take_the_upstream_once(lce_options, seed):
    # The gradients computed in the forward meet autograd's upstream gradient in place, read
    # on the device: 1 leaves them as computed; 2.5 gives each one rounding of g·2.5; a second
    # backward through the same graph finds them handed over and is refused.
    x, w, b, y = make_problem((200,), 128, 2000, torch.bfloat16, bias=True)
    if lce_options.get("strategy") == "stored":
        b = None  # stored runs without a bias

    def fn(a, c, e):
        return lce_torch.linear_cross_entropy(a, c, y, e, **lce_options)

    _, *ones = run(fn, x, w, b, torch.tensor(1.0, device=DEVICE))
    _, *scaled = run(fn, x, w, b, torch.tensor(2.5, device=DEVICE))
    for one, got in zip(ones, scaled):
        if one is None:
            continue
        if lce_options.get("fp32_weight_grad") and one.dtype != torch.float32:
            # an fp32 dW scaled, then cast by autograd: one rounding of its own, not of `one`
            torch.testing.assert_close(got.float(), one.float() * 2.5, rtol=2**-7, atol=0)
        else:
            assert torch.equal(got, (one.float() * 2.5).to(one.dtype))
    xs = x.detach().requires_grad_()
    loss = fn(xs, w, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_errors():
    x, w, b, y = make_problem((16,), 32, 40, torch.float32, bias=True)
    with pytest.raises(ValueError, match="CUDA"):
        lce_torch.linear_cross_entropy(x.cpu(), w.cpu(), y.cpu())
    with pytest.raises(TypeError, match="dtype"):
        lce_torch.linear_cross_entropy(x, w.half(), y)
    with pytest.raises(ValueError, match="hidden sizes"):
        lce_torch.linear_cross_entropy(x, w[:, :31], y)
    with pytest.raises(ValueError, match="target"):
        lce_torch.linear_cross_entropy(x, w, y[:15])
    with pytest.raises(ValueError, match="reduction"):
        lce_torch.linear_cross_entropy(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match="strategy"):
        lce_torch.linear_cross_entropy(x, w, y, strategy="fast")
    with pytest.raises(ValueError, match="shift"):
        lce_torch.linear_cross_entropy(x, w, y, shift=5)
    # Values the library itself rejects: its message comes through
    with pytest.raises(ValueError, match="lce: options.label_smoothing"):
        lce_torch.linear_cross_entropy(x, w, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="lce: options.softcap"):
        lce_torch.linear_cross_entropy(x, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="lce: options.temperature"):
        lce_torch.linear_cross_entropy(x, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="lce: options.z_loss"):
        lce_torch.linear_cross_entropy(x, w, y, z_loss=-1.0)
    # The failed calls left nothing behind: a good call still works
    assert torch.isfinite(lce_torch.linear_cross_entropy(x, w, y))


def test_module(seed):
    x, w, b, y = make_problem((4, 30), 64, 500, torch.float32, bias=True)
    cw = torch.rand(500, device=DEVICE) + 0.5
    module = lce_torch.LinearCrossEntropy(label_smoothing=0.1, class_weight=cw, shift=True)
    got = module(x, w, y, b)
    ref = torch_loss(x, w, b, y, label_smoothing=0.1, class_weight=cw, shift=True,
                     dtype=torch.float64)
    assert rel(got, ref) <= 1e-5
    assert "label_smoothing=0.1" in repr(module)


# ------------------------------------------------------------------------------------------
# Gradients into caller-owned buffers (accumulation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("strategy", ["vocab_chunked", "row_chunked"])
def test_forward_backward_into_accumulates(dtype, strategy, seed):
    """Two micro-batches accumulated into fp32 main-grad buffers equal the sum of their
    gradients."""
    d, v = 128, 700
    batches = [make_problem((96,), d, v, dtype, bias=True) for _ in range(2)]
    w, b = batches[0][1], batches[0][2]
    dw = torch.full((v, d), 0.25, device=DEVICE)  # a running fp32 main grad
    db = torch.full((v,), -0.5, device=DEVICE)
    expected_dw, expected_db = dw.double().clone(), db.double().clone()
    for x, _, _, y in batches:
        dx = torch.full_like(x, 0.125)  # accumulate adds into dx too
        loss = lce_torch.linear_cross_entropy_forward_backward_into(
            x, w, y, b, dx=dx, dw=dw, db=db, accumulate=True, strategy=strategy)
        _, rdx, rdw, rdb = run(lambda a, c, e: torch_loss(a, c, e, y, dtype=torch.float64),
                               x.double(), w.double(), b.double(),
                               torch.tensor(1.0, device=DEVICE, dtype=torch.float64))
        expected_dw += rdw
        expected_db += rdb
        assert rel(loss, torch_loss(x, w, b, y, dtype=torch.float64)) <= loss_tolerance(dtype)
        assert rel(dx, rdx + 0.125) <= grad_tolerance(dtype)
    assert rel(dw, expected_dw) <= grad_tolerance(dtype)
    assert rel(db, expected_db) <= grad_tolerance(dtype)


def test_backward_into(seed):
    x, w, b, y = make_problem((2, 50), 64, 300, torch.bfloat16, bias=True)
    out = lce_torch.linear_cross_entropy(x, w, y, b, reduction="none", return_lse=True)
    grad = torch.randn(2, 50, device=DEVICE)
    dx = torch.zeros_like(x)
    dw = torch.zeros(300, 64, device=DEVICE)
    db = torch.zeros(300, device=DEVICE)
    lce_torch.linear_cross_entropy_backward_into(x, w, y, out.lse, b, grad=grad, dx=dx, dw=dw,
                                                 db=db, reduction="none")
    _, rdx, rdw, rdb = run(lambda a, c, e: torch_loss(a, c, e, y, reduction="none",
                                                      dtype=torch.float64),
                           x.double(), w.double(), b.double(), grad.double())
    for value, ref in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert rel(value, ref) <= 1e-2


# ------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile


@pytest.mark.parametrize("lce_options", [
    {},
    {"strategy": "row_chunked", "grad_in_forward": True},
], ids=["default", "row_chunked_in_forward"])
def test_cuda_graph_capture(lce_options, seed):
    """Forward and backward captured in one CUDA graph, replayed on new data, equal eager."""
    d, v = 128, 1000
    x, w, b, y = make_problem((2, 64), d, v, torch.bfloat16, bias=True)
    sx, sw, sb = (t.clone().requires_grad_() for t in (x, w, b))
    sy = y.clone()

    def step():
        loss = lce_torch.linear_cross_entropy(sx, sw, sy, sb, shift=True, z_loss=1e-4,
                                              **lce_options)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
        for _ in range(3):
            for t in (sx, sw, sb):
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (sx, sw, sb):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    for _ in range(2):  # new data into the static inputs, replay, compare with eager
        nx, nw, nb, ny = make_problem((2, 64), d, v, torch.bfloat16, bias=True)
        with torch.no_grad():
            sx.copy_(nx), sw.copy_(nw), sb.copy_(nb), sy.copy_(ny)
        graph.replay()
        torch.cuda.synchronize()
        eager = run(lambda a, c, e: lce_torch.linear_cross_entropy(
            a, c, ny, e, shift=True, z_loss=1e-4, **lce_options), nx, nw, nb,
            torch.tensor(1.0, device=DEVICE))
        # Same kernels and GEMMs on the same data: equal (bitwise, unless cuBLAS picks another
        # algorithm inside the graph)
        for name, value, ref in zip(("loss", "dx", "dw", "db"),
                                    (static_loss, sx.grad, sw.grad, sb.grad), eager):
            assert rel(value, ref) <= (1e-6 if name == "loss" else 1e-3), f"{name} [seed {seed}]"


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["backward", "in_forward"])
@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile(fullgraph, grad_in_forward, seed):
    """The op inside a compiled function (with PyTorch ops around it) gives eager's results."""
    torch._dynamo.reset()
    x, w, b, y = make_problem((4, 32), 128, 1000, torch.bfloat16, bias=True)

    def step(x, w, b, y):
        h = torch.nn.functional.gelu(x) * 1.5
        loss = lce_torch.linear_cross_entropy(h, w, y, b, label_smoothing=0.1, shift=True,
                                              grad_in_forward=grad_in_forward)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=fullgraph)
    upstream = torch.tensor(1.0, device=DEVICE)
    eager = run(lambda a, c, e: step(a, c, e, y), x, w, b, upstream)
    for _ in range(2):
        got = run(lambda a, c, e: compiled(a, c, e, y), x, w, b, upstream)
    for value, ref in zip(got, eager):
        # gelu may be fused differently by inductor: equal up to the rounding of h
        assert rel(value, ref) <= 1e-2


# ------------------------------------------------------------------------------------------
# A short training run


class TinyLM(torch.nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def hidden(self, tokens):
        return torch.tanh(self.mix(self.embed(tokens)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_training_matches_pytorch(dtype, seed):
    """20 AdamW steps of a tiny LM (embedding, mixer, LM head) on next-token prediction: the
    loss curve of lce follows F.cross_entropy's step for step; both go down."""
    vocab, hidden, batch, seq = 503, 64, 8, 33
    reference = TinyLM(vocab, hidden).to(DEVICE)
    model = TinyLM(vocab, hidden).to(DEVICE)
    model.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Something learnable in 20 steps: each token's successor is fixed (a random permutation),
    # so both curves fall by ~0.9 nats whatever the seed (random tokens with a few copied ones
    # left the curve flat for some seeds).
    successor = torch.randperm(vocab, device=DEVICE)
    data = torch.empty(20, batch, seq, dtype=torch.long, device=DEVICE)
    data[:, :, 0] = torch.randint(0, vocab, (20, batch), device=DEVICE)
    for t in range(1, seq):
        data[:, :, t] = successor[data[:, :, t - 1]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32)
    curve_ref, curve = [], []
    for tokens in data:
        with autocast:
            h = reference.hidden(tokens)
            logits = h @ reference.head.weight.T
            loss_ref = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                                       tokens[:, 1:].reshape(-1))
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        with autocast:
            loss = lce_torch.linear_cross_entropy(model.hidden(tokens), model.head.weight,
                                                  tokens, shift=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve_ref.append(loss_ref.item())
        curve.append(loss.item())
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for step, (a, r) in enumerate(zip(curve, curve_ref)):
        assert abs(a - r) <= tolerance * abs(r), (
            f"step {step}: lce {a:.6f} vs torch {r:.6f} [seed {seed}]\n"
            f"lce   {curve}\ntorch {curve_ref}")
    assert curve[-1] < curve[0] and curve_ref[-1] < curve_ref[0]
    record("training", dtype, "loss_curve",
           max(abs(a - r) / abs(r) for a, r in zip(curve, curve_ref)))


def test_choose_reports_the_plans():
    """choose_backward / choose_forward_backward: the library's plans (launch nothing), the
    stored strategy's workspace within the budget, and the fp32 dW the binding adds."""
    n, d, v = 8192, 4096, 128256  # Llama 3's head
    stored_values = n * v * 2
    lean = lce_torch.choose_forward_backward(n, d, v, torch.bfloat16)
    assert lean["strategy"] == "vocab_chunked"
    assert lean["workspace_bytes"] < 300 << 20
    assert lean["fp32_weight_grad_bytes"] == 0
    big = lce_torch.choose_forward_backward(n, d, v, torch.bfloat16, memory_budget=4 << 30)
    assert big["strategy"] == "stored" and big["chunk"] == 0
    # the stored values, not the whole 4 GiB
    assert stored_values <= big["workspace_bytes"] < stored_values + (64 << 20)
    with_bias = lce_torch.choose_forward_backward(n, d, v, torch.bfloat16,
                                                  memory_budget=4 << 30, bias_or_weights=True)
    assert with_bias["strategy"] != "stored"
    rows = lce_torch.choose_forward_backward(n, d, v, torch.bfloat16, fp32_weight_grad=True,
                                             memory_budget=256 << 20)
    assert rows["strategy"] == "stored" and 0 < rows["chunk"] < n
    assert rows["fp32_weight_grad_bytes"] == v * d * 4
    # a 16-bit dW in row chunks: fp32 accumulators inside the budget
    tall = lce_torch.choose_forward_backward(4 * n, d, v, torch.bfloat16, memory_budget=4 << 30)
    assert tall["strategy"] == "stored" and 0 < tall["chunk"] < 4 * n
    assert tall["accumulator_bytes"] == v * (d + 1) * 4
    assert tall["fp32_weight_grad_bytes"] == 0
    # the backward alone never stores (lce::backward recomputes)
    assert lce_torch.choose_backward(n, d, v, torch.bfloat16,
                                     memory_budget=4 << 30)["strategy"] != "stored"
