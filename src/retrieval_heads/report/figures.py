"""Layer x head heatmaps as PNG bytes: one per experiment, and one grid of all of them.

Drawn on matplotlib ``Figure`` objects (Agg canvas, no pyplot, no display needed). Layers run down the
y axis from layer 0 at the top, heads along x; the top five heads are numbered in their cells.

Legibility: every text of the all-experiments grid and of the depth figures is at least :data:`MIN_PX`
pixels tall in the PNG (font size in points x dpi / 72), every panel has layer and head ticks and a colour bar
with several labelled ticks, and text on a coloured cell is black or white, whichever contrasts more with
that cell's colour (:func:`text_colour`). The lift panel's colour scale is fixed, logarithmic from 1x
(chance) to 100x, so a 1.5x lift looks dim whatever else the figure holds.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections import defaultdict

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from ..results import parse_head
from .collect import Experiment
from .tables import score_text

CMAP = "viridis"
MARK = 5  # numbered top heads
MIN_PX = 10  # the smallest text height, in pixels, in the grid and depth figures
LIFT_RANGE = (1.0, 100.0)  # the lift colour scale: chance (1x) to 100x, logarithmic; beyond it, the end colours
LIFT_TICKS = (1, 2, 5, 10, 20, 50, 100)


def points(dpi: float, px: float = MIN_PX) -> float:
    """The font size in points that is ``px`` pixels tall at ``dpi`` (a point is 1/72 inch)."""
    return px * 72 / dpi


def text_colour(rgba) -> str:
    """"black" or "white", whichever has the higher contrast ratio (WCAG relative luminance) with ``rgba``."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b, _ = to_rgba(rgba)
    lum = 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def head_ticks(n: int, most: int) -> list[int]:
    """At most ``most`` evenly spaced tick positions over 0..n-1, 0 included."""
    return list(range(0, n, max(1, math.ceil(n / most))))


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


def drawn_grid(exp: Experiment) -> np.ndarray:
    """The (L, H) grid as drawn: scaled by :func:`drawn_scale`, the layers of a hybrid without attention blank
    (NaN)."""
    grid = exp.scores  # (L, H)
    L, _ = grid.shape
    grid = grid * drawn_scale(grid)  # as drawn (a new array)
    layers = exp.record.get("attention_layers")
    if layers is not None:  # a hybrid: the layers without attention stay blank
        grid[[layer for layer in range(L) if layer not in set(layers)]] = np.nan
    return grid


def number(ax, rank: int, layer: int, head: int, fontsize: float, colour: str):
    """A top head's rank, written in its cell."""
    return ax.text(head, layer, str(rank), ha="center", va="center", fontsize=fontsize, color=colour,
                   fontweight="bold")


def _draw(ax, exp: Experiment, fontsize: float, ticks: bool, numbers: bool = True):
    grid = drawn_grid(exp)  # (L, H)
    L, H = grid.shape
    image = ax.imshow(grid, cmap=CMAP, aspect="auto", interpolation="nearest", origin="upper")
    for rank, name in enumerate(exp.ranked[:MARK] if numbers else [], 1):
        layer, head = parse_head(name)
        number(ax, rank, layer, head, fontsize, text_colour(image.cmap(image.norm(grid[layer, head]))))
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
    return _png(heatmap_figure(exp, dpi, regions), dpi)


def number_size(dpi: float) -> float:
    """The font size of the numbered heads of an experiment's heatmap: at least 10 px."""
    return max(8.0, points(dpi))


def heatmap_figure(exp: Experiment, dpi: int = 90, regions: list | None = None) -> Figure:
    """The figure of :func:`heatmap`, drawn for ``dpi``."""
    L, H = exp.shape
    w, h = min(12.0, max(5.0, 1.8 + 0.3 * H)), min(12.0, max(4.5, 1.4 + 0.17 * L))
    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.2 / w, bottom=0.55 / h, top=1 - 0.65 / h)
    ax = fig.add_subplot()
    image = _draw(ax, exp, fontsize=number_size(dpi), ticks=True)
    bar = fig.colorbar(image, ax=ax, label="score")
    f = drawn_scale(exp.scores)
    if f != 1.0:
        bar.formatter = FuncFormatter(lambda v, _: score_text(float(v) / f))  # a Python float: inf, no warning
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(heatmap_title(exp), fontsize=10)
    if regions is not None:
        regions.append(region(ax, L, H))
    return fig


