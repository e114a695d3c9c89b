"""The report at hundreds of results: the fast heatmaps draw the reference's bytes, the bounded pairs are the
reference's pairs where nothing is bounded, the report's text is the golden one, and ``make_report`` takes the
results-dir lock (bench/report_cost.py measures the time)."""

from __future__ import annotations

import importlib
import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from report_golden import GOLDEN, texts, write_set
from retrieval_heads.errors import UserError
from retrieval_heads.lock import results_lock
from retrieval_heads.report import figures, make_report, properties
from retrieval_heads.report.collect import Collection, Experiment
from retrieval_heads.report.heatmaps import Heatmaps

build_module = importlib.import_module("retrieval_heads.report.build")  # the package exports a function `build`


def experiment(scores, tokens=256, method="summed_attention", question="inc_state", depth=0.5, ranked=None,
               **extra) -> Experiment:
    scores = np.asarray(scores, dtype=np.float64)
    L, H = scores.shape
    order = np.argsort(-scores, axis=None, kind="stable") if ranked is None else ranked
    record = {"method": method, "model_key": "m", "question": question, "total_tokens": tokens,
              "needle_position": depth, "num_layers": L, "num_heads": H, "scores": scores.tolist(),
              "head_rankings": [{"head": f"L{i // H}H{i % H}", "score": float(scores.flat[i])} for i in order],
              "samples_processed": 2, **extra}
    rel = f"{method}/m_{question}_{tokens}_{depth}.json"
    return Experiment(record, Path(rel), rel)


def test_fast_heatmaps_are_the_reference_png_bytes():
    """One figure per head grid, reused: the same bytes as a new figure per experiment (figures.heatmap),
    on random, constant, huge (+-1.7e308), partly blank (a hybrid's layers without attention) grids, a grid
    whose first result ranks only 2 heads and a later one 5, and two grids interleaved."""
    rng = np.random.default_rng(0)
    exps = [
        experiment([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0]], attention_layers=[2], ranked=[4, 5]),  # 2 heads ranked
        experiment(rng.random((3, 2)), 300),  # same grid, 5 numbers now
        experiment(rng.random((6, 4)) - 0.5, 320),
        experiment(np.full((3, 2), 0.25), 330),  # constant: the colour bar widens the scale
        experiment(rng.random((6, 4)) * 1.7e308, 340),  # drawn scaled down, labelled with the real values
    ]
    fast = Heatmaps()
    for e in exps:
        got, want = [], []
        assert fast.png(e, regions=got) == figures.heatmap(e, regions=want), e.tokens
        assert got == want


def all_pairs_reference(members: list[Experiment]) -> list[tuple[int, int, str]]:
    """Every pair i < j differing in exactly one dimension, by brute force (what the report did before)."""
    out = []
    for i, j in combinations(range(len(members)), 2):
        a, b = properties._identity(members[i]), properties._identity(members[j])
        differ = [d for d in properties.DIMENSIONS if a[d] != b[d]]
        if len(differ) == 1:
            out.append((i, j, differ[0]))
    return out


def test_consistency_pairs_are_all_pairs_up_to_12_and_neighbours_above():
    small = [experiment(np.eye(2), t, question=q, depth=d) for q in ("inc_state", "hq_state") for t in (256, 512, 768)
             for d in (0.1, 0.5)] + [experiment(np.eye(2), 256, method="summed_attention+answer")]
    notes: list[str] = []
    assert properties.differing_pairs(small, notes) == all_pairs_reference(small) and not notes
    many = [experiment(np.eye(2), 256 + 8 * i) for i in range(20)][::-1]  # 20 lengths, longest first
    many += [experiment(np.eye(2), 256, question="hq_state"), experiment(np.eye(2), 264, question="hq_state")]
    pairs = properties.differing_pairs(many, notes)
    by_tokens = [(i, j) for i, j, d in pairs if d == "tokens" and i < 20]
    assert len(by_tokens) == 19  # neighbouring lengths, not 190 pairs
    assert {abs(many[i].tokens - many[j].tokens) for i, j in by_tokens} == {8}
    assert [p for p in pairs if p not in set((i, j, "tokens") for i, j in by_tokens)] == \
        [p for p in all_pairs_reference(many) if not (p[2] == "tokens" and p[0] < 20)]  # the rest: all of them
    assert notes == ["consistency, m · summed_attention · differing in tokens only: 20 results, so only "
                     "neighbouring ones are compared (19 pairs of 190; all pairs up to 12)"]
    rows, means = properties.consistency(Collection(Path("r"), many), [])
    assert [m["pairs"] for m in means] == [2, 19 + 1]  # question: 256 and 264; tokens: 19 + hq_state's one


def test_the_grid_shows_at_most_12_lengths_evenly_spread():
    exps = [experiment(np.eye(2), 256 + 8 * i) for i in range(530)]
    rows, lengths, n_rows, n_lengths = figures.grid_layout(exps)
    assert (n_rows, n_lengths) == (1, 530) and len(lengths) == 12
    assert lengths[0] == 256 and lengths[-1] == 256 + 8 * 529 and lengths == sorted(lengths)
    assert list(rows.values())[0] == {e.tokens: e for e in exps if e.tokens in lengths}
    few = exps[:12]
    assert figures.grid_layout(few)[1] == [e.tokens for e in few]


@pytest.mark.slow  # the whole report of 12 results: about 3 s
def test_report_text_is_the_golden_text(tmp_path):
    """report.md and report.json of a small folder (tests/report_golden.py) are what the report wrote before
    its heatmaps and pairs got faster (tests/golden_report/, made by the earlier code)."""
    root = write_set(tmp_path / "results")
    make_report(root, resamples=50)
    got = texts(root / "report", root)
    for name, text in got.items():
        assert text == (GOLDEN / name).read_text(), name


def test_make_report_refuses_while_a_sweep_holds_the_folder(tmp_path):
    """The library function, not only the command, takes the results-dir lock: it wrote its report into a
    folder a sweep was writing."""
    root = write_set(tmp_path / "results")
    with results_lock(root, "sweep"):
        with pytest.raises(UserError, match=f"another sweep \\(pid {os.getpid()}\\) is running on {root}"):
            make_report(root, resamples=10)
    assert not (root / "report").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".report")]
