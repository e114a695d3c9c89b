"""The report's rank stability between lengths on many lengths: all pairs against neighbouring pairs.

N results of one model and question at N distinct lengths (random score grids of SmolLM2's 30 x 9 heads,
written as real result files and read back by the report's reader). Times, in one run: the bounded
comparison the report makes (``stability.length_pairs``: neighbouring lengths above 12 results a group), and
all pairs (``itertools.combinations`` with the same ``stability.compare``), the latter on a sample of pairs
and scaled to the N (N - 1) / 2 pairs, since running all of them is what took the report past 10 minutes.
With ``--full``, also the whole ``retrieval-heads report`` command on the N results.

    python bench/report_pairs.py --lengths 530 [--full]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import torch

from retrieval_heads.io import atomic_write_json
from retrieval_heads.report import stability
from retrieval_heads.report.collect import collect
from retrieval_heads.results import make_record, result_path


def write_results(root: Path, n: int, layers: int = 30, heads: int = 9) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        tokens = 256 + 8 * i
        rec = make_record(method="summed_attention", model_key="m", model_name="org/m", question="inc_state",
                          question_prompt="q", total_tokens=tokens, needle_position=0.5,
                          scores=torch.rand(layers, heads, generator=g, dtype=torch.float64), samples_processed=4,
                          seed=0, dtype="float32")
        atomic_write_json(result_path(root, "summed_attention", "m", "inc_state", tokens), rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, default=530)
    ap.add_argument("--sample-pairs", type=int, default=500, help="all-pairs comparisons actually timed")
    ap.add_argument("--full", action="store_true", help="also time the whole report command")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp()) / "results"
    write_results(root, args.lengths)
    exps = collect(root).experiments
    n = len(exps)
    t0 = time.perf_counter()
    bounded = stability.length_pairs(exps, notes := [])
    t_bounded = time.perf_counter() - t0
    pairs = list(combinations(exps, 2))
    sample = random.Random(0).sample(pairs, min(args.sample_pairs, len(pairs)))
    t0 = time.perf_counter()
    for a, b in sample:
        stability.compare(a, b)
    per_pair = (time.perf_counter() - t0) / len(sample)
    t_all = per_pair * len(pairs)
    print(f"{n} lengths: neighbouring pairs {len(bounded)} in {t_bounded:.2f} s; all pairs {len(pairs)} "
          f"(timed {len(sample)}, {per_pair * 1e3:.2f} ms each) would take {t_all:.0f} s; ratio "
          f"{t_all / t_bounded:.0f}x")
    print("note:", notes[0] if notes else "(none)")
    if args.full:
        from retrieval_heads.cli import main as cli

        t0 = time.perf_counter()
        rc = cli(["report", str(root), "--resamples", "10"])
        print(f"report on {n} results: exit {rc} in {time.perf_counter() - t0:.1f} s")
        sys.exit(rc)


if __name__ == "__main__":
    main()
