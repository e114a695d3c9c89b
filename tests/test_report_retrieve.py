"""The report's first section, "Does the model retrieve?", and lift next to the score in its tables."""

import json

import numpy as np
import pytest
import torch

from retrieval_heads.cli import main
from retrieval_heads.io import atomic_write_json
from retrieval_heads.results import make_record, result_path


def put(root, *, method="summed_attention", question="inc_state", tokens=2048, lift=None, sig=None, extra=None):
    grid = np.zeros((2, 3))
    grid[1, 2] = 4.0
    grid[0, 1] = 1.0
    added = None
    if lift is not None:
        added = {"span": "needle", "baseline": [[0.5] * 3] * 2, "lift": lift, "control_scores": [[0.4] * 3] * 2,
                 "significance": sig, "verdict": "a line"}
    rec = make_record(method=method, model_key="m1", model_name="org/m1", question=question, question_prompt=question,
                      total_tokens=tokens, needle_position=0.5, scores=torch.tensor(grid), samples_processed=8,
                      seed=0, dtype="float32", extra=extra or {}, added=added)
    atomic_write_json(result_path(root, method, "m1", question, tokens), rec)


def test_does_the_model_retrieve_section(tmp_path, capsys):
    sig = {"alpha": 0.05, "heads": [{"head": "L1H2", "p": 0.0039, "p_adjusted": 0.02}], "note": ""}
    put(tmp_path, lift=[[1.0, 2.0, 0.5], [0.9, 1.1, 8.04]], sig=sig, extra={"n_correct": 5, "n_answered": 8})
    few = {"alpha": 0.05, "heads": [], "note": "too few samples: with 4 sample(s) ..."}
    put(tmp_path, method="summed_attention+answer", tokens=1024, lift=[[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]], sig=few)
    put(tmp_path, method="query_focused")  # no chance fields: not in the section
    assert main(["report", str(tmp_path)]) == 0, capsys.readouterr().err
    md = (tmp_path / "report" / "report.md").read_text()
    first = md.index("## ")
    assert md[first:].startswith("## Does the model retrieve?")
    assert md.index("## Does the model retrieve?") < md.index("## Top head per configuration")
    assert ("| summed_attention | m1 | inc_state | 2K | 8 | 5/8 | 8.0x (L1H2) | 1: L1H2 |") in md
    assert ("| summed_attention+answer | m1 | inc_state | 1K | 8 | — | 3.0x (L0H1) | none (too few samples) |") in md
    assert "| **m1** | inc_state | L1H2 (4.00, 8.0x) |" in md  # the seed's table: lift next to the score
    assert "| **m1** | inc_state | L1H2 (4.00) |" in md  # query_focused: no lift
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {r["method"]: r for r in data["retrieval"]}
    assert set(rows) == {"summed_attention", "summed_attention+answer"}
    assert rows["summed_attention"]["top_lift"] == pytest.approx(8.04) and rows["summed_attention"]["significant"] == ["L1H2"]
    assert data["top_head_table"]["summed_attention"]["m1"]["inc_state"]["2048"] == \
        {"head": "L1H2", "score": 4.0, "lift": 8.04}


def test_malformed_lift_is_a_one_line_error(tmp_path, capsys):
    from retrieval_heads.results import _checksum

    put(tmp_path, lift=[[1.0, 2.0, 3.0], [0.9, 1.1, 1.2]], sig={"heads": []})
    path = result_path(tmp_path, "summed_attention", "m1", "inc_state", 2048)
    rec = json.loads(path.read_text())
    rec["lift"] = [[1.0, 2.0], [0.9, 1.1]]  # 2 x 2 for a 2 x 3 result, with a matching checksum
    rec["checksum"] = _checksum(rec)
    path.write_text(json.dumps(rec))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lift is not 2 x 3 finite numbers" in err and len(err.strip().splitlines()) == 1


def test_no_head_beating_the_control_gives_the_results_own_reason(tmp_path, capsys):
    """A result whose samples have no control span (none fits at this length) was shown as "none (too few
    samples)": the table now says why, from the significance block's counts."""
    from retrieval_heads import stats

    none_fits = stats.significance(np.zeros((0, 2, 3)), np.zeros((0, 2, 3)))
    none_fits.update(samples_left_out=8)
    none_fits["note"] += "; 8 sample(s) without a span or control span left out"
    assert none_fits["note"].startswith("too few samples: with 0 sample(s)")  # what the table used to read
    put(tmp_path, tokens=256, lift=[[1.0, 2.0, 0.5], [0.9, 1.1, 1.2]], sig=none_fits)
    few = stats.significance(np.arange(1.0, 5.0)[:, None, None] * np.ones((4, 2, 3)), np.zeros((4, 2, 3)))
    assert few["heads"] == [] and few["note"].startswith("too few samples")
    few.update(samples_left_out=0)
    put(tmp_path, tokens=512, lift=[[1.0, 2.0, 0.5], [0.9, 1.1, 1.2]], sig=few)
    assert main(["report", str(tmp_path)]) == 0, capsys.readouterr().err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| 256 | 8 | — | 2.0x (L0H1) | none (no test: no sample has both the span and a control span; 8 left out) |" in md
    assert "| 512 | 8 | — | 2.0x (L0H1) | none (too few samples: 4 tested, alpha 0.05 needs at least 5) |" in md