def heatmap_title(exp: Experiment) -> str:
    top = exp.record["head_rankings"][0]
    return (f"{exp.model} · {exp.question} · {exp.tokens} tokens\n"
            f"{exp.method}, {exp.record['samples_processed']} samples · top {top['head']} "
            f"({score_text(top['score'])})")


def grid(exps: list[Experiment], regions: list | None = None) -> bytes:
    """All experiments: a row per (method, model, question), a column per length; colours per panel, each
    panel with its colour scale (a bar with labelled ticks), layer and head ticks. With ``regions``, each
    panel's place is appended to it, ``exp`` being the experiment's index in ``exps``."""
    fig, dpi = grid_figure(exps, regions)
    return _png(fig, dpi)


def grid_figure(exps: list[Experiment], regions: list | None = None) -> tuple[Figure, int]:
    """The figure of :func:`grid` and the dpi it is saved at."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows, lengths, _, _ = grid_layout(exps)
    several = len({e.method for e in exps}) > 1
    nr, nc = len(rows), len(lengths)
    dpi = 80 if nr * nc <= 48 else 64
    pt = points(dpi)
    fig = Figure(figsize=(1.8 + 4.4 * nc, 1.1 + 4.2 * nr))
    axes = fig.subplots(nr, nc, squeeze=False)
    for i, ((method, model, question), by_len) in enumerate(rows.items()):
        for j, t in enumerate(lengths):
            ax = axes[i, j]
            if t not in by_len:
                ax.axis("off")
                ax.text(0.5, 0.5, "—", ha="center", va="center", transform=ax.transAxes, color="#888")
            else:
                e = by_len[t]
                image = _draw(ax, e, fontsize=pt, ticks=False, numbers=False)
                L, H = e.shape
                ax.set_xticks(head_ticks(H, 5))
                ax.set_yticks(head_ticks(L, 6))
                ax.tick_params(labelsize=pt, length=2, pad=1)
                ax.set_title(f"{t} tok · {e.ranked[0]}", fontsize=pt)
                ax.set_xlabel("head", fontsize=pt, labelpad=1)
                lo, hi = float(e.scores.min()), float(e.scores.max())
                bar = fig.colorbar(image, ax=ax, fraction=0.1, pad=0.03, aspect=25)
                f = drawn_scale(e.scores)
                if hi > lo:
                    bar.locator = MaxNLocator(nbins=4)
                    bar.formatter = FuncFormatter(lambda v, pos, f=f: f"{float(v) / f:.3g}")
                    bar.update_ticks()
                else:
                    bar.set_ticks([lo * f], labels=[score_text(lo)])
                bar.ax.tick_params(labelsize=pt, length=2, pad=1)
            if j == 0:
                label = f"{model}\n{question}" + (f"\n{method}" if several else "") + "\nlayer"
                if t not in by_len:  # keep the row's label visible on an empty panel
                    ax.axis("on")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_visible(False)
                ax.set_ylabel(label, fontsize=pt)
    w, h = fig.get_size_inches()
    title = textwrap.wrap("Layer (down) x head (across) per experiment; colours scaled per panel (its bar: "
                          "the score), top head boxed", width=int(w * 8.5))
    fig.suptitle("\n".join(title), fontsize=pt, y=1 - 0.12 / h, va="top")
    fig.subplots_adjust(left=1.3 / w, right=1 - 0.75 / w, bottom=0.55 / h, top=1 - (0.6 + 0.2 * len(title)) / h,
                        wspace=0.4, hspace=0.45)
    if regions is not None:
        index = {id(e): k for k, e in enumerate(exps)}
        for i, (_, by_len) in enumerate(rows.items()):
            for j, t in enumerate(lengths):
                if t in by_len:
                    e = by_len[t]
                    regions.append(region(axes[i, j], *e.shape, exp=index[id(e)]))
    return fig, dpi


GRID_LENGTHS = 12  # at most this many lengths across the all-experiments grid (evenly spaced, ends kept) ...
GRID_ROWS = 24  # ... and this many (method, model, question) rows (the first, in order)


def spread(n: int, most: int) -> list[int]:
    """``most`` indices of 0..n-1 spread evenly, the first and the last included (all of them if n <= most).

    >>> spread(530, 4)
    [0, 176, 353, 529]
    """
    if n <= most:
        return list(range(n))
    return sorted({round(k * (n - 1) / (most - 1)) for k in range(most)})


def grid_layout(exps: list[Experiment]) -> tuple[dict[tuple, dict[int, Experiment]], list[int], int, int]:
    """The all-experiments grid's rows ((method, model, question) -> {tokens: experiment}) and lengths, at most
    :data:`GRID_ROWS` and :data:`GRID_LENGTHS` of them (a grid of 530 lengths is 149,000 px wide and took two
    minutes to draw; every experiment keeps its own heatmap), and how many rows and lengths there are."""
    rows: dict[tuple, dict[int, Experiment]] = defaultdict(dict)
    for e in exps:
        rows[(e.method, e.model, e.question_label)][e.tokens] = e
    lengths = sorted({e.tokens for e in exps})
    n_rows, n_lengths = len(rows), len(lengths)
    lengths = [lengths[i] for i in spread(n_lengths, GRID_LENGTHS)]
    kept = {}
    for key, by_len in list(rows.items())[:GRID_ROWS]:
        kept[key] = {t: e for t, e in by_len.items() if t in set(lengths)}
    return kept, lengths, n_rows, n_lengths



def depth_grid(group: dict, dpi: int = 100) -> bytes:
    """The needle-in-a-haystack picture of one (method, model, question) (see :mod:`.depth`): needle depth
    down (shallow at the top), length across; the accuracy (fixed 0..1 scale) where answers were recorded, and
    beside it the top head's lift over chance (fixed logarithmic scale, 1x to 100x: :data:`LIFT_RANGE`), each
    cell naming its top head; each panel with its colour bar.
    A cell without a result is grey and marked "—"."""
    return _png(depth_figure(group, dpi), dpi)


def depth_figure(group: dict, dpi: int = 100) -> Figure:
    """The figure of :func:`depth_grid`, drawn for ``dpi`` (its text at least :data:`MIN_PX` pixels tall)."""
    import numpy as np

    depths, lengths = group["depths"], group["tokens"]
    from matplotlib.colors import Normalize

    pt = points(dpi)
    acc_cmap = colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    lift_cmap = colormaps[CMAP]
    lift_cmap = lift_cmap.with_extremes(bad="#dddddd", under=lift_cmap(0.0), over=lift_cmap(1.0))
    panels = [("accuracy", "accuracy", acc_cmap, Normalize(0.0, 1.0))] if group["answers_recorded"] else []
    panels.append(("top_lift", "top head's lift (x chance)", lift_cmap, LogNorm(*LIFT_RANGE)))
    nd, nt = len(depths), len(lengths)
    pw, ph = 1.6 + 1.45 * nt, 1.0 + 0.62 * nd
    fig = Figure(figsize=(0.4 + len(panels) * (pw + 1.3), ph + 0.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (field, label, cmap, norm) in zip(axes, panels):
        grid = np.array([[np.nan if x is None else x for x in row] for row in group[field]], dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
                          origin="upper")
        for i in range(nd):
            for j in range(nt):
                v = grid[i, j]
                if not np.isfinite(v):
                    text, colour = "—", "black"  # on the grey of a missing cell
                else:
                    colour = text_colour(cmap(norm(v)) if field == "accuracy" or v > 0 else cmap.get_under())
                    text = f"{v:.2f}" if field == "accuracy" else f"{group['top_head'][i][j]}\n{v:.1f}x"
                ax.text(j, i, text, ha="center", va="center", fontsize=pt, color=colour)
        ax.set_xticks(range(nt), [str(t) for t in lengths], fontsize=pt)
        ax.set_yticks(range(nd), [f"{d:g}" for d in depths], fontsize=pt)
        ax.set_xlabel("tokens", fontsize=pt)
        ax.set_ylabel("needle depth", fontsize=pt)
        ax.set_title(label, fontsize=pt * 1.1)
        if field == "top_lift":
            bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.04, extend="both")
            bar.set_ticks(LIFT_TICKS, labels=[f"{t:g}x" for t in LIFT_TICKS])
            bar.minorticks_off()
        else:
            bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.04)
        bar.ax.tick_params(labelsize=pt)
        bar.set_label(label, fontsize=pt)
    fig.suptitle(f"{group['model']} · {group['question']} · {group['method']}", fontsize=pt * 1.1)
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=1.0 / w, right=1 - 0.3 / w, bottom=0.75 / h, top=1 - 0.65 / h, wspace=0.35)
    return fig
