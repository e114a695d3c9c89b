"""``retrieval-heads report``: tables, rank stability, bootstrap intervals, figures and the HTML page.

Fixture results are built with ``results.make_record`` from score grids whose correlations and overlaps are
known exactly; one test runs the embedded model and the report command end to end; one opens the page in
headless chromium (skipped, and saying so, where chromium is not installed).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_heads.cli import main
from retrieval_heads.errors import UserError
from retrieval_heads.io import atomic_write_json, atomic_write_jsonl
from retrieval_heads.report import build, collect
from retrieval_heads.report.collect import Experiment
from retrieval_heads.report.stability import bootstrap_ranks, bootstrap_reference, compare, rank_intervals
from retrieval_heads.report.tables import score_text
from retrieval_heads.results import make_record, parse_head, result_path

L, H = 6, 10  # 60 heads; flat index i = layer * H + head
N = L * H


def head(i: int) -> str:
    return f"L{i // H}H{i % H}"


def shifted(shift: int, top: float = 60.0) -> np.ndarray:
    """Scores whose ranking is the identity ranking rotated by ``shift``: head ``shift`` first."""
    return np.array([top - ((i - shift) % N) for i in range(N)], dtype=np.float64).reshape(L, H)


def put(root: Path, grid: np.ndarray, *, method="summed_attention", model="m1", question="inc_state", tokens=2048,
        per_sample: np.ndarray | None = None, samples: int = 4) -> Path:
    """Write a result (and optionally its per-sample scores) where detect would."""
    rec = make_record(method=method, model_key=model, model_name=f"org/{model}", question=question,
                      question_prompt=question, total_tokens=tokens, needle_position=0.5,
                      scores=torch.tensor(grid), samples_processed=samples if per_sample is None else len(per_sample),
                      seed=0, dtype="float32")
    path = result_path(root, method, model, question, tokens)
    if per_sample is not None:
        atomic_write_jsonl(path.with_suffix(".samples.jsonl"),
                           [{"index": i, "scores": s.tolist()} for i, s in enumerate(per_sample)])
    atomic_write_json(path, rec)
    return path


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (by hand, without scipy)."""
    r = np.empty(len(x))
    for i, v in enumerate(x):
        below, equal = int((x < v).sum()), int((x == v).sum())
        r[i] = below + (equal + 1) / 2
    return r


def spearman_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the average ranks."""
    a, b = average_ranks(x) - average_ranks(x).mean(), average_ranks(y) - average_ranks(y).mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def kendall_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b over all pairs: (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y)."""
    sx = np.sign(x[:, None] - x[None, :])  # (n, n)
    sy = np.sign(y[:, None] - y[None, :])
    upper = np.triu(np.ones_like(sx, dtype=bool), 1)
    s = (sx * sy)[upper].sum()
    return float(s / np.sqrt((sx[upper] != 0).sum() * (sy[upper] != 0).sum()))


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


# --- the seed's table -------------------------------------------------------------------------------------------


def test_top_head_table_is_the_seeds(tmp_path, capsys):
    g = np.zeros((L, H))
    for q, t, (layer, hd), score in [("inc_state", 2048, (1, 2), 117.8), ("inc_state", 4096, (1, 2), 117.04),
                                     ("hq_state", 2048, (5, 9), 100.0)]:
        grid = g.copy()
        grid[layer, hd] = score
        put(tmp_path, grid, question=q, tokens=t)
    grid = g.copy()
    grid[0, 0] = 3.25
    put(tmp_path, grid, method="query_focused", question="inc_year", tokens=6000)
    rc, _, err = run(["report", str(tmp_path)], capsys)
    assert rc == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    assert ("| Model | Question | 6000 |\n|---|---|---|\n| **m1** | inc_year | L0H0 (3.25) |") in md
    assert ("| Model | Question | 2K | 4K |\n|---|---|---|---|\n"
            "| **m1** | inc_state | L1H2 (117.8) | L1H2 (117.0) |\n"
            "|  | hq_state | L5H9 (100.0) | — |\n") in md
    assert md.index("### query_focused") < md.index("### summed_attention")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["top_head_table"]["summed_attention"]["m1"]["inc_state"]["4096"] == {"head": "L1H2", "score": 117.04}


# --- rank stability: exact values -------------------------------------------------------------------------------


