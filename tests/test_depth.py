"""Needle depth as a sweep axis: depth file names, the grid's depths, sweeps over depths x lengths (resume,
kill, the settings check), and ``detect --needle-position`` filing as the sweep does.

The model is a tiny random Llama with SmolLM2's tokenizer (real prompts, no SmolLM2 weights)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import save_tiny
from retrieval_heads.errors import UserError
from retrieval_heads.results import (
    check_name, depth_text, file_name, load_result, make_record, parse_file_name, result_path, samples_path,
)
from retrieval_heads.sweep import Unit, load_grid_file, make_grid, plan, run_sweep, unit_status

QUESTIONS = ["inc_state", "hq_state"]
TOKENS = [256, 320]
DEPTHS = [0.25, 0.5]


# --- names ------------------------------------------------------------------------------------------------


def test_depth_names_round_trip_and_sort():
    depths = [0.0, 0.1, 0.125, 0.25, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0, 1 / 3, 1e-5]
    for d in depths:
        for key, q, t in [("smollm2", "inc_state", 2048), ("org--my_model+local", "my_data+dataset", 300)]:
            name = file_name(key, q, t, d)
            assert parse_file_name(name) == (f"{key}_{q}", t, d)
            check_name(name, "file")  # a depth name is made of the characters a result's names may use
            assert result_path("out", "summed_attention", key, q, t, d).name == name
    # the seed's depth keeps the seed's name; any other depth gets its own, with two decimals at least
    assert file_name("smollm2", "inc_state", 2048) == file_name("smollm2", "inc_state", 2048, 0.5) \
        == "smollm2_inc_state_2048.json"
    assert file_name("smollm2", "inc_state", 2048, 0.1) == "smollm2_inc_state_2048_d0.10.json"
    assert file_name("smollm2", "inc_state", 2048, 1) == "smollm2_inc_state_2048_d1.00.json"
    assert [depth_text(d) for d in (0, 0.1, 0.125, 1e-5)] == ["0.00", "0.10", "0.125", "0.00001"]
    # names of one experiment at several depths sort as the depths do
    others = [d for d in depths if d != 0.5]
    assert sorted(others, key=lambda d: file_name("m", "q", 2048, d)) == sorted(others)
    # every depth has one name only, and anything else is not a result name
    for bad in ["m_q_2048_d0.5.json", "m_q_2048_d0.50.json", "m_q_2048_d0.100.json", "m_q_2048_d1.50.json",
                "m_q_2048_d0.1.json", "m_q_2048_d.30.json", "m_q_02048.json", "m_q_2048_d0.30.samples.jsonl",
                "q_d0.30.json", "m_q_2048_d-0.10.json"]:
        with pytest.raises(UserError, match="not a result file name"):
            parse_file_name(bad)
    for bad in (1.5, -0.1, float("nan"), True, "0.3"):
        with pytest.raises(UserError, match=r"needle_position: expected a number in \[0, 1\]"):
            file_name("m", "q", 2048, bad)


# --- the grid ---------------------------------------------------------------------------------------------


def test_grid_depths(tmp_path):
    g = make_grid(models=["smollm2"], questions=QUESTIONS, tokens=TOKENS, needle_positions="0.25,0.5")
    assert g.needle_positions == (0.25, 0.5) and g.size == 2 * 2 * 2
    assert plan(g) == [Unit("smollm2", t, tuple(QUESTIONS), d) for t in TOKENS for d in DEPTHS]
    assert make_grid(needle_positions=["0.9", 0.1]).needle_positions == (0.9, 0.1)  # the order given
    assert make_grid(needle_positions=1).needle_positions == (1.0,)
    assert make_grid(needle_position=0.3).needle_positions == (0.3,)  # one depth, as before
    assert make_grid(needle_position="0.3").needle_position == 0.3
    assert make_grid().needle_positions == (0.5,) and make_grid().size == 16  # smollm2 x 4 questions x 4 lengths
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"models": ["smollm2"], "needle_positions": [0.1, 0.3, 0.5]}))
    assert make_grid(**load_grid_file(j)).needle_positions == (0.1, 0.3, 0.5)
    t = tmp_path / "g.toml"
    t.write_text('models = ["smollm2"]\nneedle_positions = [0.7, 0]\n')
    assert make_grid(**load_grid_file(t)).needle_positions == (0.7, 0.0)
    bad = [(dict(needle_positions=[0.1, 1.5]), "needle_positions must lie in [0, 1], got 1.5"),
           (dict(needle_positions="-0.1"), "needle_positions must lie in [0, 1], got -0.1"),
           (dict(needle_positions=[float("nan")]), "needle_positions must lie in [0, 1], got nan"),
           (dict(needle_positions=["0.3", "0.30"]), "needle_positions: depth 0.3 is given twice"),
           (dict(needle_positions=[]), "the grid names no needle_positions"),
           (dict(needle_positions="deep"), "needle_positions: 'deep' is not a number"),
           (dict(needle_positions=[True]), "needle_positions: expected a number or a list of numbers, got true"),
           (dict(needle_position=0.3, needle_positions=[0.1]), "give needle_position (one depth) or "
                                                                "needle_positions (several), not both"),
           (dict(needle_position=1.5), "needle_position must lie in [0, 1], got 1.5")]  # the CLI: --needle-position
    for settings, msg in bad:
        with pytest.raises(UserError) as e:
            make_grid(models=["smollm2"], **settings)
        assert str(e.value) == msg
    j.write_text(json.dumps({"models": ["smollm2"], "needle_positions": "0.3"}))
    with pytest.raises(UserError, match='needle_positions: expected a number or a list of numbers, got "0.3"'):
        load_grid_file(j)


@pytest.mark.parametrize("args, msg", [
    (["--needle-positions", "0.1", "1.5"], "error: --needle-positions must lie in [0, 1], got 1.5"),
    (["--needle-positions", "0.3", "0.30"], "error: --needle-positions: depth 0.3 is given twice"),
    (["--needle-positions", "0.3,x"], "error: --needle-positions: 'x' is not a number"),  # the flag, as above
    (["--needle-positions"], "error: argument --needle-positions: expected at least one argument"),
])
def test_bad_depths_are_one_line(tmp_path, capsys, args, msg):
    from retrieval_heads.cli import main

    out = tmp_path / "out"
    assert main(["sweep", "--models", "smollm2", *args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [msg]
    assert not out.exists()


def test_depth_flags_replace_the_grid_files_depths(tmp_path, monkeypatch):
    """Either depth flag replaces either depth key of the grid file (flags win, as for every setting)."""
    seen = []
    monkeypatch.setattr("retrieval_heads.sweep.run_sweep", lambda grid, *a, **k: seen.append(grid) or _Done())
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"models": ["smollm2"], "needle_positions": [0.1, 0.3]}))
    from retrieval_heads.cli import main

    for flags, want in [([], (0.1, 0.3)), (["--needle-position", "0.7"], (0.7,)),
                        (["--needle-positions", "0.9", "0.2"], (0.9, 0.2))]:
        assert main(["sweep", "--config", str(g), *flags, "--output-dir", str(tmp_path / "o")]) == 0
        assert seen[-1].needle_positions == want


class _Done:
    done, recomputed, skipped, seconds = [], [], [], 0.0


# --- sweeps on a tiny model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama directory with SmolLM2's tokenizer, and the model loaded from it."""
    from retrieval_heads.models import load_model

    d = save_tiny(tmp_path_factory.mktemp("models") / "tiny")
    return d, load_model(str(d))


