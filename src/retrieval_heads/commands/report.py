"""``retrieval-heads report``: the top-head tables, heatmaps and rank stability from a results folder."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ._common import groups

MAX_RESAMPLES = 100_000  # the bootstrap holds every resample's ranks of every head in memory

SUMMARY = "Write report.html (self-contained), report.md, report.json and heatmap PNGs."


EXAMPLES = """examples:
  retrieval-heads report results                    writes results/report/report.html, .md, .json, figures/
  retrieval-heads report results --out site --resamples 200 --top 10"""


def register(commands) -> None:
    p = commands.add_parser("report", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="Folder of result files (METHOD/MODEL_QUESTION_TOKENS.json).")
    stat, out = groups(p, "rank stability", "output")
    stat.add_argument("--resamples", type=int, default=1000, help="Bootstrap resamples of the samples, for the rank "
                                                                  f"intervals (at most {MAX_RESAMPLES}).")
    stat.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    stat.add_argument("--top", type=int, default=20, help="Heads per experiment in the bootstrap table.")
    out.add_argument("--out", help="Output folder (default: RESULTS_DIR/report).")
    p.set_defaults(run=report)


def report(args: argparse.Namespace) -> None:
    """Write report.html (self-contained), report.md, report.json and heatmap PNGs."""
    from ..io import given_path
    from ..report import make_report

    if args.resamples <= 0:
        raise UserError(f"--resamples must be positive, got {args.resamples}")
    if args.resamples > MAX_RESAMPLES:
        raise UserError(f"--resamples must be at most {MAX_RESAMPLES}, got {args.resamples}")
    if args.top <= 0:
        raise UserError(f"--top must be positive, got {args.top}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    results_dir = given_path(args.results_dir, "RESULTS_DIR")
    out = None if args.out is None else given_path(args.out, "--out")
    # holds the lock on the folder it writes into (not while a sweep or detect writes there), puts back an
    # earlier report a killed run moved aside and removes its temp folders
    rep, folder = make_report(results_dir, out, resamples=args.resamples, seed=args.seed, top=args.top)
    n = len(rep.collection.experiments)
    print(f"read {n} result(s); wrote {folder / 'report.html'}, report.md, report.json and "
          f"{len(rep.figures)} figure(s) in {folder / 'figures'}")

