"""A fourth round of hostile input: integers beyond a float's range in any JSON file, ablation curves of
the wrong types or ranges dropped in a report folder, samples files whose per-sample chance baselines are not
the result's, and an empty ``--controls``.

Fast: results are built with ``results.make_record`` (no model); the CLI runs in process.
"""

from __future__ import annotations

import json

import pytest

from conftest import cli, one_line
from retrieval_heads.io import JSONError, parse_json
from retrieval_heads.report.collect import collect
from retrieval_heads.report.properties import ablations, activation
from test_guards import put


def test_integers_beyond_a_floats_range_are_refused_when_read(tmp_path, capfd):
    """10**400 is under Python's digit limit but overflows wherever it is used as a number (was an
    OverflowError traceback in report and export, from scores, needle_position or extra.accuracy)."""
    with pytest.raises(JSONError, match=r"integer 1000.* \(401 digits\) is out of range"):
        parse_json('{"a": [1, %d]}' % 10**400)
    assert parse_json("[%d, %d]" % (10**308, -(10**308))) == [10**308, -(10**308)]  # within range: kept
    path = put(tmp_path / "res")
    text = path.read_text()
    bad = text.replace('"needle_position": 0.5', '"needle_position": %d' % 10**400)
    assert bad != text
    path.write_text(bad)
    for args in (["report", tmp_path / "res", "--out", tmp_path / "rep"], ["export", path, "--format", "qrhead"]):
        one_line(*cli(capfd, *args)[::2], "corrupt result JSON (integer 1000")
    assert not (tmp_path / "rep").exists()


GOOD = {"model_key": "m", "question": "inc_state", "total_tokens": 256, "samples": 4, "ks": [0, 2], "top": [],
        "controls": ["matched"], "conclusion": "no test: only k = 0",
        "summary": [{"k": 0, "top_accuracy": 0.5, "top_logprob": -1.0},
                    {"k": 2, "top_accuracy": 0.25, "top_logprob": -3.0, "matched_accuracy_min": 0.25,
                     "matched_accuracy_median": 0.5, "matched_accuracy_max": 0.75, "matched_logprob_min": -2.0,
                     "matched_logprob_median": -1.5, "matched_logprob_max": -1.0}],
        "tests": [{"k": 2, "control": "matched", "metric": "logprob", "p_holm": 0.25}]}


def _edit(path, value):
    def go(c):
        cur = c
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
    return go


BAD_CURVES = {
    "accuracy_nan_string": _edit(("summary", 0, "top_accuracy"), "nan"),
    "logprob_bool": _edit(("summary", 0, "top_logprob"), False),
    "k_float": _edit(("summary", 1, "k"), 1e300),
    "k_negative": _edit(("summary", 1, "k"), -3),
    "accuracy_above_1": _edit(("summary", 0, "top_accuracy"), 7.5),
    "logprob_positive": _edit(("summary", 0, "top_logprob"), 1e308),
    "control_band_string": _edit(("summary", 1, "matched_accuracy_min"), "x"),
    "p_above_1": _edit(("tests", 0, "p_holm"), 3.0),
    "controls_not_a_list": _edit(("controls",), 5),
    "model_key_markup": _edit(("model_key",), "<b>x</b>|pipe"),
    "tokens_object": _edit(("total_tokens",), {"a": 1}),
    "conclusion_markup": _edit(("conclusion",), "<script>alert(1)</script>"),
    "conclusion_newline": _edit(("conclusion",), "fine\n# a heading of its own"),
}


@pytest.mark.parametrize("name", list(BAD_CURVES))
def test_ablation_curves_of_odd_types_are_noted_not_shown(name, tmp_path):
    """A curve whose fields have the wrong types or impossible values was shown as it was (NaN from the
    string "nan", 1 from true, a k of 1e300, markup into report.md): now it is named in a note, not shown."""
    put(tmp_path)
    curve = json.loads(json.dumps(GOOD))
    BAD_CURVES[name](curve)
    (tmp_path / "summed_attention" / "m_inc_state_256.ablation.json").write_text(json.dumps(curve))
    curves, notes = ablations(collect(tmp_path))
    assert curves == [] and notes == ["`summed_attention/m_inc_state_256.ablation.json`: an ablation curve of an "
                                      "unexpected shape, not shown"]


