"""The report's figures are legible: text at least 10 px tall, labelled colour bars, layer and head ticks,
text colours that contrast with their cell, and a fixed lift scale anchored at chance (1x)."""

import io
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from PIL import Image

from retrieval_heads.report import figures
from retrieval_heads.report.collect import Experiment
from retrieval_heads.report.figures import MIN_PX, text_colour


def experiment(tokens: int, question: str = "inc_state", L: int = 30, H: int = 9) -> Experiment:
    scores = np.linspace(0.0, 2.0, L * H).reshape(L, H)
    ranked = [f"L{i // H}H{i % H}" for i in np.argsort(-scores, axis=None)[:5]]
    record = {"method": "summed_attention", "model_key": "smollm2", "question": question, "total_tokens": tokens,
              "needle_position": 0.5, "num_layers": L, "num_heads": H, "scores": scores.tolist(),
              "head_rankings": [{"head": h, "score": 1.0} for h in ranked], "samples_processed": 4}
    return Experiment(record, Path("x.json"), "x.json")


def texts_px(fig, dpi):
    """(text, height in px) of every visible text of the figure, tick labels included."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    out = []
    for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize")):
        if t.get_visible() and t.get_text().strip():
            out.append((t.get_text(), t.get_fontsize() * dpi / 72))
    return out


def test_the_all_experiments_grid_is_legible():
    """Was 417 x 403 px for one panel, with ~5 px colour-bar labels (min and max only) and no ticks."""
    exps = [experiment(1024, "inc_state"), experiment(1024, "hq_state")]
    fig, dpi = figures.grid_figure(exps)
    small = [(s, px) for s, px in texts_px(fig, dpi) if px < MIN_PX - 1e-9]
    assert not small, small
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert len(panels) == 2
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "4", "6", "8"]  # heads
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "5", "10", "15", "20", "25"]  # layers
        assert ax.get_xlabel() == "head"
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2
    for bar in bars:
        labels = [t.get_text() for t in bar.get_yticklabels() if t.get_text()]
        assert labels == ["0", "0.5", "1", "1.5", "2"]
    png = Image.open(io.BytesIO(figures.grid([experiment(1024)])))
    assert png.width >= 480 and png.height >= 400


def test_an_experiments_heatmap_is_legible():
    """Its numbered top heads were 7.5 px (6 pt at 90 dpi) on a grid of more than 16 heads."""
    e = experiment(1024, H=32)
    fig = figures.heatmap_figure(e, dpi=90)
    small = [(s, px) for s, px in texts_px(fig, 90) if px < MIN_PX - 1e-9]
    assert not small, small
    numbers = list(fig.axes[0].texts)
    assert [t.get_text() for t in numbers] == ["1", "2", "3", "4", "5"]
    image = fig.axes[0].get_images()[0]
    for t in numbers:
        j, i = (round(x) for x in t.get_position())
        assert t.get_color() == text_colour(image.cmap(image.norm(image.get_array()[i, j])))


GROUP = {"method": "summed_attention", "model": "m", "question": "q", "depths": [0.1, 0.5, 0.9],
         "tokens": [1024, 2048], "answers_recorded": True,
         "accuracy": [[1.0, 0.0], [0.5, None], [0.25, 0.75]],
         "top_head": [["L0H1", "L2H3"], ["L1H1", None], ["L3H0", "L0H0"]],
         "top_lift": [[1.5, 100.0], [0.5, None], [250.0, 10.0]]}


def test_the_depth_figure_is_legible_with_contrasting_text():
    """Was 696 x 179 px with black text on dark red."""
    fig = figures.depth_figure(GROUP, dpi=100)
    small = [(s, px) for s, px in texts_px(fig, 100) if px < MIN_PX - 1e-9]
    assert not small, small
    png = Image.open(io.BytesIO(figures.depth_grid(GROUP)))
    assert png.width >= 900 and png.height >= 300
    for ax in [a for a in fig.axes if a.get_images() and a.get_label() != "<colorbar>"]:
        image = ax.get_images()[0]
        cells = [t for t in ax.texts if t.get_text() != "—"]
        assert len(cells) == 5
        for t in cells:
            j, i = (round(x) for x in t.get_position())
            v = image.get_array()[i, j]
            rgba = image.cmap.get_under() if v < image.norm.vmin else image.cmap(image.norm(v))
            lum = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]  # rough: dark cells need white
            assert t.get_color() == ("white" if lum < 0.35 else "black") or 0.35 <= lum <= 0.6, (t.get_text(), rgba)
            assert t.get_color() == text_colour(rgba)
    acc = fig.axes[0].get_images()[0]
    zero = next(t for t in fig.axes[0].texts if t.get_text() == "0.00")
    assert text_colour(acc.cmap(acc.norm(0.0))) == zero.get_color() == "white"  # on dark red


def test_the_lift_scale_is_fixed_and_anchored_at_chance():
    """1x to 100x, logarithmic, whatever the values: 1.5x looks dim (near the bottom of the scale), 100x
    bright; below 1x and above 100x take the end colours."""
    lift = next(ax for ax in figures.depth_figure(GROUP).axes if ax.get_title().startswith("top head's lift"))
    image = lift.get_images()[0]
    assert isinstance(image.norm, LogNorm) and (image.norm.vmin, image.norm.vmax) == (1.0, 100.0)
    assert image.norm(1.5) == pytest.approx(np.log10(1.5) / 2) and image.norm(1.5) < 0.1
    low = dict(GROUP, top_lift=[[1.1, 1.5], [1.2, None], [1.3, 1.4]])
    same = next(ax for ax in figures.depth_figure(low).axes
                if ax.get_title().startswith("top head's lift")).get_images()[0]
    assert (same.norm.vmin, same.norm.vmax) == (1.0, 100.0)  # not fitted to the data
    bar = [ax for ax in figures.depth_figure(GROUP).axes if ax.get_label() == "<colorbar>"][-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["1x", "2x", "5x", "10x", "20x", "50x", "100x"]


def test_text_colour_by_contrast():
    assert text_colour("black") == "white" and text_colour("white") == "black"
    assert text_colour("#a50026") == "white"  # RdYlGn's dark red
    assert text_colour("#ffffbf") == "black"  # its pale yellow
    assert text_colour("#440154") == "white" and text_colour("#fde725") == "black"  # viridis's ends
