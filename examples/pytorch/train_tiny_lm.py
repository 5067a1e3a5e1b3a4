"""Trains a small GPT-style language model twice on the same locally generated data — once with
lce_torch's fused loss, once with logits + F.cross_entropy — and reports time per step, peak
memory and both loss curves (printed, and drawn into a PNG).

    python examples/pytorch/train_tiny_lm.py                      # 300 steps, V = 32768, bf16
    python examples/pytorch/train_tiny_lm.py --steps 100 --vocab 128256 --out curves.png

The data are sequences of a random Markov chain over the vocabulary (each token has a few
likely successors), so the loss falls quickly towards the chain's entropy; both runs start
from the same initialization and see the same batches. The model computes in bf16 under
autocast with fp32 parameters (AdamW). The LM head's loss is where lce saves memory: the
plain run materializes [batch·seq, V] logits (in bf16, then fp32 for the loss).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import struct
import sys
import time
import zlib

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # lce_torch from the checkout


class TinyGPT(nn.Module):
    def __init__(self, vocab, dim, layers, heads, seq):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(seq, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def hidden(self, tokens):
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.norm(h)


def loss_lce(model, tokens):
    import lce_torch

    return lce_torch.linear_cross_entropy(model.hidden(tokens), model.lm_head.weight, tokens,
                                          shift=True)


def loss_torch(model, tokens):
    logits = model.lm_head(model.hidden(tokens))
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))


def markov_data(steps, batch, seq, vocab, device, seed, successors=4):
    """steps batches of [batch, seq] token ids from a random Markov chain."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, successors), generator=g).to(device)
    probs = torch.tensor([0.55, 0.25, 0.12, 0.08][:successors], device=device)
    rows = steps * batch
    tokens = torch.empty(rows, seq, dtype=torch.long, device=device)
    tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=g).to(device)
    pick = torch.multinomial(probs, rows * (seq - 1), replacement=True,
                             generator=None).view(rows, seq - 1)
    for t in range(1, seq):
        tokens[:, t] = table[tokens[:, t - 1], pick[:, t - 1]]
    entropy = -(probs * probs.log()).sum().item()
    return tokens.view(steps, batch, seq), entropy


def step(loss_fn, model, optimizer, tokens, device, dtype):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(model, tokens)
    loss.backward()
    optimizer.step()
    return loss


def profile_steps(name, loss_fn, model, optimizer, data, device, dtype, steps=3, rows=15):
    """A few more steps under torch.profiler: where a step's time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for tokens in data[:steps]:
            step(loss_fn, model, optimizer, tokens, device, dtype)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "cpu_time_total"
    if cuda:
        key = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    print(f"== {name}: {steps} steps under torch.profiler, by {key}")
    print(events.table(sort_by=key, row_limit=rows))


def train(name, loss_fn, model, data, lr, device, dtype, profile=False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for tokens in data:
        start = time.perf_counter()
        loss = step(loss_fn, model, optimizer, tokens, device, dtype)
        losses.append(loss.item())  # synchronizes: the step's time is the GPU's
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    warm = times[min(10, len(times) // 2):]
    ms = 1e3 * sum(warm) / len(warm)
    if profile:  # after the timed steps and the peak, so that neither includes the profiler
        profile_steps(name, loss_fn, model, optimizer, data, device, dtype)
    return {"name": name, "losses": losses, "ms": ms, "peak_mib": peak}


# ------------------------------------------------------------------------------------------
# The PNG: matplotlib when it is installed, else a small rasterizer (the GPU machines are
# offline and may not have it).


def _png_bytes(width, height, pixels):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3])
                   for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _draw_plain(path, runs, colors, width=800, height=500, margin=40):
    pixels = bytearray([255]) * (width * height * 3)

    def put(x, y, color):
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i:i + 3] = bytes(color)

    def line(x0, y0, x1, y1, color):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(steps + 1):
            x = round(x0 + (x1 - x0) * k / steps)
            y = round(y0 + (y1 - y0) * k / steps)
            put(x, y, color)
            put(x, y + 1, color)

    values = [v for run in runs for v in run["losses"]]
    low, high = min(values), max(values)
    span = max(high - low, 1e-9)
    n = max(len(run["losses"]) for run in runs)
    sx = (width - 2 * margin) / max(n - 1, 1)
    sy = (height - 2 * margin) / span
    line(margin, height - margin, width - margin, height - margin, (0, 0, 0))
    line(margin, margin, margin, height - margin, (0, 0, 0))
    for run, color in zip(runs, colors):
        points = [(margin + round(i * sx), height - margin - round((v - low) * sy))
                  for i, v in enumerate(run["losses"])]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            line(x0, y0, x1, y1, color)
    pathlib.Path(path).write_bytes(_png_bytes(width, height, pixels))


def save_plot(path, runs, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        colors = [(31, 119, 180), (255, 127, 14)]
        _draw_plain(path, runs, colors)
        legend = ", ".join(f"{run['name']} = {c}" for run, c in
                           zip(runs, ["blue", "orange"]))
        return f"{path} (no matplotlib: plain axes, {legend}; x = step, y = loss)"
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        label = f"{run['name']}: {run['ms']:.1f} ms/step"
        if run["peak_mib"] is not None:
            label += f", peak {run['peak_mib']:.0f} MiB"
        ax.plot(run["losses"], label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--loss", choices=["both", "lce", "torch"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="tiny_lm_loss.png")
    parser.add_argument("--profile", action="store_true",
                        help="after each run, 3 more steps under torch.profiler: its top kernels")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.loss != "torch" and device.type != "cuda":
        parser.error("lce runs on a CUDA device; use --loss torch on the CPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    data, entropy = markov_data(args.steps, args.batch, args.seq, args.vocab, device, args.seed)
    torch.manual_seed(args.seed)
    initial = TinyGPT(args.vocab, args.dim, args.layers, args.heads, args.seq).to(device)
    params = sum(p.numel() for p in initial.parameters())
    print(f"TinyGPT: {params / 1e6:.1f} M parameters, V = {args.vocab}, D = {args.dim}, "
          f"{args.layers} layers; batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{args.dtype} autocast on {device}; the data's entropy: {entropy:.3f} nats/token")

    runs = []
    for name, fn in (("lce", loss_lce), ("torch", loss_torch)):
        if args.loss not in ("both", name):
            continue
        model = TinyGPT(args.vocab, args.dim, args.layers, args.heads, args.seq).to(device)
        model.load_state_dict(initial.state_dict())
        runs.append(train(name, fn, model, data, args.lr, device, dtype, args.profile))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"{'loss':<6} {'ms/step':>8} {'peak MiB':>9} {'first':>7} {'last 20':>8}")
    for run in runs:
        tail = run["losses"][-20:]
        peak = f"{run['peak_mib']:.0f}" if run["peak_mib"] is not None else "-"
        print(f"{run['name']:<6} {run['ms']:>8.2f} {peak:>9} {run['losses'][0]:>7.3f} "
              f"{sum(tail) / len(tail):>8.3f}")
    if len(runs) == 2:
        gap = max(abs(a - b) for a, b in zip(runs[0]["losses"], runs[1]["losses"]))
        print(f"largest per-step difference of the two curves: {gap:.4f}")
    for run in runs:
        if not all(math.isfinite(v) for v in run["losses"]):
            print(f"error: the {run['name']} run produced a non-finite loss", file=sys.stderr)
            return 1
    where = save_plot(args.out, runs, f"TinyGPT, V = {args.vocab}, {args.dtype}")
    print(f"loss curves: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
