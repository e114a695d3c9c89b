"""Each experiment's heatmap, fast: one figure per head grid, its fixed parts drawn once.

:func:`retrieval_heads.report.figures.heatmap` builds a new matplotlib figure per experiment (about 0.2 s:
mostly laying out and rasterising its 50-odd tick labels, which are the same for every result of one head
grid). :class:`Heatmaps` builds that figure once per head grid (layers x heads), draws everything that
does not depend on the scores (the tick labels, the axis labels) once into a background, and for each
experiment restores that background and draws only the rest, in the order a full draw uses: the score image,
the red box, the tick marks and the frame (they overlap the image's edge), the numbered heads, the title,
then the colour bar. The PNG is encoded as ``savefig`` encodes it, so the bytes are those of
:func:`figures.heatmap` (``tests/test_report_fast.py`` compares them on random, constant, partly blank and
huge-valued grids).

>>> import numpy as np
>>> from pathlib import Path
>>> from retrieval_heads.report.collect import Experiment
>>> rec = {"method": "summed_attention", "model_key": "m", "question": "q", "total_tokens": 256,
...        "needle_position": 0.5, "num_layers": 2, "num_heads": 3, "scores": np.eye(2, 3).tolist(),
...        "head_rankings": [{"head": "L0H0", "score": 1.0}, {"head": "L1H1", "score": 1.0}],
...        "samples_processed": 1}
>>> e = Experiment(rec, Path("m_q_256.json"), "m_q_256.json")
>>> Heatmaps().png(e) == figures.heatmap(e)
True
"""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.ticker import FuncFormatter

from ..results import parse_head
from . import figures
from .collect import Experiment
from .tables import score_text


class _Canvas:
    """The heatmap figure of one head grid, with its background (the fixed parts) drawn."""

    def __init__(self, exp: Experiment, dpi: int):
        self.dpi = dpi
        self.fig = figures.heatmap_figure(exp, dpi)
        self.fig.set_dpi(dpi)  # savefig draws at the dpi it saves at; so does this canvas
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax, self.cax = self.fig.axes[0], self.fig.axes[1]
        self.image = self.ax.get_images()[0]
        self.numbers = list(self.ax.texts)
        while len(self.numbers) < figures.MARK:  # this grid's first result ranks fewer heads than a later one
            self.numbers.append(figures.number(self.ax, len(self.numbers) + 1, 0, 0, figures.number_size(dpi),
                                               "black"))
        self.box = self.ax.patches[0]
        self.bar = self.image.colorbar
        self.region = figures.region(self.ax, *exp.shape)
        self._background()

    def _marks(self, axis: Axis) -> list:
        return [line for tick in axis.get_major_ticks(len(axis.get_majorticklocs()))
                for line in (tick.gridline, tick.tick1line, tick.tick2line)]

    def _layers(self) -> list:
        """The artists of the heatmap's axes a full draw paints over or beside the image, in its order."""
        out = []
        for a in sorted((a for a in self.ax.get_children() if a is not self.ax.patch), key=lambda a: a.zorder):
            out += self._marks(a) if isinstance(a, Axis) else [a]
        return out

    def _background(self) -> None:
        moving = [a for a in self._layers() if a.get_visible()] + [self.cax]
        for a in moving:
            a.set_visible(False)
        self.canvas.draw()  # the fixed parts: figure and axes background, tick labels, axis labels
        self.back = self.canvas.copy_from_bbox(self.fig.bbox)
        for a in moving:
            a.set_visible(True)

    def draw(self, exp: Experiment) -> bytes:
        f = figures.drawn_scale(exp.scores)
        shown = figures.drawn_grid(exp)  # as drawn: hybrid layers blank, huge scores scaled
        # the scale imshow gives a new image: the data's finite min and max (the numbers' colours are taken
        # on it, before the colour bar widens a constant grid's)
        first = Normalize()
        first.autoscale_None(np.ma.masked_invalid(shown))
        norm = Normalize(first.vmin, first.vmax)
        ranked = exp.ranked[:figures.MARK]
        for i, text in enumerate(self.numbers):
            text.set_visible(i < len(ranked))
            if i < len(ranked):
                layer, head = parse_head(ranked[i])
                text.set_position((head, layer))
                text.set_color(figures.text_colour(self.image.cmap(first(shown[layer, head]))))
        self.image.set_data(shown)
        self.image.set_norm(norm)  # a new scale: the colour bar's ticks and labels are made anew, once
        top_l, top_h = parse_head(exp.ranked[0])
        self.box.set_xy((top_h - 0.5, top_l - 0.5))
        if f != 1.0:
            self.bar.formatter = FuncFormatter(lambda v, _: score_text(float(v) / f))
        self.ax.set_title(figures.heatmap_title(exp), fontsize=10)
        self.canvas.restore_region(self.back)
        renderer = self.canvas.get_renderer()
        for a in self._layers():
            a.draw(renderer)
        self.cax.draw(renderer)
        buf = io.BytesIO()
        matplotlib.image.imsave(buf, self.canvas.buffer_rgba(), format="png", origin="upper", dpi=self.dpi,
                                metadata={"Software": None})  # as savefig writes it
        return buf.getvalue()


class Heatmaps:
    """Draws experiments' heatmaps, one reused figure per head grid; ``png(exp)`` equals
    ``figures.heatmap(exp)`` byte for byte."""

    def __init__(self, dpi: int = 90):
        self.dpi = dpi
        self._canvases: dict[tuple[int, int], _Canvas] = {}

    def _canvas(self, exp: Experiment) -> _Canvas:
        if exp.shape not in self._canvases:
            self._canvases[exp.shape] = _Canvas(exp, self.dpi)
        return self._canvases[exp.shape]

    def png(self, exp: Experiment, regions: list | None = None) -> bytes:
        """The PNG of ``exp``'s heatmap; with ``regions``, where the heatmap lies in it is appended
        (:func:`figures.region`)."""
        canvas = self._canvas(exp)
        if regions is not None:
            regions.append(dict(canvas.region))
        return canvas.draw(exp)
