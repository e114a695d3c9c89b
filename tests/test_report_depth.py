"""The report's needle depth x length view: accuracy and the top head's lift per depth and length, the top
head named in each cell, rank agreement across depths; as heatmaps, tables and report.json numbers."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval_heads.cli import main
from retrieval_heads.io import atomic_write_json
from retrieval_heads.report.build import build
from retrieval_heads.report.collect import collect
from retrieval_heads.report.stability import compare
from retrieval_heads.results import _checksum, make_record, result_path

DEPTHS, LENGTHS = [0.1, 0.5, 0.9], [1024, 2048]


def scores_for(d: float, t: int) -> np.ndarray:
    """A 2 x 3 grid whose top head is L1H2 except at depth 0.9 and 2048 tokens (L0H0)."""
    g = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 4.0]]) + d + t / 1e4
    if d == 0.9 and t == 2048:
        g[0, 0] = 9.0
    return g


def put(root, d, t, *, question="inc_state", extra=None, lift_scale=2.0, method="summed_attention"):
    grid = scores_for(d, t)
    added = {"span": "needle", "baseline": [[0.5] * 3] * 2, "lift": (grid * lift_scale).round(4).tolist(),
             "control_scores": [[0.4] * 3] * 2, "significance": {"alpha": 0.05, "heads": [], "note": ""},
             "verdict": "a line"}
    rec = make_record(method=method, model_key="m1", model_name="org/m1", question=question, question_prompt="q",
                      total_tokens=t, needle_position=d, scores=torch.tensor(grid), samples_processed=4, seed=0,
                      dtype="float32", extra=extra or {}, added=added)
    path = result_path(root, method, "m1", question, t, d)
    atomic_write_json(path, rec)
    return path


def section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    return md[start:md.index("\n## ", start + 1)]


def test_depth_by_length_grid(tmp_path, capsys):
    for d in DEPTHS:
        for t in LENGTHS:
            extra = {"accuracy": 0.75, "n_correct": 3, "n_answered": 4} if (d, t) != (0.9, 1024) else {}
            put(tmp_path, d, t, extra=extra)
    put(tmp_path, 0.5, 1024, question="hq_state")  # no answers anywhere for this question
    assert main(["report", str(tmp_path), "--resamples", "10"]) == 0, capsys.readouterr().err
    out = tmp_path / "report"
    md = (out / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## Does the model retrieve?", "## Needle depth x length", "## Top head per configuration"]
    grid = section(md, "Needle depth x length")
    assert ("| Depth | 1K | 2K |\n|---|---:|---:|\n| 0.1 | 0.75 (3/4) | 0.75 (3/4) |\n| 0.5 | 0.75 (3/4) | "
            "0.75 (3/4) |\n| 0.9 | — | 0.75 (3/4) |") in grid
    # the top head named in each cell with its lift (twice its score here): 2 * (4.0 + 0.1 + 0.1024) = 8.4048
    assert ("| 0.1 | L1H2 8.4x | L1H2 8.6x |\n| 0.5 | L1H2 9.2x | L1H2 9.4x |\n| 0.9 | L1H2 10.0x | L0H0 "
            "18.0x |") in grid
    assert "Across depths: the top head is the same at every depth at 1K; it changes with depth at 2K;" in grid
    assert "Accuracy: no answers recorded (decode answers with `detect --answers` or `sweep --answers`)." in grid  # hq_state
    assert "One depth (0.5) only: nothing to compare across depths." in grid
    data = json.loads((out / "report.json").read_text())["depth_grid"]["grids"]
    g = data[0]
    assert (g["method"], g["model"], g["question"], g["depths"], g["tokens"]) == \
        ("summed_attention", "m1", "inc_state", DEPTHS, LENGTHS)
    assert g["accuracy"] == [[0.75, 0.75], [0.75, 0.75], [None, 0.75]] and g["answers_recorded"]
    assert g["top_head"] == [["L1H2", "L1H2"], ["L1H2", "L1H2"], ["L1H2", "L0H0"]]
    assert g["top_lift"] == [[pytest.approx(2 * (4 + d + t / 1e4)) if (d, t) != (0.9, 2048) else 2 * (9.0)
                              for t in LENGTHS] for d in DEPTHS]
    assert g["same_top_head"] == {"1024": True, "2048": False}
    assert not data[1]["answers_recorded"] and data[1]["accuracy"] == [[None]] and data[1]["depth_pairs"] == []
    # rank agreement across depths: stability.compare of each pair of depths at one length
    exps = {(e.question, e.depth, e.tokens): e for e in collect(tmp_path, exclude=out).experiments}
    assert len(g["depth_pairs"]) == 6
    for p in g["depth_pairs"]:
        want = compare(exps[("inc_state", p["a"], p["group"][3])], exps[("inc_state", p["b"], p["group"][3])])
        assert {k: p[k] for k in want} == pytest.approx(want)
    # the heatmaps: accuracy and lift panels side by side, each with its colour bar; one lift panel without answers
    png = (out / "figures" / "depth" / "summed_attention" / "m1_inc_state.png").read_bytes()
    fig = build(tmp_path, out, resamples=10)
    figs = {f.path: f for f in fig.figures}
    assert figs["figures/depth/summed_attention/m1_inc_state.png"].png == png
    wide, narrow = Image.open(io.BytesIO(png)), Image.open(io.BytesIO(
        figs["figures/depth/summed_attention/m1_hq_state.png"].png))
    assert wide.width > 1.6 * narrow.width
    # the results at other depths keep their own names and figures, and the other sections tell them apart
    assert (out / "figures" / "summed_attention" / "m1_inc_state_1024_d0.10.png").exists()
    assert "| **m1** | inc_state @0.1 | L1H2 (4.20, 8.4x) | L1H2 (4.30, 8.6x) |" in md
    assert '"figures/depth/summed_attention/m1_inc_state.png"' not in (out / "report.html").read_text()  # inlined


def test_figure_draws_a_colour_bar_per_panel():
    from retrieval_heads.report import figures

    g = {"method": "summed_attention", "model": "m", "question": "q", "depths": [0.1, 0.9], "tokens": [1024],
         "answers_recorded": True, "accuracy": [[1.0], [None]], "top_head": [["L0H1"], [None]],
         "top_lift": [[3.0], [None]]}
    one = figures.depth_grid(dict(g, answers_recorded=False))
    two = figures.depth_grid(g)
    assert one[:8] == two[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(two)).width > Image.open(io.BytesIO(one)).width


@pytest.mark.parametrize("bad", ["high", 1.5, True, [0.5]])
def test_a_bad_accuracy_is_a_one_line_error(tmp_path, capsys, bad):
    path = put(tmp_path, 0.5, 1024, extra={"accuracy": 0.5})
    rec = json.loads(path.read_text())
    rec["extra"]["accuracy"] = bad
    rec["checksum"] = _checksum(rec)
    path.write_text(json.dumps(rec))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: extra.accuracy is not a number in [0, 1] ({str(bad)[:40]})"]
    assert not (tmp_path / "report").exists()


def test_no_lift_no_grid(tmp_path, capsys):
    rec = make_record(method="query_focused", model_key="m1", model_name="m1", question="inc_state",
                      question_prompt="q", total_tokens=1024, needle_position=0.3, scores=torch.rand(2, 3),
                      samples_processed=2, seed=0, dtype="float32")
    atomic_write_json(result_path(tmp_path, "query_focused", "m1", "inc_state", 1024, 0.3), rec)
    assert main(["report", str(tmp_path), "--resamples", "10"]) == 0, capsys.readouterr().err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "No result here carries chance baselines (`lift`), so there is no depth x length grid" in \
        section(md, "Needle depth x length")
    assert json.loads((tmp_path / "report" / "report.json").read_text())["depth_grid"] == {"grids": []}
