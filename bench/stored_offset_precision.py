"""Rounding of the `stored` strategy's two forms, simulated on the CPU (float64 with bf16
rounding where the kernels round): the pass form (e^(z - m) per 256-column tile in bf16, dZ
formed from it and rounded to bf16, then the GEMMs) against the per-row-offset form
(kernel/stored_offset.cuh: e^(z - c) in bf16 with c = z_target + 20, f ⊙ X in bf16, the
target's entry t kept in fp32 and added to dX before its one rounding and to dW's target rows
after the GEMM's). Prints each form's relative Frobenius error of dX and dW against the exact
gradient of the same bf16 inputs, with targets drawn from the softmax and uniform ones (the GPU
tests' kind: a peaked row's target lies far down, and the offset form's second rounding, of
f ⊙ X on dW's side, shows). Needs torch (CPU is enough):

    python bench/stored_offset_precision.py
"""
import math

import torch


def rel(a, b):
    return (a.double() - b).norm().item() / b.norm().item()


def run(n=1024, d=256, v=8192, scale=3.0, lead=20.0, seed=0, uniform_targets=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).bfloat16()
    w = (torch.randn(v, d, generator=g) * scale / math.sqrt(d)).bfloat16()
    xd, wd = x.double(), w.double()
    z = xd @ wd.T
    if uniform_targets:  # targets unrelated to the logits: peaked rows' targets lie far down
        y = torch.randint(0, v, (n,), generator=g)
    else:  # targets drawn from the model's softmax, as a trained model's data would be
        y = torch.multinomial(torch.softmax(z, 1).float(), 1, generator=g).squeeze(1)
    lse = torch.logsumexp(z, 1)
    gs = 1.0 / (0.9 * n)  # the mean over a count of valid rows that is not a power of two
    rows = torch.arange(n)
    onehot = torch.zeros(n, v, dtype=torch.float64)
    onehot[rows, y] = 1
    dz = (torch.exp(z - lse[:, None]) - onehot) * gs
    ref_dx, ref_dw = dz @ wd, dz.T @ xd
    zf, lsef = z.float(), lse.float()
    zt = zf[rows, y]
    pt = torch.exp(zt - lsef)
    # the pass form
    tile = 256
    e1 = torch.empty(n, v)
    for t in range((v + tile - 1) // tile):
        cols = slice(t * tile, min(v, (t + 1) * tile))
        m = zf[:, cols].max(1).values
        e1[:, cols] = torch.exp(zf[:, cols] - m[:, None]).bfloat16().float() * torch.exp(m - lsef)[:, None]
    dz1 = e1 * gs
    dz1[rows, y] = (pt - 1) * gs
    dz1 = dz1.bfloat16().float()
    out = {"pass": (rel((dz1 @ w.float()).bfloat16(), ref_dx), rel((dz1.T @ x.float()).bfloat16(), ref_dw))}
    # the per-row-offset form
    c = zt + lead
    e2 = torch.exp(zf - c[:, None]).bfloat16().double()
    f = (gs * torch.exp(c - lsef)).double()
    e2[rows, y] = 0
    t = ((pt - 1) * gs).double()
    xs = (f[:, None] * xd).float().bfloat16().double()
    dx2 = (f[:, None] * (e2 @ wd) + t[:, None] * wd[y]).float().bfloat16()
    dw_gemm = (e2.T @ xs).float().bfloat16().double()
    dw2 = (dw_gemm + torch.zeros(v, d, dtype=torch.float64).index_add_(0, y, t[:, None] * xd)).float().bfloat16()
    out["offsets"] = (rel(dx2, ref_dx), rel(dw2, ref_dw))
    return out


if __name__ == "__main__":
    # Logit std up to 10: beyond it rows are flagged and recomputed, which this does not model.
    # The GPU test's 300 × 72 × 1000 too: few rows per vocabulary entry, so dW's columns sum
    # fewer roundings and the offset form's extra one weighs more.
    for (n, d, v), uniform in (((1024, 256, 8192), False), ((1024, 256, 8192), True),
                               ((300, 72, 1000), True)):
        for scale in (1.0, 3.0, 6.0) + ((10.0,) if uniform else ()):
            r = run(n=n, d=d, v=v, scale=scale, uniform_targets=uniform)
            p = r["pass"]
            print(f"{n}x{d}x{v}, targets {'uniform' if uniform else 'softmax'}, "
                  f"logit scale {scale}: " + "; ".join(
                f"{k}: dX {a:.2e} ({a / p[0]:.2f}x), dW {b:.2e} ({b / p[1]:.2f}x)"
                for k, (a, b) in r.items()))
