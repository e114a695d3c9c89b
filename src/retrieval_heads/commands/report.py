"""``retrieval-heads report``: the seed's tables, heatmaps and rank stability from a results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def report(
    results_dir: Path = typer.Argument(..., help="Folder of result files (METHOD/MODEL_QUESTION_TOKENS.json)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: RESULTS_DIR/report)."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples of the samples, for the rank intervals."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    top: int = typer.Option(20, help="Heads per experiment in the bootstrap table."),
) -> None:
    """Write report.html (self-contained), report.md, report.json and heatmap PNGs."""
    from ..io import given_path
    from ..report import make_report

    if resamples <= 0:
        raise UserError(f"--resamples must be positive, got {resamples}")
    if top <= 0:
        raise UserError(f"--top must be positive, got {top}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    rep, folder = make_report(results_dir, None if out is None else given_path(out, "--out"), resamples=resamples,
                              seed=seed, top=top)
    n = len(rep.collection.experiments)
    print(f"read {n} result(s); wrote {folder / 'report.html'}, report.md, report.json and "
          f"{len(rep.figures)} figure(s) in {folder / 'figures'}")


def register(app: typer.Typer) -> None:
    app.command()(report)