def test_a_good_ablation_curve_is_shown(tmp_path):
    put(tmp_path)
    (tmp_path / "summed_attention" / "m_inc_state_256.ablation.json").write_text(json.dumps(GOOD))
    curves, notes = ablations(collect(tmp_path))
    assert notes == [] and len(curves) == 1
    assert curves[0]["rows"][1] == {"k": 2, "top_accuracy": 0.25, "top_logprob": -3.0,
                                    "matched_accuracy": [0.25, 0.5, 0.75], "matched_logprob": [-2.0, -1.5, -1.0],
                                    "matched_p_holm": 0.25}


def _with_samples(root, edit=None):
    """A result of 2 samples whose per-sample scores and baselines sum to its grids; ``edit`` the rows."""
    scores = [[[0.1, 0.2], [0.3, 0.4]], [[0.3, 0.2], [0.1, 0.0]]]
    base = [[[0.05, 0.05], [0.05, 0.05]], [[0.1, 0.1], [0.1, 0.1]]]
    total = [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(*scores)]
    path = put(root, layers=2, heads=2, scores=total, added={"baseline": [[0.15, 0.15], [0.15, 0.15]]})
    rows = [{"index": i, "scores": s, "baseline": b} for i, (s, b) in enumerate(zip(scores, base))]
    if edit:
        edit(rows)
    path.with_name(path.name.replace(".json", ".samples.jsonl")).write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    return collect(root).experiments[0]


def _scale_baselines(rows, f):
    for r in rows:
        r["baseline"] = [[x * f for x in row] for row in r["baseline"]]


@pytest.mark.parametrize("edit", [
    lambda rows: _scale_baselines(rows, 0.5),    # in range, but not the result's: lifts twice too high
    lambda rows: _scale_baselines(rows, 90.0),   # a chance share above 1
    lambda rows: rows[0]["baseline"][0].__setitem__(0, "nan"),
])
def test_per_sample_baselines_must_be_the_results(edit, tmp_path):
    """Per-sample lift (the "dynamically activated" property) divides each sample's scores by its chance
    baselines; baselines that do not sum to the result's ``baseline`` grid were used as they were."""
    good, why = activation(_with_samples(tmp_path / "good"))
    assert why == "" and good["samples"] == 2 and good["heads_active_on_any"] == 4  # lifts 2-8x on sample 0
    got, why = activation(_with_samples(tmp_path / "bad", edit))
    assert got is None and "does not add up to the result's scores and chance baselines" in why


def test_an_empty_controls_list_is_refused(tmp_path, capfd):
    """``--controls ""`` (an unset shell variable) ran with no control at all, silently."""
    path = put(tmp_path)
    for value in ("", ",", " , "):
        one_line(*cli(capfd, "ablate", path, "--controls", value)[::2], "--controls names no control")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_an_error_naming_a_path_with_a_newline_stays_one_line(tmp_path, capfd):
    """A path holding a line break (or another control character) was printed as it was: the error took two
    lines. Now such characters are escaped."""
    rc, _, err = cli(capfd, "report", tmp_path / "no\nsuch\r\x1b[31m", "--out", tmp_path / "rep")
    line = one_line(rc, err, "no\\nsuch\\r\\x1b[31m does not exist")
    assert "\x1b" not in line and not (tmp_path / "rep").exists()


def test_results_of_one_key_with_other_attention_layers_are_one_line(tmp_path, capfd):
    """A result claiming a hybrid's attention layers (layer 1 of 2) beside results of every layer under one
    key: the report ranked heads across them as one model and stopped with a KeyError traceback."""
    import torch

    from retrieval_heads.io import atomic_write_json
    from retrieval_heads.results import make_record, result_path

    out = tmp_path / "res"
    put(out, model="tiny", tokens=320, layers=2, heads=4)
    rec = make_record(method="summed_attention", model_key="tiny", model_name="org/tiny", question="inc_state",
                      question_prompt="inc_state", total_tokens=256, needle_position=0.5,
                      scores=torch.rand(2, 4, dtype=torch.float64), samples_processed=4, seed=0, dtype="float32",
                      attention_layers=[1])
    atomic_write_json(result_path(out, "summed_attention", "tiny", "inc_state", 256), rec)
    line = one_line(*cli(capfd, "report", out, "--out", tmp_path / "rep")[::2],
                    "are both model 'tiny' but have different attention layers (1 and all)")
    assert "tiny_inc_state_256.json" in line and not (tmp_path / "rep").exists()