def depth_grid(tiny, **kw):
    return make_grid(**{**dict(models=[str(tiny[0])], questions=QUESTIONS, tokens=TOKENS, samples=2,
                               needle_positions=DEPTHS), **kw})


def names(tiny) -> list[str]:
    key = tiny[1].key
    return sorted(file_name(key, q, t, d) for q in QUESTIONS for t in TOKENS for d in DEPTHS)


def results(out):
    """{file name: record without its timestamp} of every result JSON under ``out``."""
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "timestamp"}
            for p in sorted((out / "summed_attention").glob("*.json"))}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted sweep over 2 depths x 2 lengths."""
    out = tmp_path_factory.mktemp("reference")
    lines: list[str] = []
    s = run_sweep(depth_grid(tiny), out, load=lambda m, **kw: tiny[1], progress=False, echo=lines.append,
                  check_models=False)
    assert len(s.done) == 8 and not s.skipped and not s.recomputed
    return out, lines


def test_sweep_over_depths_and_lengths(tiny, reference, tmp_path):
    out, lines = reference
    got = results(out)
    assert sorted(got) == names(tiny)
    key = tiny[1].key
    assert f"{key}_inc_state_256_d0.25.json" in got and f"{key}_inc_state_256.json" in got
    for name, rec in got.items():
        assert rec["needle_position"] == parse_file_name(name)[2]
    assert lines[0].endswith(f"2 question(s) x 2 length(s) x 2 depth(s) = 8 experiments, 2 samples each; 8 to "
                             f"compute -> {out / 'summed_attention'}")
    assert sum(x.startswith("done ") and "   256 d0.25  top " in x for x in lines) == 2
    # the needle really moves: the depths' results differ, and each sample's needle sits earlier at 0.25
    a, b = got[f"{key}_hq_state_320_d0.25.json"], got[f"{key}_hq_state_320.json"]
    assert a["scores"] != b["scores"]
    # a rerun skips everything
    again: list[str] = []
    s = run_sweep(depth_grid(tiny), out, load=lambda m, **kw: pytest.fail("nothing to load"), progress=False,
                  echo=again.append, check_models=False)
    assert len(s.skipped) == 8 and not s.done and not s.recomputed
    assert sum(x.startswith("skipped ") for x in again) == 8 and "0 to compute" in again[0]
    assert results(out) == got


def test_needle_sits_at_each_units_depth(tiny):
    from retrieval_heads.sweep import compute_unit

    grid = depth_grid(tiny, questions=["inc_state"], tokens=[320])
    starts = {}
    for d in DEPTHS:
        res = compute_unit(tiny[1], Unit(str(tiny[0]), 320, ("inc_state",), d), grid)
        assert [r.record["needle_position"] for r in res] == [d]
        starts[d] = [p.needle_start for p in res[0].prompts]
    assert all(x < y for x, y in zip(starts[0.25], starts[0.5]))


def test_a_results_depth_must_be_its_units(tiny, reference, tmp_path):
    """A valid result whose needle_position is not the depth its name says (a copy, an edit with the checksum
    recomputed) is another experiment's: the sweep stops and overwrites nothing."""
    src, _ = reference
    out = tmp_path / "out"
    shutil.copytree(src, out)
    key = tiny[1].key
    d = out / "summed_attention"
    target = d / f"{key}_inc_state_320_d0.25.json"
    target.write_bytes((d / f"{key}_inc_state_320.json").read_bytes())  # depth 0.5 under the 0.25 name
    before = target.read_bytes()
    # a result of depth 0.5 under a depth-0.25 name names another experiment: neither trusted nor replaced
    with pytest.raises(UserError, match=r"_d0\.25\.json: the file name names another experiment than its fields "
                                        r"\(summed_attention/tiny_inc_state_320\.json\); "):
        run_sweep(depth_grid(tiny), out, load=lambda m, **kw: tiny[1], progress=False, echo=lambda s: None,
                  check_models=False)
    assert target.read_bytes() == before
    st = unit_status(src, depth_grid(tiny), Unit(str(tiny[0]), 320, tuple(QUESTIONS), 0.25))
    assert st.todo == []


