"""The experiment API on a tiny model: detect returns one type (a Detection), detect, the sweep and ablate build
their prompts with one helper, and detect's and the sweep's records come from one path."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from conftest import tiny_smol_lm
from retrieval_heads import ablate
from retrieval_heads.data.dataset import Record
from retrieval_heads.data.prompt import PromptFormat
from retrieval_heads.data.samples import dataset_samples, synthetic_samples
from retrieval_heads.experiments import AmbiguousResult, DetectResult, Detection, detect, experiment_prompts


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama with SmolLM2's tokenizer (real prompts, fast passes)."""
    return tiny_smol_lm()


def test_one_result_is_a_detection_that_answers_for_it(tiny_lm):
    det = detect(tiny_lm, question="inc_state", tokens=260, samples=2)
    assert isinstance(det, Detection) and isinstance(det, Mapping) and list(det) == ["summed_attention"]
    res = det["summed_attention"]
    assert isinstance(res, DetectResult) and det.result is res
    assert det.scores is res.scores and det.record is res.record and det.prompts is res.prompts
    assert det.top(3) == res.top(3) and det.top_rows(2) == res.top_rows(2) and len(det.top(3)) == 3
    assert torch.equal(det.scores, det.sample_scores.sum(0))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        det.nonsense  # noqa: B018


def test_several_results_are_a_detection_that_refuses_to_guess(tiny_lm):
    det = detect(tiny_lm, question="inc_state", tokens=260, samples=2, method="summed_attention,query_focused")
    assert isinstance(det, Detection) and list(det) == ["summed_attention", "query_focused"]
    assert all(isinstance(r, DetectResult) for r in det.values())
    for attr in ("scores", "record", "top", "result"):
        with pytest.raises(AmbiguousResult, match=r"holds 2 results \(summed_attention, query_focused\); pick one"):
            getattr(det, attr)
    assert not hasattr(det, "scores")  # an AttributeError: hasattr stays well-behaved
    # both methods scored the very same prompts
    assert [p.input_ids for p in det["summed_attention"].prompts] == [p.input_ids for p in det["query_focused"].prompts]


def test_experiment_prompts_are_detects_and_ablates(tiny_lm):
    """One helper builds an experiment's prompts: detect's and ablate's equal the generator's own output."""
    fmt = PromptFormat(tiny_lm.tokenizer)
    want = [g["hq_state"] for g in synthetic_samples(fmt, ["hq_state"], 280, 2, 0.3, 5)]
    got = experiment_prompts(tiny_lm, "hq_state", 280, 2, 0.3, 5)
    assert got == want
    det = detect(tiny_lm, question="hq_state", tokens=280, samples=2, needle_position=0.3, seed=5)
    assert det.prompts == want
    abl = ablate(det.record, model=tiny_lm, ks=(0, 1), random_seeds=0, max_new_tokens=2, batch_size=2)
    assert abl.prompts == want
    records = [Record("The company was incorporated in Ohio.", ["The sky is green. " * 20, "Grass is blue. " * 20],
                      "What state was the company incorporated in?", "Ohio", line=i + 1) for i in range(2)]
    got = experiment_prompts(tiny_lm, None, 200, 2, 0.5, 0, records)
    assert got == dataset_samples(fmt, records, 200, 0.5) and [len(p.input_ids) for p in got] == [200, 200]


def test_a_one_question_unit_of_the_sweep_is_detect(tiny_lm):
    """The sweep's unit compute and detect build their records on one path: a unit of one question gives
    detect's very records, field for field (the timestamp, and so the checksum, aside), for a plain method
    and for summed_attention on two span kinds with its chance fields and lift order."""
    from retrieval_heads.sweep import Unit, compute_unit, make_grid

    strip = lambda r: {k: v for k, v in r.items() if k not in ("timestamp", "checksum")}  # noqa: E731
    for settings in (dict(method="query_focused"), dict(method="summed_attention", span="needle,answer",
                                                        rank_by="lift")):
        det = detect(tiny_lm, question="inc_year", tokens=260, samples=2, **settings)
        unit = compute_unit(tiny_lm, Unit("smollm2", 260, ("inc_year",)), make_grid(samples=2, **settings))
        assert [r.record["method"] for r in unit] == list(det)
        for r in unit:
            assert strip(r.record) == strip(det[r.record["method"]].record)
            assert torch.equal(r.sample_scores, det[r.record["method"]].sample_scores)
    assert unit[0].record["rank_by"] == "lift" and "lift" in unit[1].record