@pytest.fixture
def stability_dir(tmp_path):
    """m1/inc_state at 2048 (identity ranking) and 4096 (rotated by 5); m2 identical to m1 at 2048; m3 with
    another head grid; a second method reversing m1's ranking at 2048; a success-only variant rotated by 1."""
    put(tmp_path, shifted(0), tokens=2048)
    put(tmp_path, shifted(5), tokens=4096)
    put(tmp_path, shifted(0), model="m2", tokens=2048)
    put(tmp_path, np.arange(12, dtype=float).reshape(3, 4), model="m3", tokens=2048)
    put(tmp_path, 61.0 - shifted(0), method="query_focused", tokens=2048)
    put(tmp_path, shifted(1), method="summed_attention_success", tokens=2048)
    return tmp_path


def test_correlations_and_overlaps_have_known_values(stability_dir):
    data = build(stability_dir).data
    (pair,) = [p for p in data["length_pairs"] if p["group"] == ["summed_attention", "m1", "inc_state"]]
    assert (pair["a"], pair["b"]) == (2048, 4096)
    # rotation by 5 of 60 ranks: 55 heads move down by 5, 5 heads move up by 55
    d2 = 55 * 5**2 + 5 * 55**2
    assert pair["spearman"] == pytest.approx(1 - 6 * d2 / (N * (N**2 - 1)), abs=1e-12)
    assert Fraction(pair["kendall"]).limit_denominator(10_000) == Fraction(1770 - 2 * 5 * 55, 1770)
    assert pair["jaccard_10"] == pytest.approx(5 / 15) and pair["jaccard_50"] == pytest.approx(45 / 55)

    (same,) = data["model_pairs"]
    assert same["group"] == ["summed_attention", "inc_state", 2048] and (same["a"], same["b"]) == ("m1", "m2")
    assert (same["spearman"], same["kendall"], same["jaccard_10"], same["jaccard_50"]) == (1.0, 1.0, 1.0, 1.0)
    assert "m1 vs m3: head grids 6x10 and 3x4 differ, 1 pair(s) not compared" in data["notes"]
    assert "m2 vs m3: head grids 6x10 and 3x4 differ, 1 pair(s) not compared" in data["notes"]

    methods = {(p["a"], p["b"]): p for p in data["method_pairs"]}
    assert set(methods) == {("query_focused", "summed_attention"), ("query_focused", "summed_attention_success"),
                            ("summed_attention", "summed_attention_success")}
    rev = methods[("query_focused", "summed_attention")]
    assert rev["spearman"] == pytest.approx(-1.0) and rev["kendall"] == pytest.approx(-1.0)
    assert rev["jaccard_10"] == 0.0 and rev["jaccard_50"] == pytest.approx(40 / 60)
    one = methods[("summed_attention", "summed_attention_success")]
    assert one["jaccard_10"] == pytest.approx(9 / 11)  # rotated by one: 9 shared of 11


def test_correlations_with_ties_equal_a_hand_computation():
    """Ties (equal scores, as rounded results have) follow the tie-corrected definitions: golden values worked
    out by hand for a 6-head case, then random tied grids against the pairwise definitions."""
    def exp(grid):
        g = np.asarray(grid, dtype=np.float64).reshape(2, -1)
        rec = make_record(method="m", model_key="k", model_name="k", question="q", question_prompt="q",
                          total_tokens=1, needle_position=0.5, scores=torch.tensor(g), samples_processed=1, seed=0,
                          dtype="float32")
        return Experiment(rec, Path("x.json"), "x.json")

    # x ranks 1, 2.5, 2.5, 4, 5, 6 and y ranks 2, 1, 3, 4, 5.5, 5.5, both of mean 3.5: centred, their
    # products sum to 15 and their squares to 17 each, so Spearman's rho is 15 / 17
    x, y = [1, 2, 2, 3, 4, 5], [2, 1, 3, 4, 5, 5]
    got = compare(exp(x), exp(y), top_k=())
    assert got["spearman"] == pytest.approx(15 / 17, abs=1e-12)
    # 15 pairs: 12 concordant, 1 discordant ((0, 1)), 1 tied in x only, 1 tied in y only: tau-b = 11 / 14
    assert got["kendall"] == pytest.approx(11 / 14, abs=1e-12)
    assert spearman_by_hand(np.array(x, float), np.array(y, float)) == pytest.approx(15 / 17, abs=1e-12)
    assert kendall_by_hand(np.array(x, float), np.array(y, float)) == pytest.approx(11 / 14, abs=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)  # many ties
        got = compare(exp(a), exp(b), top_k=())
        assert got["spearman"] == pytest.approx(spearman_by_hand(a, b), abs=1e-12)
        assert got["kendall"] == pytest.approx(kendall_by_hand(a, b), abs=1e-12)


