"""Layer x head heatmaps as PNG bytes: one per experiment, and one grid of all of them.

Drawn on matplotlib ``Figure`` objects (Agg canvas, no pyplot, no display needed). Layers run down the
y axis from layer 0 at the top, heads along x; the top five heads are numbered in their cells.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections import defaultdict

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from ..results import parse_head
from .collect import Experiment
from .tables import score_text

CMAP = "viridis"
MARK = 5  # numbered top heads


def _png(fig: Figure, dpi: int) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def drawn_scale(grid) -> float:
    """The power of two the grid is drawn multiplied by: 1, or less for scores so large (+-1.7e308 are
    finite) that matplotlib's colour scale would overflow; its colour bar labels the real values."""
    big = float(np.abs(grid).max(initial=0.0))
    return 1.0 if big <= 1e300 else 2.0 ** -math.ceil(math.log2(big / 1e300))


def _draw(ax, exp: Experiment, fontsize: float, ticks: bool, numbers: bool = True):
    grid = exp.scores  # (L, H)
    L, H = grid.shape
    grid = grid * drawn_scale(grid)  # as drawn (a new array)
    layers = exp.record.get("attention_layers")
    if layers is not None:  # a hybrid: the layers without attention stay blank
        grid[[layer for layer in range(L) if layer not in set(layers)]] = np.nan
    image = ax.imshow(grid, cmap=CMAP, aspect="auto", interpolation="nearest", origin="upper")
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    for rank, name in enumerate(exp.ranked[:MARK] if numbers else [], 1):
        layer, head = parse_head(name)
        light = hi > lo and (grid[layer, head] - lo) / (hi - lo) < 0.6
        ax.text(head, layer, str(rank), ha="center", va="center", fontsize=fontsize,
                color="white" if light else "black", fontweight="bold")
    top_l, top_h = parse_head(exp.ranked[0])
    ax.add_patch(Rectangle((top_h - 0.5, top_l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    if ticks:
        ax.set_xticks(range(0, H, max(1, H // 16)))
        ax.set_yticks(range(0, L, max(1, L // 16)))
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def region(ax, rows: int, cols: int, **extra) -> dict:
    """Where an axes' image lies in its figure, in percent from the top left (for the page's click overlay)."""
    box = ax.get_position()  # figure fractions, origin bottom left
    return {"left": round(100 * box.x0, 3), "top": round(100 * (1 - box.y1), 3), "width": round(100 * box.width, 3),
            "height": round(100 * box.height, 3), "rows": rows, "cols": cols, **extra}


def heatmap(exp: Experiment, dpi: int = 90, regions: list | None = None) -> bytes:
    """One experiment's (L, H) score grid with a colorbar; title: model, question, tokens, method. With
    ``regions``, the heatmap's place in the picture is appended to it (:func:`region`)."""
    L, H = exp.shape
    w, h = min(12.0, max(5.0, 1.8 + 0.3 * H)), min(12.0, max(4.5, 1.4 + 0.17 * L))
    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.2 / w, bottom=0.55 / h, top=1 - 0.65 / h)
    ax = fig.add_subplot()
    image = _draw(ax, exp, fontsize=8 if H <= 16 else 6, ticks=True)
    bar = fig.colorbar(image, ax=ax, label="score")
    f = drawn_scale(exp.scores)
    if f != 1.0:
        bar.formatter = FuncFormatter(lambda v, _: score_text(float(v) / f))  # a Python float: inf, no warning
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    top = exp.record["head_rankings"][0]
    ax.set_title(f"{exp.model} · {exp.question} · {exp.tokens} tokens\n"
                 f"{exp.method}, {exp.record['samples_processed']} samples · top {top['head']} "
                 f"({score_text(top['score'])})", fontsize=10)
    if regions is not None:
        regions.append(region(ax, L, H))
    return _png(fig, dpi)


def grid(exps: list[Experiment], regions: list | None = None) -> bytes:
    """All experiments: a row per (method, model, question), a column per length; colours per panel, each
    panel with its colour scale (min and max ticks). With ``regions``, each panel's place is appended to it,
    ``exp`` being the experiment's index in ``exps``."""
    rows: dict[tuple, dict[int, Experiment]] = defaultdict(dict)
    for e in exps:
        rows[(e.method, e.model, e.question_label)][e.tokens] = e
    lengths = sorted({e.tokens for e in exps})
    several = len({e.method for e in exps}) > 1
    nr, nc = len(rows), len(lengths)
    fig = Figure(figsize=(1.2 + 2.3 * nc, 0.6 + 2.5 * nr))
    axes = fig.subplots(nr, nc, squeeze=False)
    for i, ((method, model, question), by_len) in enumerate(rows.items()):
        for j, t in enumerate(lengths):
            ax = axes[i, j]
            if t not in by_len:
                ax.axis("off")
                ax.text(0.5, 0.5, "—", ha="center", va="center", transform=ax.transAxes, color="#888")
            else:
                e = by_len[t]
                image = _draw(ax, e, fontsize=6, ticks=False, numbers=False)
                ax.set_title(f"{t} tok · {e.ranked[0]}", fontsize=8)
                lo, hi = float(e.scores.min()), float(e.scores.max())
                bar = fig.colorbar(image, ax=ax, fraction=0.1, pad=0.03, aspect=25)
                f = drawn_scale(e.scores)
                bar.set_ticks([lo * f, hi * f] if hi > lo else [lo * f])
                bar.set_ticklabels([score_text(lo), score_text(hi)] if hi > lo else [score_text(lo)])
                bar.ax.tick_params(labelsize=6, length=2, pad=1)
            if j == 0:
                label = f"{model}\n{question}" + (f"\n{method}" if several else "")
                if t not in by_len:  # keep the row's label visible on an empty panel
                    ax.axis("on")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_visible(False)
                ax.set_ylabel(label, fontsize=8)
    w, h = fig.get_size_inches()
    title = textwrap.wrap("Layer (down) x head (across) per experiment; colours scaled per panel (its bar: "
                          "lowest and highest score), top head boxed",
                          width=int(w * 11))
    fig.suptitle("\n".join(title), fontsize=9, y=1 - 0.12 / h, va="top")
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.45 / w, bottom=0.1 / h, top=1 - (0.55 + 0.15 * len(title)) / h,
                        wspace=0.3, hspace=0.28)
    if regions is not None:
        for i, (_, by_len) in enumerate(rows.items()):
            for j, t in enumerate(lengths):
                if t in by_len:
                    e = by_len[t]
                    regions.append(region(axes[i, j], *e.shape, exp=exps.index(e)))
    return _png(fig, dpi=72 if nr * nc <= 48 else 56)


def depth_grid(group: dict, dpi: int = 80) -> bytes:
    """The needle-in-a-haystack picture of one (method, model, question) (see :mod:`.depth`): needle depth
    down (shallow at the top), length across; the accuracy (fixed 0..1 scale) where answers were recorded, and
    beside it the top head's lift over chance (its scale from 1.0x, chance, or lower), each cell naming its top
    head; each panel with its colour bar.
    A cell without a result is grey and marked "—"."""
    import numpy as np

    depths, lengths = group["depths"], group["tokens"]
    panels = [("accuracy", "accuracy", "RdYlGn", (0.0, 1.0))] if group["answers_recorded"] else []
    lift = np.array([[np.nan if x is None else x for x in row] for row in group["top_lift"]], dtype=np.float64)
    finite = lift[np.isfinite(lift)]
    lo, hi = (min(1.0, float(finite.min())), float(finite.max())) if finite.size else (0.0, 1.0)  # 1.0x: chance
    panels.append(("top_lift", "top head's lift (x chance)", CMAP, (lo, hi if hi > lo else lo + 1e-9)))
    nd, nt = len(depths), len(lengths)
    pw, ph = 1.2 + 1.05 * nt, 0.9 + 0.42 * nd
    fig = Figure(figsize=(0.3 + len(panels) * (pw + 0.9), ph + 0.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (field, label, cmap, (vmin, vmax)) in zip(axes, panels):
        grid = np.array([[np.nan if x is None else x for x in row] for row in group[field]], dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps[cmap].with_extremes(bad="#dddddd"),
                          vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest", origin="upper")
        for i in range(nd):
            for j in range(nt):
                v = grid[i, j]
                if not np.isfinite(v):
                    text, dark = "—", True
                else:
                    frac = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                    dark = field == "accuracy" or frac > 0.6  # light cells get black text
                    text = f"{v:.2f}" if field == "accuracy" else f"{group['top_head'][i][j]}\n{v:.1f}x"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if dark else "white")
        ax.set_xticks(range(nt), [str(t) for t in lengths], fontsize=7)
        ax.set_yticks(range(nd), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("tokens", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(label, fontsize=9)
        bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.04)
        bar.ax.tick_params(labelsize=6)
        bar.set_label(label, fontsize=7)
    fig.suptitle(f"{group['model']} · {group['question']} · {group['method']}", fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.18, top=0.8, wspace=0.45)
    return _png(fig, dpi)