def test_detect_files_a_depth_as_the_sweep_does(tiny, reference, tmp_path, capsys):
    from retrieval_heads.cli import main

    src, _ = reference
    out = tmp_path / "out"
    assert main(["detect", "--model", str(tiny[0]), "--question", "hq_state", "--tokens", "320", "--samples", "2",
                 "--needle-position", "0.25", "--output-dir", str(out)]) == 0
    name = f"{tiny[1].key}_hq_state_320_d0.25.json"
    assert f"wrote {out / 'summed_attention' / name}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "summed_attention").iterdir()) == [name]
    det, swp = load_result(out / "summed_attention" / name), load_result(src / "summed_attention" / name)
    assert det["needle_position"] == swp["needle_position"] == 0.25
    torch.testing.assert_close(torch.tensor(det["scores"]), torch.tensor(swp["scores"]), atol=2e-5, rtol=0)
    # the default depth keeps the seed's name
    rec = make_record(method="summed_attention", model_key="m", model_name="m", question="q", question_prompt="q",
                      total_tokens=64, needle_position=0.5, scores=torch.rand(2, 2), samples_processed=1, seed=0,
                      dtype="float32")
    from retrieval_heads.experiments import write_result

    assert write_result(tmp_path / "o2", rec, [], torch.zeros(1, 2, 2), False).name == "m_q_64.json"