def test_parse_head_is_strict():
    assert parse_head("L0H0") == (0, 0) and parse_head("L12H7") == (12, 7)
    for bad in ["L1H", "H1L2", "l1h2", "L01H2", "L1H2 ", "L-1H2", "L1H2H3", "L\u0661H2", "", None]:
        with pytest.raises(UserError, match="bad head name .*expected L<layer>H<head>"):
            parse_head(bad)


def test_movement_and_top1_counts(stability_dir):
    data = build(stability_dir).data
    (g,) = [m for m in data["movement"] if m["model"] == "m1" and m["method"] == "summed_attention"]
    assert g["tokens"] == [2048, 4096]
    rows = {r["head"]: r["ranks"] for r in g["heads"]}
    # 2048's top 5 (heads 0..4) fall to ranks 56..60 at 4096; 4096's top 5 (heads 5..9) rank 6..10 at 2048
    assert rows == {**{head(i): {"2048": i + 1, "4096": 56 + i} for i in range(5)},
                    **{head(i): {"2048": i + 1, "4096": i - 4} for i in range(5, 10)}}
    assert [r["head"] for r in g["heads"]][:2] == ["L0H5", "L0H0"]  # best rank first, then mean rank
    (sa,) = [c for c in data["top1_counts"] if c["method"] == "summed_attention"]
    assert sa["experiments_by_tokens"] == {"2048": 3, "4096": 1}
    assert sa["heads"][0] == {"head": "L0H0", "by_tokens": {"2048": 2, "4096": 0}, "total": 2}


def test_markdown_shows_the_numbers(stability_dir, capsys):
    rc, _, err = run(["report", str(stability_dir), "--out", str(stability_dir / "r")], capsys)
    assert rc == 0, err
    md = (stability_dir / "r" / "report.md").read_text()
    spear = 1 - 6 * (55 * 25 + 5 * 3025) / (N * (N**2 - 1))
    assert f"| summed_attention | m1 | inc_state | 2K | 4K | {spear:.3f} | {1220 / 1770:.3f} | 0.333 | 0.818 |" in md
    assert "| L0H0 | **1** | 56 |" in md and "| L0H5 | 6 | **1** |" in md
    assert not (stability_dir / "report").exists()  # --out honoured


# --- bootstrap ----------------------------------------------------------------------------------------------------


def test_bootstrap_equals_slow_reference():
    per_sample = np.random.default_rng(3).random((7, 3, 4))  # (S, L, H)
    fast = bootstrap_ranks(per_sample, resamples=200, seed=11)
    assert np.array_equal(fast, bootstrap_reference(per_sample, resamples=200, seed=11))
    assert np.array_equal(fast, bootstrap_ranks(per_sample, resamples=200, seed=11))  # same seed, same ranks
    assert not np.array_equal(fast, bootstrap_ranks(per_sample, resamples=200, seed=12))
    assert sorted(fast[0].tolist()) == list(range(1, 13))


def test_bootstrap_ties_follow_the_result_ranking():
    per_sample = np.ones((3, 2, 2))  # every head tied in every resample: ranked by (layer, head)
    assert bootstrap_ranks(per_sample, resamples=5).tolist() == [[1, 2, 3, 4]] * 5


