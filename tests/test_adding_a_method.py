"""docs/adding-a-method.md, followed once: a method defined here is registered, scored by ``detect`` on a tiny
model (alone, and with the default method from one shared context pass), written and read back like any
other, and unregistered again. Its shared-pass reads must equal its own ``score_batch``, as the guide asks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from retrieval_heads import detect
from retrieval_heads.data.prompt import PromptFormat
from retrieval_heads.data.samples import synthetic_samples
from retrieval_heads.methods import METHODS, Method, MethodContext, needle_mass, register, unregister
from retrieval_heads.methods.base import span_mask, stack_ids
from retrieval_heads.models import LoadedModel
from retrieval_heads.onepass import score_groups
from retrieval_heads.results import load_result


class QuestionEnd(Method):
    """The guide's example: attention mass that the question's last token puts on the needle."""

    name = "question_end"
    shared = True  # it reads rows of the prompt, so a shared context pass can serve it

    def row_span(self, fmt, p):
        return p.question_end - 1, p.question_end  # the question's last token

    def from_reads(self, model, real, null, batch, ctx):
        return real.mass["needle"]  # (B, L, H)

    def score_batch(self, model, batch, ctx: MethodContext | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        ids = stack_ids(batch, device)  # (B, N)
        rows = torch.tensor([p.question_end - 1 for p in batch], device=device)  # (B,)
        mass = needle_mass(model, ids, span_mask(batch, device), rows.unique())  # (B, L, H, S)
        pick = (rows[:, None] == rows.unique()[None, :]).float()  # (B, S): each prompt's own row
        return (mass * pick[:, None, None, :]).sum(-1)  # (B, L, H)


@pytest.fixture
def question_end():
    method = register(QuestionEnd())
    yield method
    unregister(method.name)
    assert method.name not in METHODS


@pytest.fixture(scope="module")
def lm(smollm2_tokenizer) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = len(smollm2_tokenizer)
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), smollm2_tokenizer, "tiny", "tiny")


def test_a_new_method_runs_through_detect_and_is_written_like_the_others(question_end, lm, tmp_path):
    res = detect(lm, question="hq_state", tokens=200, samples=2, method="question_end", output_dir=tmp_path)
    r = res["question_end"]
    prompts = r.prompts
    want = torch.stack([question_end.score_batch(lm.model, [p])[0] for p in prompts])  # (S, L, H)
    assert r.sample_scores.shape == (2, 2, 4)
    torch.testing.assert_close(r.sample_scores, want, atol=1e-6, rtol=0)
    assert float(r.scores.abs().max()) > 0  # a real mass, not zeros
    record = load_result(tmp_path / "question_end" / "tiny_hq_state_200.json")
    assert record["method"] == "question_end" and record["samples_processed"] == 2
    written = torch.tensor(record["scores"], dtype=torch.float64)  # (L, H), rounded in the JSON
    torch.testing.assert_close(written, want.sum(0).double(), atol=1e-5, rtol=0)


def test_a_new_method_shares_the_context_pass_and_equals_its_own_passes(question_end, lm):
    groups = synthetic_samples(PromptFormat(lm.tokenizer), ["hq_state", "inc_year"], 200, 2, 0.5, 0)
    got = score_groups(lm, groups, ["hq_state", "inc_year"], ["summed_attention", "question_end"])
    for q in ("hq_state", "inc_year"):
        own = question_end.score_batch(lm.model, [g[q] for g in groups])  # (S, L, H)
        torch.testing.assert_close(got[q].scores["question_end"], own, atol=1e-5, rtol=0)
    both = detect(lm, question="hq_state", tokens=200, samples=2, method="summed_attention,question_end")
    assert list(both) == ["summed_attention", "question_end"]
    torch.testing.assert_close(both["question_end"].sample_scores, got["hq_state"].scores["question_end"].cpu(),
                               atol=1e-5, rtol=0)


class QuestionSpans(QuestionEnd):
    """The same rows, measured on every span with chance baselines: one result per --span kind."""

    name = "question_spans"
    measures_spans = True


def test_a_span_measuring_method_gets_every_span_its_baselines_and_a_result_per_kind(lm):
    from retrieval_heads.onepass import measure_spans

    method = register(QuestionSpans())
    try:
        groups = synthetic_samples(PromptFormat(lm.tokenizer), ["hq_state"], 200, 2, 0.5, 0)
        prompts = [g["hq_state"] for g in groups]
        shared = score_groups(lm, groups, ["hq_state"], ["summed_attention", "question_spans"])["hq_state"]
        own = measure_spans(lm, method, prompts)  # its own passes: the mean of its rows, one probed pass
        got = shared.span_masses["question_spans"]
        assert set(got.mass) == set(own.mass) >= {"needle", "control:needle", "fact:hq_state"}
        for n in own.mass:
            torch.testing.assert_close(got.mass[n], own.mass[n], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.baseline[n], own.baseline[n], atol=1e-7, rtol=0)
        torch.testing.assert_close(own.mass["needle"], method.score_batch(lm.model, prompts), atol=1e-6, rtol=0)
        assert not torch.equal(own.mass["needle"], shared.span_masses["summed_attention"].mass["needle"])
        res = detect(lm, question="hq_state", tokens=200, samples=2, method="question_spans", span="needle,answer")
        assert list(res) == ["question_spans", "question_spans+answer"]
        assert all("lift" in r.record and "verdict" in r.record for r in res.values())
        torch.testing.assert_close(res["question_spans"].sample_scores, own.mass["needle"].cpu(), atol=1e-6, rtol=0)
    finally:
        unregister(method.name)