KILLER = textwrap.dedent("""
    import os, signal, sys
    from retrieval_heads import io as rio
    from retrieval_heads.cli import main

    class Os:
        replaced = 0

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            if self.replaced == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)
            self.replaced += 1
            return os.replace(src, dst)

    rio.os = Os()
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # starts other processes
def test_killed_depth_sweep_resumes_to_the_same_results(tiny, reference, tmp_path):
    """SIGKILL as the fourth result is renamed into place (the second unit, depth 0.5, half written): the
    rerun skips the three results there and computes the five others, ending with the reference's files."""
    ref, _ = reference
    out = tmp_path / "out"
    args = ["sweep", "--models", str(tiny[0]), "--questions", *QUESTIONS, "--tokens", *map(str, TOKENS),
            "--needle-positions", *map(str, DEPTHS), "--samples", "2", "--output-dir", str(out), "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", KILL_AT="3")
    first = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert len(results(out)) == 3
    resumed = subprocess.run([sys.executable, "-m", "retrieval_heads", *args], capture_output=True, text=True,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("\nskipped ") == 3 and resumed.stdout.count("\ndone ") == 5
    assert results(out) == results(ref)
    assert sorted(p.name for p in (out / "summed_attention").iterdir()) == names(tiny)  # no temp file left


def test_report_of_a_depth_sweep(tiny, tmp_path):
    """A sweep over 2 depths with attention rows and samples files: the report draws its depth x length grid,
    and every result, at either depth, has its attention rows in the explorer."""
    from retrieval_heads.report.build import build

    grid = depth_grid(tiny, questions=["inc_state"], tokens=[256], needle_positions=[0.75, 0.25], save_attention=2,
                      save_samples=True)
    out = tmp_path / "out"
    run_sweep(grid, out, load=lambda m, **kw: tiny[1], progress=False, echo=lambda s: None, check_models=False)
    key = tiny[1].key
    assert sorted(p.name for p in (out / "summed_attention").iterdir()) == sorted(
        f"{key}_inc_state_256_d{d}.{x}" for d in ("0.25", "0.75") for x in ("json", "samples.jsonl", "attention.npz"))
    report = build(out, tmp_path / "report", resamples=10)
    [g] = report.data["depth_grid"]["grids"]
    assert g["depths"] == [0.25, 0.75] and g["tokens"] == [256] and not g["answers_recorded"]
    recs = {d: load_result(out / "summed_attention" / file_name(key, "inc_state", 256, d)) for d in (0.25, 0.75)}
    assert g["top_head"] == [[recs[d]["head_rankings"][0]["head"]] for d in (0.25, 0.75)]
    assert g["top_lift"] == [[round(recs[d]["head_rankings"][0]["lift"], 4)] for d in (0.25, 0.75)]
    assert len(g["depth_pairs"]) == 1 and g["depth_pairs"][0]["a"] == 0.25
    assert [x["file"] for x in report.data["attention"]["experiments"]] == \
        [f"summed_attention/{key}_inc_state_256_d{d}.attention.npz" for d in ("0.25", "0.75")]
    assert [x["depth"] for x in report.data["bootstrap"]["experiments"]] == [0.25, 0.75]
    assert all("heads" in x for x in report.data["bootstrap"]["experiments"])


# --- answers in a sweep -----------------------------------------------------------------------------------


def test_grid_answers_setting(tmp_path, monkeypatch):
    """``answers = true`` in a grid file (strictly a bool), and ``--answers/--no-answers`` win over the file."""
    from retrieval_heads.cli import main

    assert make_grid().answers is False and make_grid(answers=True).answers is True
    g = tmp_path / "g.toml"
    g.write_text('models = ["smollm2"]\nanswers = true\n')
    assert make_grid(**load_grid_file(g)).answers is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": ["smollm2"], "answers": "false"}))
    with pytest.raises(UserError, match='answers: expected true or false, got "false"'):
        load_grid_file(bad)
    seen = []
    monkeypatch.setattr("retrieval_heads.sweep.run_sweep", lambda grid, *a, **k: seen.append(grid) or _Done())
    for flags, want in [([], True), (["--no-answers"], False), (["--answers"], True)]:
        assert main(["sweep", "--config", str(g), *flags, "--output-dir", str(tmp_path / "o")]) == 0
        assert seen[-1].answers is want
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"models": ["smollm2"]}))
    assert main(["sweep", "--config", str(plain), "--answers", "--output-dir", str(tmp_path / "o")]) == 0
    assert seen[-1].answers is True


