"""A sweep unit's ``--save-attention`` rows: one probed pass per question and sample for every result of the
unit, with exactly the rows (and bytes) of one pass per result."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import tiny_smol_lm
from retrieval_heads.attention import top_heads
from retrieval_heads.attention_capture import capture_rows, for_results
from retrieval_heads.sweep import Unit, compute_unit, make_grid


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_smol_lm()


class Forwards:
    """Counts the model's forward calls (a pre-hook on the top module)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_unit_rows_equal_one_pass_per_result_with_fewer_passes(tiny_lm):
    questions = ("inc_state", "inc_year")
    grid = make_grid(models="smollm2", questions=list(questions), tokens=[190], samples=1,
                     method="summed_attention,query_focused", span="needle,answer")
    unit = Unit("smollm2", 190, questions)
    with Forwards(tiny_lm.model) as scoring_passes:
        plain = compute_unit(tiny_lm, unit, grid)
    with Forwards(tiny_lm.model) as unit_passes:
        out = compute_unit(tiny_lm, unit, replace(grid, save_attention=3))
    results = len(grid.results) * len(questions)
    assert len(out) == results == 6
    with Forwards(tiny_lm.model) as per_result:  # the plain path: one pass per result and sample
        separate = [for_results(tiny_lm, [(r.record, r.prompts)], 3)[0] for r in out]
    assert per_result.n == results * grid.samples == 6
    assert unit_passes.n - scoring_passes.n == len(questions) * grid.samples == 2
    # the same files, byte for byte, and the same records as a unit without saved rows
    assert [r.attention for r in out] == separate
    assert [r.record["head_rankings"] for r in out] == [r.record["head_rankings"] for r in plain]
    # the rows themselves: the union pass's rows of a result's heads are the rows of a pass for that result alone
    r = out[-1]
    union = []
    for o in out:
        if o.record["question"] == r.record["question"]:
            union += [h for h in top_heads(o.record, 3) if h not in union]
    alone = capture_rows(tiny_lm, r.prompts, top_heads(r.record, 3))
    shared = capture_rows(tiny_lm, r.prompts, union)
    pick = [union.index(h) for h in top_heads(r.record, 3)]
    assert len(union) > 3
    for a, s in zip(alone, shared):
        assert torch.equal(a, s[pick])