def test_rank_intervals_in_the_report(tmp_path):
    rng = np.random.default_rng(0)
    per = rng.random((5, L, H)) * 0.1
    per[:, 2, 3] = 1.0  # L2H3 first in every sample: its rank never moves
    put(tmp_path, per.sum(0), tokens=2048, per_sample=per)
    put(tmp_path, shifted(0), tokens=4096)  # no samples file
    stale = per.copy()
    stale[0, 0, 0] += 1
    put(tmp_path, per.sum(0), question="hq_state", tokens=2048, per_sample=per)
    atomic_write_jsonl(result_path(tmp_path, "summed_attention", "m1", "hq_state", 2048).with_suffix(".samples.jsonl"),
                       [{"scores": s.tolist()} for s in stale])
    data = build(tmp_path, resamples=300, seed=5).data
    boot = {(e["question"], e["tokens"]): e for e in data["bootstrap"]["experiments"]}
    assert data["bootstrap"]["resamples"] == 300 and data["bootstrap"]["top"] == 20
    assert "no per-sample scores" in boot[("inc_state", 4096)]["skipped"]
    assert "does not add up" in boot[("hq_state", 2048)]["skipped"]
    rows = boot[("inc_state", 2048)]["heads"]
    assert len(rows) == 20 and rows[0]["head"] == "L2H3"
    assert (rows[0]["lo"], rows[0]["median"], rows[0]["hi"], rows[0]["share_first"]) == (1.0, 1.0, 1.0, 1.0)
    exp = next(e for e in collect(tmp_path).experiments if e.key == ("summed_attention", "m1", "inc_state", 2048))
    ranks = bootstrap_reference(per, 300, 5)
    for r in rows:
        layer, hd = parse_head(r["head"])
        lo, hi = np.percentile(ranks[:, layer * H + hd], [2.5, 97.5])
        assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert rows == rank_intervals(exp, per, 20, 300, 5)


# --- bad input: one line, exit 2, nothing written -------------------------------------------------------------------


