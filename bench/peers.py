#!/usr/bin/env python3
"""peers.py: lce against the other ways of computing an LM head's cross-entropy in PyTorch.

For each shape and data family, on one GPU and in one run, every method gets:
  - fwd:     median time of the loss alone (torch.no_grad), CUDA events, L2 flushed;
  - fwd+bwd: median time of the loss and its backward (dX, dW);
  - memory:  peak allocation beyond what was allocated before the call (torch.cuda
             max_memory_allocated), for fwd and fwd+bwd; "extra" subtracts the gradients
             that must be returned (dX, dW in the inputs' dtype): the memory floor is 0;
  - error:   relative Frobenius error of the loss, dX and dW against an fp64 reference
             computed on the GPU in vocabulary chunks from the same (rounded) inputs.
The cuBLAS floor is measured in the same run with torch.matmul on the same shapes: one GEMM
(X·Wᵀ) for the forward, three (Z = X·Wᵀ, dX = Z·W, dW = Zᵀ·X) for forward+backward; every
time is also reported as a ratio to it.

Methods (each only if importable; otherwise the run says "not importable: <reason>"):
  lce*            lce_torch (examples/pytorch; built in place, installed, or JIT-compiled),
                  one row per strategy/configuration
  lce_filtered    lce's default configuration with the opt-in gradient filter at Cut
                  Cross-Entropy's default, filter_eps = eps(dtype)/32 (2**-12 in bf16, 2**-15
                  in fp16): approximate gradients, to compare with cce
  torch_eager     F.cross_entropy((x @ w.T).float(), y), the usual Hugging Face head
  torch_compile   the same function through torch.compile
  liger_triton    Liger-Kernel's LigerFusedLinearCrossEntropyLoss (Triton)
  liger_cutedsl   Liger-Kernel's CuTe-DSL fused linear cross-entropy (needs nvidia-cutlass-dsl)
  liger_sm90      Liger-Kernel's SM90 CuTe-DSL one (bf16, Hopper)
  cce             Cut Cross-Entropy's linear_cross_entropy, default gradient filter
  cce_exact       the same with filter_eps=None (no filtering)
  quack           quack-kernels' chunked_linear_cross_entropy (needs nvidia-cutlass-dsl)

Data families mirror examples/common/data.cuh: flat (X, W ~ N(0, 1/sqrt(D)), uniform targets),
peaked (about half of the rows put ~97 % of their mass on their target) and lm (a Zipf prior
plus a few strong candidates per row, softmax entropy 1-3 nats, targets drawn from the rows'
distributions).

  python3 bench/peers.py --quick                       # one small shape, lm data: a minute
  python3 bench/peers.py --csv bench/peers.csv         # the shapes of bench/lce_bench.cu
  python3 bench/peers.py --shapes 8192x4096x128256 --families lm,flat --methods lce,liger_triton
  python3 bench/plot.py bench/peers.csv                # pictures under docs/
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = ["8192x2304x256000", "8192x4096x128256", "8192x3584x152064"]  # Gemma 2, Llama 3, Qwen 2
QUICK_SHAPE = "4096x2048x32768"
FAMILIES = ["flat", "peaked", "lm"]
GIB = 1 << 30
MIB = 1 << 20

CSV_FIELDS = [
    "shape", "n", "d", "v", "dtype", "family", "method", "status",
    "fwd_ms", "fwdbwd_ms", "fwd_ratio", "fwdbwd_ratio",
    "fwd_peak_mib", "fwdbwd_peak_mib", "fwdbwd_extra_mib",
    "err_loss", "err_dx", "err_dw", "note",
]


# ------------------------------------------------------------------------------------------
# Data (examples/common/data.cuh, in torch)


def make_data(family: str, n: int, d: int, v: int, dtype: torch.dtype, seed: int,
              device: str = "cuda"):
    """X [n, d], W [v, d] in `dtype` and int64 targets [n] of one data family."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, device=dev, dtype=torch.float32)

    if family == "lm":
        zipf = d > 1
        sigma = (d - 1 if zipf else d) ** -0.25
        x = normal(n, d).mul_(sigma)
        if zipf:
            x[:, 0] = 1.0
        x = x.to(dtype)
        w = normal(v, d).mul_(sigma)
        if zipf:  # column 0 adds ln of a Zipf(1) probability to every logit
            w[:, 0] = -torch.log(torch.arange(1, v + 1, device=dev, dtype=torch.float32))
        k = min(4, v // n) if zipf else 0
        log_tail = math.log(math.log(v) + 0.5772156649 + 0.5 / v) + 0.5
        delta = 0.5 + 3.0 * uniform(n)  # how confident each row is
        tokens = torch.randperm(n * k, generator=gen, device=dev) if k else None
        if k:
            # Candidate j of row i gets the logit log_tail + delta_i - j, by adding a multiple of
            # x_i[1:] to its token's row (computed from the rounded values, as stored).
            slots = torch.arange(n * k, device=dev)
            rows, rank = slots // k, slots % k
            xr = x[rows].float()
            wt = w[tokens].to(dtype).float()
            logit = log_tail + delta[rows] - rank.float()
            beta = (logit - (xr * wt).sum(1)) / (xr[:, 1:] ** 2).sum(1)
            wt[:, 1:] += beta[:, None] * xr[:, 1:]
            w[tokens] = wt
            del xr, wt
        w = w.to(dtype)
        # Targets from the row's distribution: candidate j with weight e^(delta - j), the
        # prior with weight 1 (a Zipf(1) draw by the continuous inverse CDF).
        u = uniform(n)
        prior = (torch.exp(uniform(n) * math.log1p(v)) - 1).long().clamp(0, v - 1)
        if k:
            weights = torch.exp(delta[:, None] - torch.arange(k, device=dev, dtype=torch.float32))
            total = 1.0 + weights.sum(1)
            chosen = (weights.cumsum(1) <= (u * total)[:, None]).sum(1)
            candidate = tokens.view(n, k).gather(1, chosen.clamp(max=k - 1)[:, None])[:, 0]
            y = torch.where(chosen < k, candidate, prior)
        else:
            y = prior
        return x, w, y

    sigma = d ** -0.25
    x = normal(n, d).mul_(sigma).to(dtype)
    w = normal(v, d).mul_(sigma)
    y = (uniform(n) * v).long().clamp(0, v - 1)
    if family == "peaked":
        m = min(n, v)
        rows = torch.nonzero(uniform(m) < 0.5)[:, 0]
        tokens = torch.randperm(v, generator=gen, device=dev)[rows]  # distinct targets
        xr = x[rows].float()
        logit = math.log(v) + 4.0
        w[tokens] = xr * (logit / (xr ** 2).sum(1))[:, None]
        y[rows] = tokens
    elif family != "flat":
        raise ValueError(f"unknown data family {family!r}")
    return x, w.to(dtype), y


# ------------------------------------------------------------------------------------------
# fp64 reference, in vocabulary chunks on the GPU


class Reference:
    """Loss, dX and dW of mean cross-entropy in float64 from the rounded inputs."""

    def __init__(self, x, w, y, ignore_index=-100, chunk=8192):
        n, d = x.shape
        v = w.shape[0]
        x64 = x.double()
        valid = y != ignore_index
        n_valid = max(int(valid.sum()), 1)
        lse = torch.full((n,), -math.inf, device=x.device, dtype=torch.float64)
        z_target = torch.zeros(n, device=x.device, dtype=torch.float64)
        rows = torch.arange(n, device=x.device)
        for v0 in range(0, v, chunk):
            v1 = min(v, v0 + chunk)
            z = x64 @ w[v0:v1].double().T
            lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
            here = valid & (y >= v0) & (y < v1)
            z_target[here] = z[rows[here], y[here] - v0]
            del z
        self.loss = float(((lse - z_target) * valid).sum() / n_valid)
        self.dx = torch.zeros(n, d, device=x.device, dtype=torch.float64)
        self.dw = torch.empty(v, d, device=x.device, dtype=torch.float64)
        scale = valid.double()[:, None] / n_valid
        for v0 in range(0, v, chunk):
            v1 = min(v, v0 + chunk)
            w64 = w[v0:v1].double()
            dz = torch.exp(x64 @ w64.T - lse[:, None])
            here = valid & (y >= v0) & (y < v1)
            dz[rows[here], y[here] - v0] -= 1.0
            dz *= scale
            self.dx += dz @ w64
            self.dw[v0:v1] = dz.T @ x64
            del dz, w64


def rel_error(value, ref, chunk_rows=16384):
    """Relative Frobenius error of value against the float64 reference, in row chunks."""
    if value is None:
        return float("nan")
    if not torch.is_tensor(ref):
        return abs(float(value) - ref) / abs(ref) if ref != 0 else abs(float(value))
    num = 0.0
    den = 0.0
    for r0 in range(0, ref.shape[0], chunk_rows):
        r = ref[r0:r0 + chunk_rows]
        num += float(((value[r0:r0 + chunk_rows].double() - r) ** 2).sum())
        den += float((r ** 2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


# ------------------------------------------------------------------------------------------
# Methods: each factory returns loss(x, w, y) -> scalar tensor, or raises with the reason


def cce_filter_eps(dtype: torch.dtype) -> float:
    """Cut Cross-Entropy's default filter_eps ("auto"): eps(dtype)/32, 2**-12 in bf16."""
    return torch.finfo(dtype).eps / 32


def _lce(cce_filter=False, **options):
    """lce_torch with these options; cce_filter: filter_eps at Cut Cross-Entropy's default for
    the inputs' dtype (the filter is approximate: dZ entries with p < filter_eps become 0)."""

    def factory():
        sys.path.insert(0, str(ROOT / "examples" / "pytorch"))
        import lce_torch

        def loss(x, w, y):
            if cce_filter:
                return lce_torch.linear_cross_entropy(x, w, y, **options,
                                                      filter_eps=cce_filter_eps(x.dtype))
            return lce_torch.linear_cross_entropy(x, w, y, **options)

        def describe(n, d, v, dtype):
            # the gradients in the forward (grad_in_forward, stored) follow forward_backward's
            # plan, the others the backward's
            in_forward = options.get("grad_in_forward") or options.get("strategy") == "stored"
            choose = (lce_torch.choose_forward_backward if in_forward
                      else lce_torch.choose_backward)
            choice = choose(
                n, d, v, dtype, fp32_weight_grad=options.get("fp32_weight_grad", False),
                strategy=options.get("strategy", "auto"),
                memory_budget=options.get("memory_budget"))
            fused = ", gradients in the forward" if options.get("grad_in_forward") else ""
            filtered = (f", filter_eps 2**{math.log2(cce_filter_eps(dtype)):.0f}" if cce_filter
                        else "")
            return (f"{choice['strategy']} chunk {choice['chunk']}, workspace "
                    f"{choice['workspace_bytes'] / MIB:.0f} MiB{fused}{filtered}")

        loss.describe = describe
        return loss

    return factory


def _torch_eager():
    def loss(x, w, y):
        return F.cross_entropy((x @ w.T).float(), y)

    return loss


def _torch_compile():
    @torch.compile(dynamic=False)
    def loss(x, w, y):
        return F.cross_entropy((x @ w.T).float(), y)

    return loss


def _liger_triton():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()

    def loss(x, w, y):
        return module(w, x, y)

    return loss


def _liger_cutedsl():
    from liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction,
    )

    def loss(x, w, y):
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        #  label_smoothing, reduction, softcap, return_z_loss, accum_dtype, use_token_scaling,
        #  return_token_accuracy, return_predicted_tokens)
        out = LigerFusedLinearCrossEntropyFunction.apply(
            x, w, y, None, None, -100, 0.0, 0.0, "mean", None, False, None, False, False, False)
        return out[0] if isinstance(out, tuple) else out

    return loss


def _liger_sm90():
    from liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy_sm90 import (
        liger_fused_linear_cross_entropy_sm90,
    )

    def loss(x, w, y):
        return liger_fused_linear_cross_entropy_sm90(x, w, y, ignore_index=-100, reduction="mean")

    return loss


def _cce(filter_eps="default"):
    def factory():
        from cut_cross_entropy import linear_cross_entropy

        def loss(x, w, y):
            if filter_eps == "default":
                return linear_cross_entropy(x, w, y)
            return linear_cross_entropy(x, w, y, filter_eps=filter_eps)

        return loss

    return factory


def _quack():
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    def loss(x, w, y):
        # quack's default chunk of 4096 rows, but 8192 where that equals D: its epilogue cannot
        # tell a row vector from a column vector when the chunk is square ("m == n makes
        # row/col inference ambiguous" at Llama 3's D = 4096)
        chunk = 8192 if x.shape[1] == 4096 else 4096
        return chunked_linear_cross_entropy(x, w, y, chunk_size=chunk, reduction="mean")

    return loss


METHODS = {
    # lce: the default (auto: vocab_chunked with dW in the weight's dtype, 256 MiB budget),
    # then each strategy with the budget it wants
    "lce": _lce(),
    "lce_filtered": _lce(cce_filter=True),
    "lce_vocab_1g": _lce(strategy="vocab_chunked", memory_budget=GIB),
    "lce_vocab_fused": _lce(strategy="vocab_chunked", memory_budget=GIB, grad_in_forward=True),
    "lce_row_fp32": _lce(strategy="row_chunked", fp32_weight_grad=True, memory_budget=4 * GIB),
    "lce_row_fp32_fused": _lce(strategy="row_chunked", fp32_weight_grad=True,
                               memory_budget=4 * GIB, grad_in_forward=True),
    # no recomputation: the forward's e^(z - m) kept in 16 bits (n·V·2 bytes), asked for; what
    # auto takes with the gradients in the forward and 4 GiB; and stored row chunks within
    # 1 GiB with an fp32 dW
    "lce_stored": _lce(strategy="stored"),
    "lce_auto_4g_fused": _lce(memory_budget=4 * GIB, grad_in_forward=True),
    "lce_rows_1g_fp32_fused": _lce(memory_budget=GIB, fp32_weight_grad=True,
                                   grad_in_forward=True),
    "torch_eager": _torch_eager,
    "torch_compile": _torch_compile,
    "liger_triton": _liger_triton,
    "liger_cutedsl": _liger_cutedsl,
    "liger_sm90": _liger_sm90,
    "cce": _cce(),
    "cce_exact": _cce(filter_eps=None),
    "quack": _quack,
}


# ------------------------------------------------------------------------------------------
# Measurement


class Timer:
    def __init__(self, iters, warmup, flush=None):
        self.iters = iters
        self.warmup = warmup
        # Larger than any L2 (H200: 60 MB): writing it evicts the inputs before each run
        self.flush = (flush if flush is not None
                      else torch.empty(512 * MIB, dtype=torch.uint8, device="cuda"))
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def median_ms(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.flush.zero_()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            times.append(self.start.elapsed_time(self.end))
        return statistics.median(times)


def peak_mib(fn):
    """Peak allocation during fn beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def floor_times(x, w, timer):
    """cuBLAS floor: 1 GEMM (forward) and 3 GEMMs (forward+backward) of the shape, at least 20
    runs after 3 warm-ups whatever --iters says: the floor divides every row, and a short
    median right after the fp64 reference (clocks down under power) read 20% high once."""
    timer = Timer(max(timer.iters, 20), max(timer.warmup, 3), timer.flush)
    with torch.no_grad():
        fwd = timer.median_ms(lambda: x @ w.T)

        def three():
            z = x @ w.T
            z @ w  # dX = dZ·W (dZ has Z's shape and dtype)
            z.T @ x  # dW = dZᵀ·X

        fwdbwd = timer.median_ms(three)
    torch.cuda.empty_cache()
    return fwd, fwdbwd


def measure(name, loss_fn, x, w, y, ref, timer, floor):
    row = {"method": name, "status": "ok", "note": ""}
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad():
            loss_fn(x, w, y)

    def forward_backward():
        xs.grad = None
        ws.grad = None
        loss_fn(xs, ws, y).backward()

    # fwd+bwd first: one checked run, then time and memory
    xs.grad = ws.grad = None
    loss = loss_fn(xs, ws, y)
    loss.backward()
    torch.cuda.synchronize()
    row["err_loss"] = rel_error(loss.detach().double(), ref.loss)
    row["err_dx"] = rel_error(xs.grad, ref.dx)
    row["err_dw"] = rel_error(ws.grad, ref.dw)
    del loss
    row["fwdbwd_ms"] = timer.median_ms(forward_backward)
    outputs = (xs.numel() * xs.element_size() + ws.numel() * ws.element_size()) / MIB
    xs.grad = ws.grad = None
    row["fwdbwd_peak_mib"] = peak_mib(forward_backward)
    row["fwdbwd_extra_mib"] = row["fwdbwd_peak_mib"] - outputs
    xs.grad = ws.grad = None
    del xs, ws
    row["fwd_ms"] = timer.median_ms(forward)
    row["fwd_peak_mib"] = peak_mib(forward)
    row["fwd_ratio"] = row["fwd_ms"] / floor[0]
    row["fwdbwd_ratio"] = row["fwdbwd_ms"] / floor[1]
    return row


def fmt(value, spec):
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_row(r):
    print(f"{r['shape']:<18} {r['family']:<7} {r['method']:<19} "
          f"{fmt(r.get('fwd_ms'), '9.2f')} {fmt(r.get('fwd_ratio'), '6.2f')} "
          f"{fmt(r.get('fwdbwd_ms'), '9.2f')} {fmt(r.get('fwdbwd_ratio'), '6.2f')} "
          f"{fmt(r.get('fwd_peak_mib'), '9.0f')} {fmt(r.get('fwdbwd_peak_mib'), '9.0f')} "
          f"{fmt(r.get('fwdbwd_extra_mib'), '9.0f')} "
          f"{fmt(r.get('err_loss'), '9.1e')} {fmt(r.get('err_dx'), '9.1e')} "
          f"{fmt(r.get('err_dw'), '9.1e')}  {r.get('note', '')}", flush=True)


HEADER = (f"{'shape':<18} {'family':<7} {'method':<19} {'fwd ms':>9} {'xfloor':>6} "
          f"{'f+b ms':>9} {'xfloor':>6} {'fwd MiB':>9} {'f+b MiB':>9} {'extra':>9} "
          f"{'err loss':>9} {'err dX':>9} {'err dW':>9}  note")


def parse_shape(text):
    try:
        n, d, v = (int(t) for t in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxDxV") from None
    return n, d, v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated NxDxV (default: the shapes of bench/lce_bench.cu)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="comma-separated data families: flat, peaked, lm")
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods, or 'all': " + ", ".join(METHODS))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--iters", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SHAPE}, lm data, 5 timed runs: a quick check")
    args = parser.parse_args(argv)

    if args.quick:
        args.shapes, args.families, args.iters, args.warmup = QUICK_SHAPE, "lm", 5, 2
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            parser.error(f"unknown family {f!r} (flat, peaked, lm)")
    names = list(METHODS) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    for m in names:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    if not torch.cuda.is_available():
        print("peers.py: no CUDA device", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.backends.cuda.matmul.allow_tf32 = False

    device = torch.cuda.get_device_properties(0)
    print(f"peers.py: {device.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{args.dtype}, seed {seed}, median of {args.iters} runs after {args.warmup} warm-up, "
          f"L2 flushed", flush=True)

    methods = {}
    for name in names:
        try:
            methods[name] = METHODS[name]()
        except Exception as error:  # ImportError, missing CUDA DSL libraries, ...
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            print(f"  {name}: not importable: {reason}", flush=True)
            methods[name] = reason
    rows = []
    timer = Timer(args.iters, args.warmup)
    writer = None
    if args.csv:  # written row by row: a run cut short still leaves what it measured
        path = pathlib.Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        csv_file = path.open("w", newline="")
        writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()

    def emit(r):
        rows.append(r)
        print_row(r)
        if writer is not None:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
            csv_file.flush()

    for n, d, v in shapes:
        shape = f"{n}x{d}x{v}"
        common = {"shape": shape, "n": n, "d": d, "v": v, "dtype": args.dtype}
        for family in families:
            x, w, y = make_data(family, n, d, v, dtype, seed)
            began = time.time()
            ref = Reference(x, w, y)
            torch.cuda.synchronize()
            floor = floor_times(x, w, timer)
            print(f"\n{shape} {family}: reference loss {ref.loss:.4f} "
                  f"({time.time() - began:.1f} s with the floor); cuBLAS floor: fwd "
                  f"{floor[0]:.2f} ms, fwd+bwd {floor[1]:.2f} ms", flush=True)
            print(HEADER, flush=True)
            floor_row = dict(common, family=family, method="cublas_floor", status="ok",
                             fwd_ms=floor[0], fwdbwd_ms=floor[1], fwd_ratio=1.0,
                             fwdbwd_ratio=1.0, note="torch.matmul: 1 GEMM / 3 GEMMs")
            emit(floor_row)
            for name, fn in methods.items():
                if isinstance(fn, str):
                    row = dict(common, family=family, method=name, status="not importable",
                               note=fn)
                else:
                    try:
                        row = dict(common, family=family, **measure(name, fn, x, w, y, ref,
                                                                     timer, floor))
                        if hasattr(fn, "describe"):
                            row["note"] = fn.describe(n, d, v, dtype)
                    except torch.cuda.OutOfMemoryError:
                        row = dict(common, family=family, method=name, status="failed",
                                   note="out of memory")
                    except Exception as error:
                        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                        if os.environ.get("PEERS_TRACEBACK"):
                            traceback.print_exc()
                        row = dict(common, family=family, method=name, status="failed",
                                   note=reason)
                gc.collect()
                torch.cuda.empty_cache()
                emit(row)
            # The floor again after the methods: the ratios above divide by the first one, so
            # a drift of the machine between the two shows here (and in the CSV).
            again = floor_times(x, w, timer)
            drift = max(abs(again[0] / floor[0] - 1), abs(again[1] / floor[1] - 1))
            emit(dict(common, family=family, method="cublas_floor_after", status="ok",
                      fwd_ms=again[0], fwdbwd_ms=again[1], fwd_ratio=again[0] / floor[0],
                      fwdbwd_ratio=again[1] / floor[1],
                      note=f"the floor measured again after the methods: drift {drift:.1%}"))
            del x, w, y, ref
            gc.collect()
            torch.cuda.empty_cache()

    # The ratios over the fastest floor of the run (the lower of the two floor measurements of
    # each shape and family): what bench/RESULTS.md reports.
    fastest = {}
    for r in rows:
        if r.get("method") in ("cublas_floor", "cublas_floor_after"):
            key = (r["shape"], r["family"])
            f = fastest.setdefault(key, [float("inf"), float("inf")])
            f[0] = min(f[0], r["fwd_ms"])
            f[1] = min(f[1], r["fwdbwd_ms"])
    print("\nratios over the fastest floor of the run (fwd, fwd+bwd):")
    for r in rows:
        key = (r.get("shape"), r.get("family"))
        if key in fastest and r.get("status") == "ok" and not r["method"].startswith("cublas"):
            f = fastest[key]
            print(f"{key[0]:<18} {key[1]:<7} {r['method']:<24} {r['fwd_ms'] / f[0]:6.2f} "
                  f"{r['fwdbwd_ms'] / f[1]:6.2f}")

    if writer is not None:
        csv_file.close()
        print(f"\npeers.py: wrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
