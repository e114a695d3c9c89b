"""``retrieval-heads report``: tables, heatmaps, rank stability and bootstrap intervals from a results folder.

>>> from retrieval_heads.report import make_report
>>> report, folder = make_report("results")     # doctest: +SKIP

Reads the result files (collect.py), computes the numbers (stability.py) and pictures (figures.py), lays
them out as blocks (tables.py, build.py) and renders them as Markdown and one self-contained HTML page.
"""

from .build import Report, build, make_report, write
from .collect import Collection, Experiment, collect

__all__ = ["Collection", "Experiment", "Report", "build", "collect", "make_report", "write"]
