#!/usr/bin/env python3
"""plot.py: the CSV of bench/peers.py as pictures, under docs/.

One figure per data family: a row per shape, with the forward+backward time of every method
(bars; the forward alone as a lighter inner bar) beside the cuBLAS floors measured in the
same run (3 GEMMs for forward+backward as a solid line, 1 GEMM for the forward as a dashed
one), and the extra memory of every method's forward+backward (peak beyond the inputs and the
returned gradients; the floor is 0).

  python3 bench/plot.py bench/peers.csv                  # docs/peers_<family>.png
  python3 bench/plot.py bench/peers.csv --families lm --out-dir docs

Needs matplotlib (pip install matplotlib); runs anywhere, no GPU.
"""

from __future__ import annotations

import argparse
import collections
import csv
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def load(path):
    """{family: {shape: [row, ...]}} of the rows measured (status ok), in file order."""
    table = collections.OrderedDict()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("status") != "ok":
                continue
            table.setdefault(row["family"], collections.OrderedDict()).setdefault(
                row["shape"], []).append(row)
    return table


def color(method):
    if method.startswith("lce"):
        return "#1f77b4"
    if method.startswith("torch"):
        return "#7f7f7f"
    if method.startswith("liger"):
        return "#ff7f0e"
    if method.startswith("cce"):
        return "#2ca02c"
    if method.startswith("quack"):
        return "#9467bd"
    return "#8c564b"


def plot_family(family, shapes, out_dir, dpi):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 0.9 + 0.42 * max(
        len(rows) for rows in shapes.values()) * len(shapes) + 0.6 * len(shapes)), squeeze=False)
    for (shape, rows), (ax_time, ax_mem) in zip(shapes.items(), axes):
        # The fastest floor of the run: peers.py measures it before the methods and again after
        # them (cublas_floor_after), and the ratios it reports divide by the lower of the two.
        floors = [r for r in rows if r["method"] in ("cublas_floor", "cublas_floor_after")]
        floor = None
        if floors:
            floor = {key: str(min(number(r[key]) for r in floors))
                     for key in ("fwd_ms", "fwdbwd_ms")}
        methods = [r for r in rows if not r["method"].startswith("cublas_floor")]
        names = [r["method"] for r in methods]
        ypos = list(range(len(methods)))[::-1]
        for ax in (ax_time, ax_mem):
            ax.set_ylim(-0.7, max(len(methods), 3) - 0.3)
        colors = [color(m) for m in names]

        fwdbwd = [number(r["fwdbwd_ms"]) or 0.0 for r in methods]
        fwd = [number(r["fwd_ms"]) or 0.0 for r in methods]
        ax_time.barh(ypos, fwdbwd, color=colors, alpha=0.85, label="forward+backward")
        ax_time.barh(ypos, fwd, height=0.35, color="white", alpha=0.6, edgecolor="0.3",
                     linewidth=0.5, label="forward")
        for y, t, r in zip(ypos, fwdbwd, methods):
            ratio = number(r.get("fwdbwd_ratio"))
            if t and ratio:
                ax_time.text(t, y, f" {t:.1f} ms  {ratio:.2f}×", va="center", fontsize=8)
        if floor is not None:
            f3, f1 = number(floor["fwdbwd_ms"]), number(floor["fwd_ms"])
            if f3:
                ax_time.axvline(f3, color="black", linewidth=1.2,
                                label="cuBLAS floor, forward+backward (3 GEMMs)")
                ax_time.text(f3, max(len(methods), 3) - 0.35, f" {f3:.1f}", fontsize=7, va="top")
            if f1:
                ax_time.axvline(f1, color="black", linewidth=1.0, linestyle="--",
                                label="cuBLAS floor, forward (1 GEMM)")
                ax_time.text(f1, max(len(methods), 3) - 0.35, f" {f1:.1f}", fontsize=7, va="top")
        ax_time.set_yticks(ypos, names)
        ax_time.set_xlabel("time (ms), median, L2 flushed")
        ax_time.set_title(f"{shape} ({family}): time")
        ax_time.set_xlim(0, max(fwdbwd + [1.0]) * 1.35)

        extra = [number(r["fwdbwd_extra_mib"]) for r in methods]
        extra_gib = [(e or 0.0) / 1024 for e in extra]
        ax_mem.barh(ypos, extra_gib, color=colors, alpha=0.85)
        for y, e in zip(ypos, extra_gib):
            ax_mem.text(max(e, 0.0), y, f" {e:.2f} GiB", va="center", fontsize=8)
        ax_mem.axvline(0.0, color="black", linewidth=1.2)
        ax_mem.set_yticks(ypos, names)
        ax_mem.set_xlabel("extra memory of forward+backward (GiB): peak − inputs − dX − dW")
        ax_mem.set_title(f"{shape} ({family}): extra memory")
        ax_mem.set_xlim(min(0.0, min(extra_gib + [0.0])) * 1.2,
                        max(extra_gib + [0.1]) * 1.35)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"peers_{family}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="CSV written by bench/peers.py --csv")
    parser.add_argument("--families", default=None,
                        help="comma-separated families to plot (default: every one in the CSV)")
    parser.add_argument("--out-dir", default=str(ROOT / "docs"), help="where the PNGs go")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot.py: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 1
    table = load(args.csv)
    families = args.families.split(",") if args.families else list(table)
    for family in families:
        if family not in table:
            print(f"plot.py: no measured rows for family {family!r}", file=sys.stderr)
            continue
        path = plot_family(family, table[family], pathlib.Path(args.out_dir), args.dpi)
        print(f"plot.py: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