def _bad(tmp_path, capsys, target: Path) -> str:
    rc, _, err = run(["report", str(target)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (target / "report").exists()
    return err


def test_missing_empty_and_foreign_dirs(tmp_path, capsys):
    assert "does not exist" in _bad(tmp_path, capsys, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no result files" in _bad(tmp_path, capsys, tmp_path / "empty")
    foreign = tmp_path / "foreign"
    (foreign / "ablate").mkdir(parents=True)
    (foreign / "ablate" / "curve.json").write_text('{"k": [0, 5]}')
    (foreign / "notes.txt").write_text("hello")
    err = _bad(tmp_path, capsys, foreign)
    assert "no result files" in err and "ablate/curve.json" in err


def test_corrupt_and_edited_results_name_the_file(tmp_path, capsys):
    good = put(tmp_path, shifted(0), tokens=2048)
    bad = put(tmp_path, shifted(1), tokens=4096)
    text = bad.read_text()
    bad.write_text(text[: len(text) // 2])  # truncated
    err = _bad(tmp_path, capsys, tmp_path)
    assert str(bad) in err and "corrupt result JSON" in err
    rec = json.loads(text)
    rec["head_rankings"][0]["score"] += 1
    bad.write_text(json.dumps(rec))  # edited
    err = _bad(tmp_path, capsys, tmp_path)
    assert str(bad) in err and "checksum mismatch" in err
    bad.unlink()
    good.with_suffix(".samples.jsonl").write_text('{"scores": [[1, 2]]}\nnot json\n')
    err = _bad(tmp_path, capsys, tmp_path)
    assert str(good.with_suffix(".samples.jsonl")) in err and "line 1" in err


def test_bad_options(tmp_path, capsys):
    put(tmp_path / "r", shifted(0))
    for args, msg in [(["--out", str(tmp_path / "r")], "would hold the results folder"),
                      (["--out", str(tmp_path)], "would hold the results folder"),
                      (["--resamples", "0"], "--resamples must be positive"),
                      (["--resamples", str(10**23)], "--resamples must be at most 100000")]:
        rc, _, err = run(["report", str(tmp_path / "r"), *args], capsys)
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m1_inc_state_2048.json"]


def test_two_results_for_one_experiment(tmp_path, capsys):
    put(tmp_path / "a", shifted(0))
    put(tmp_path / "b", shifted(1))
    err = _bad(tmp_path, capsys, tmp_path)
    assert "two results for summed_attention m1 · inc_state · 2048 tokens" in err


# --- outputs: files, figures, a self-contained page ------------------------------------------------------------------


def test_outputs_are_complete_self_contained_and_reproducible(stability_dir, capsys):
    rc, out, err = run(["report", str(stability_dir), "--resamples", "50"], capsys)
    assert rc == 0, err
    rep = stability_dir / "report"
    assert f"wrote {rep / 'report.html'}" in out
    exps = collect(stability_dir, exclude=rep).experiments
    assert len(exps) == 6
    pngs = sorted(p.relative_to(rep).as_posix() for p in rep.rglob("*.png"))
    assert pngs == sorted(["figures/grid.png"] + [f"figures/{e.method}/{e.slug}.png" for e in exps])
    page = (rep / "report.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)  # nothing to fetch
    assert "http://" not in page and "https://" not in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(pngs)
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.width > 200 and img.height > 200
        assert len(img.convert("RGB").getcolors(1 << 20)) > 20  # a picture, not a blank
    heat = Image.open(rep / "figures/summed_attention/m1_inc_state_2048.png")
    assert heat.size[0] > 300 and heat.size[1] > 300
    md = (rep / "report.md").read_text()
    assert page.count("<table>") == sum(line.startswith("|---") for line in md.splitlines())
    first = {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()}
    rc, _, _ = run(["report", str(stability_dir), "--resamples", "50"], capsys)  # the old report is not read
    assert rc == 0 and {p: p.read_bytes() for p in rep.rglob("*") if p.is_file()} == first


# --- a real browser ------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: HTML report not checked in a browser")
@pytest.mark.slow
def test_page_renders_in_headless_chromium(stability_dir, tmp_path_factory, capsys):
    rc, _, err = run(["report", str(stability_dir), "--resamples", "50"], capsys)
    assert rc == 0, err
    page = (stability_dir / "report" / "report.html").resolve()
    profile = tmp_path_factory.mktemp("chromium")
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile / 'a'}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_img = (stability_dir / "report" / "report.html").read_text().count("<img ")
    assert f'data-figures="{n_img}/{n_img}"' in dom.stdout  # the page's script ran and every figure decoded
    assert "Top head per configuration" in dom.stdout and dom.stdout.count("<table>") >= 5
    shot = profile / "shot.png"
    res = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile / 'b'}", f"--screenshot={shot}",
                          "--window-size=1400,2000", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (2000, 1400, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
    viridis_low = np.abs(img.astype(int) - [68, 1, 84]).sum(-1) < 40  # the heatmaps' darkest colour
    assert viridis_low.sum() > 2000  # the heatmap grid is on screen, below the table


# --- the embedded model, end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_real_runs(smollm2, tmp_path):
    from retrieval_heads import detect

    runs = {}
    for q in ("inc_state", "hq_state"):
        for t in (320, 384):
            runs[(q, t)] = detect(smollm2, question=q, tokens=t, samples=2, batch_size=2, output_dir=tmp_path,
                                   save_samples=True)
    res = subprocess.run([sys.executable, "-m", "retrieval_heads", "report", str(tmp_path), "--resamples", "200"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rep = tmp_path / "report"
    md = (rep / "report.md").read_text()
    def cell(r):  # the seed's cell, with the head's lift next to its score
        top = r.record["head_rankings"][0]
        return f"{top['head']} ({score_text(top['score'])}, {top['lift']:.1f}x)"

    assert (f"| **smollm2** | inc_state | {cell(runs[('inc_state', 320)])} | {cell(runs[('inc_state', 384)])} |\n"
            f"|  | hq_state | {cell(runs[('hq_state', 320)])} | {cell(runs[('hq_state', 384)])} |") in md
    data = json.loads((rep / "report.json").read_text())
    assert len(data["experiments"]) == 4 and data["notes"] == []
    for p in data["length_pairs"]:
        a, b = (np.ravel(runs[(p["group"][2], t)].record["scores"]) for t in (p["a"], p["b"]))
        assert p["spearman"] == pytest.approx(spearman_by_hand(a, b), abs=1e-6)
        assert p["kendall"] == pytest.approx(kendall_by_hand(a, b), abs=1e-6)
    assert len(data["length_pairs"]) == 2
    for e in data["bootstrap"]["experiments"]:
        assert e["samples"] == 2 and len(e["heads"]) == 20
        r = runs[(e["question"], e["tokens"])]
        assert [h["head"] for h in e["heads"]] == r.record["top_50_heads"][:20]
        assert all(h["lo"] <= h["median"] <= h["hi"] for h in e["heads"])
    page = (rep / "report.html").read_text()
    # the grid, 4 heatmaps, and one depth x length figure per question (accuracy beside lift)
    assert page.count("<img ") == 7 and "Top head per configuration" in page
