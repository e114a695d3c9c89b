"""What the commands print: plain lines when stdout or stderr is not a terminal (no box-drawn table whose
title wraps, no carriage returns of a progress bar), status lines for the silent phases, plurals."""

import io
import json
import re
import sys
from contextlib import nullcontext

import pytest
from conftest import tiny_smol_lm

from retrieval_heads.commands._common import print_top
from retrieval_heads.console import ERASE, bar_disabled, phase, plural

TITLE = "summed_attention: smollm2 inc_state 512 tokens, 16 samples, accuracy 0.75, ranked by score"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_print_top_to_a_pipe_is_plain_lines(capsys):
    print_top([("L3H4", 0.51234, 2.5), ("L12H0", 0.1, None)], TITLE)
    assert capsys.readouterr().out.splitlines() == [
        TITLE,  # whole, on one line
        "rank  head    score   lift",
        "   1  L3H4   0.5123  2.50x",
        "   2  L12H0  0.1000      —",
    ]
    print_top([("L0H0", 1.0)], "t")
    assert capsys.readouterr().out.splitlines() == ["t", "rank  head   score", "   1  L0H0  1.0000"]


def test_print_top_on_a_terminal_draws_the_table(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    print_top([("L3H4", 0.51234, 2.5)], "title")
    out = term.getvalue()
    assert "L3H4" in out and "━" in out  # rich's box
    term.seek(0)
    term.truncate()
    monkeypatch.setenv("COLUMNS", "120")  # a terminal wider than the title; the table is narrower
    print_top([("L3H4", 0.51234, 2.5)], TITLE)
    first = re.sub(r"\x1b\[[0-9;]*m", "", term.getvalue().splitlines()[0])
    assert first == TITLE  # one line above the table, not wrapped to the table's width


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar_disabled(True) and bar_disabled(False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not bar_disabled(True) and bar_disabled(False)


def test_a_phase_shows_on_a_terminal_and_leaves_nothing(monkeypatch):
    """On a terminal: the text while the phase runs, erased after (success or failure), so that an error
    found later is still the only line; in a file: nothing."""
    from tqdm import tqdm

    for tty in (False, True):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        for fail in (False, True):
            err.seek(0)
            err.truncate()
            with pytest.raises(ValueError) if fail else nullcontext(), phase("loading model m ..."):
                assert err.getvalue() == ("loading model m ..." if tty else "")  # shown while it runs
                if fail:
                    raise ValueError("no weights")
            assert err.getvalue() == ("loading model m ..." + ERASE if tty else "")
    with phase("x", enabled=False):
        assert err.getvalue() == "loading model m ..." + ERASE
    bar = tqdm(total=3, desc="sweep", file=err)  # a live bar shows the phase as its description
    with phase("saving rows ...", bar=bar):
        assert bar.desc == "saving rows ..."
    assert bar.desc == "sweep"
    bar.close()


def test_plural():
    assert [plural(n, "question") for n in (0, 1, 2)] == ["0 questions", "1 question", "2 questions"]
    assert plural(1, "sample(s)") == "1 sample(s)" and plural(3, "analysis", "analyses") == "3 analyses"


@pytest.mark.slow  # a sweep on a tiny model
def test_a_piped_sweep_prints_plain_lines_and_says_what_it_loads(tmp_path, capfd, monkeypatch):
    """With progress on but stderr not a terminal: nothing on stderr (no bar, no carriage return, no
    transient status), plain result lines on stdout, and "unit of 1 question"."""
    from retrieval_heads import console
    from retrieval_heads.sweep import local, make_grid, run_sweep

    said = []
    monkeypatch.setattr(local, "phase", lambda text, enabled=True, bar=None: (said.append(text),
                                                                              console.phase(text, enabled, bar))[1])
    lm = tiny_smol_lm()
    grid = make_grid(models=["smollm2"], questions=["hq_state"], tokens=[256], samples=1, save_attention=2,
                     answers=True, max_new_tokens=2, save_samples=True)
    s = run_sweep(grid, tmp_path / "out", load=lambda m, **kw: lm, progress=True, check_models=False)
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err
    assert err == ""
    assert said == ["loading model smollm2 ...", "saving the top 2 heads' attention rows of 1 result (1 sample) ..."]
    assert "(unit of 1 question, one prefill per sample)" in out and "1 questions" not in out
    # the sweep's answers take --max-new-tokens (here 2; the default is 12)
    record = json.loads(s.done[0].read_text())
    assert record["extra"]["max_new_tokens"] == 2
    row = json.loads(s.done[0].with_suffix(".samples.jsonl").read_text().splitlines()[0])
    from retrieval_heads.experiments import build_prompts
    from retrieval_heads.generation import answer_prompts

    prompt = build_prompts(lm, ["hq_state"], 256, 1, 0.5, 0)[0]["hq_state"]
    (want,) = answer_prompts(lm, [prompt], 2)
    assert row["generated"] == want.text and len(want.ids) <= 2