def test_sweep_answers_as_detect_and_resume(tiny, tmp_path):
    """A sweep with answers records the accuracy ``detect(answers=True)`` records on the same settings (and the
    samples files the answers); a result made without answers is recomputed by a sweep that asks for them, the
    other way round it is kept; the report's depth x length grid then shows the accuracy."""
    from retrieval_heads import detect
    from retrieval_heads.report.build import build

    lm = tiny[1]
    key = lm.key
    kw = dict(questions=["inc_state"], tokens=[256], needle_positions=[0.25], save_samples=True)
    out = tmp_path / "out"
    path = out / "summed_attention" / file_name(key, "inc_state", 256, 0.25)
    load = lambda m, **k: lm  # noqa: E731
    s = run_sweep(depth_grid(tiny, **kw), out, load=load, progress=False, echo=lambda s: None, check_models=False)
    assert s.done == [path] and "accuracy" not in load_result(path)["extra"]
    st = unit_status(out, depth_grid(tiny, answers=True, **kw), Unit(str(tiny[0]), 256, ("inc_state",), 0.25))
    e = ("summed_attention", "inc_state")
    assert st.state == {e: "missing"} and st.reason == {e: "no answers recorded"}
    lines: list[str] = []
    s = run_sweep(depth_grid(tiny, answers=True, **kw), out, load=load, progress=False, echo=lines.append,
                  check_models=False)
    assert s.done == [path] and not s.skipped and lines[1].startswith("done ")
    det = detect(lm, question="inc_state", tokens=256, samples=2, needle_position=0.25, seed=0, answers=True)
    rec, want = load_result(path), det.record
    assert rec["extra"] == want["extra"]  # accuracy, n_correct, n_answered, max_new_tokens, in detect's order
    assert {"accuracy", "n_correct", "n_answered", "max_new_tokens"} <= set(rec["extra"])
    assert rec["extra"]["n_answered"] == 2
    acc = f"accuracy {want['extra']['n_correct']}/2"
    assert acc in rec["verdict"] and acc in want["verdict"]
    rows = [json.loads(x) for x in samples_path(path).read_text().splitlines()]
    assert [(r["generated"], r["correct"]) for r in rows] == [(a.text, a.correct) for a in det.result.answers]
    # a sweep without answers keeps the result made with them
    s = run_sweep(depth_grid(tiny, **kw), out, load=lambda m, **k: pytest.fail("nothing to load"), progress=False,
                  echo=lambda s: None, check_models=False)
    assert s.skipped == [path] and not s.done and not s.recomputed
    report = build(out, tmp_path / "report", resamples=10)
    [g] = report.data["depth_grid"]["grids"]
    assert g["answers_recorded"] and g["accuracy"] == [[rec["extra"]["accuracy"]]]
    assert g["n_correct"] == [[rec["extra"]["n_correct"]]]
