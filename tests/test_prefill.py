"""One prefill for several questions equals separate full runs (float32, 1e-5), on tiny families and SmolLM2."""

import pytest
import torch
from conftest import FAMILIES, tiny_model

import retrieval_heads.prefill as prefill
from retrieval_heads.data.prompt import PromptFormat, PromptSample
from retrieval_heads.data.questions import QUESTIONS
from retrieval_heads.data.samples import synthetic_samples
from reference import score_shared, summed_attention_scores
from retrieval_heads.methods.summed_attention import SummedAttention

QS = ["a", "b", "c", "d"]


def tiny_groups(n_samples=3, context=48, suffix_lengths=(5, 1, 9, 3), seed=0):
    """Samples built from token ids directly: a shared random context, a needle span that straddles the
    16-token sliding window of the last tokens, and one random suffix per question (lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_samples):
        ctx = torch.randint(1, 128, (context,), generator=g).tolist()
        start = context - 14 - i  # per sample: a different span, so samples differ in more than ids
        group = {}
        for q, n in zip(QS, suffix_lengths):
            suffix = torch.randint(1, 128, (n,), generator=g).tolist()
            group[q] = PromptSample(ctx + suffix, start, start + 8, context, q, "x", q)
        groups.append(group)
    return groups


def separate(model, groups, questions):
    """The reference: each question's full prompt, one full forward pass per sample."""
    return {q: torch.cat([SummedAttention().score_batch(model, [g[q]]) for g in groups]) for q in questions}


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_equals_separate_on_tiny_families(family):
    model = tiny_model(family)
    groups = tiny_groups()
    ref = separate(model, groups, QS)
    for batch_size in (1, 2):
        got = score_shared(model, groups, QS, batch_size=batch_size)
        for q in QS:
            assert got[q].shape == (3, 3, 4)
            torch.testing.assert_close(got[q], ref[q], atol=1e-5, rtol=0)
    assert max(float(ref[q].max()) for q in QS) > 0.05  # the needle does get attention
    # and the eager, full-matrix reference agrees as well
    torch.testing.assert_close(got["c"][:1], summed_attention_scores(model, [groups[0]["c"]]), atol=1e-5, rtol=0)


def test_sliding_window_really_hides_the_start():
    """Mistral's window (16) is shorter than the prompt: a needle at the very start gets no attention from
    the last token, through the cache as in a full pass."""
    model = tiny_model("mistral")
    groups = tiny_groups(n_samples=1)
    for p in groups[0].values():
        p.needle_start, p.needle_end = 0, 8
    got = score_shared(model, groups, QS)
    for q in QS:
        assert float(got[q].abs().max()) == 0.0
        torch.testing.assert_close(got[q], separate(model, groups, [q])[q], atol=1e-6, rtol=0)


def test_probe_builds_rows_only_for_the_suffix_pass(monkeypatch):
    """No attention row is built during the context pass: one callback per layer, for the suffix pass, with
    one row per distinct suffix end and one batch row per (sample, question)."""
    model = tiny_model("llama")
    groups = tiny_groups(n_samples=2)
    calls = []
    real = prefill.attention_probe

    def counting_probe(model, on_layer, **kw):
        def counted(layer, probs):
            calls.append((layer, tuple(probs.shape)))
            on_layer(layer, probs)

        return real(model, counted if on_layer is not None else None, **kw)

    monkeypatch.setattr(prefill, "attention_probe", counting_probe)
    score_shared(model, groups, QS, batch_size=2)
    n_max = 9
    assert [layer for layer, _ in calls] == [0, 1, 2]
    assert all(shape == (2 * 4, 4, 4, 48 + n_max) for _, shape in calls)  # (B*Q, H, S distinct ends, K)


def test_fallback_without_a_shareable_cache(monkeypatch):
    model = tiny_model("qwen2")
    groups = tiny_groups(n_samples=2)
    ref = score_shared(model, groups, QS)
    monkeypatch.setattr(prefill, "_new_cache", lambda model: None)
    got = score_shared(model, groups, QS)
    for q in QS:
        torch.testing.assert_close(got[q], ref[q], atol=1e-5, rtol=0)


def test_questions_must_share_their_context():
    groups = tiny_groups(n_samples=1)
    groups[0]["b"].input_ids[3] += 1
    with pytest.raises(ValueError, match="do not share their context"):
        score_shared(tiny_model("llama"), groups, QS)
    groups = tiny_groups(n_samples=1)
    groups[0]["c"].needle_end += 1
    with pytest.raises(ValueError, match="do not share their context"):
        prefill.context_groups(groups, QS)


def test_shared_equals_separate_on_smollm2(smollm2):
    qs = list(QUESTIONS)
    groups = synthetic_samples(PromptFormat(smollm2.tokenizer), qs, 320, 1, 0.5, 0)
    ends = {len(groups[0][q].input_ids) for q in qs}
    assert len(ends) > 1 and max(ends) == 320  # suffixes of different lengths: the padding is exercised
    got = score_shared(smollm2.model, groups, qs)
    ref = separate(smollm2.model, groups, qs)
    for q in qs:
        torch.testing.assert_close(got[q], ref[q], atol=1e-5, rtol=0)
    assert float(ref["inc_state"].max()) > 0.05
    # one question alone gives the same numbers as in a group of four
    alone = score_shared(smollm2.model, groups, ["hq_state"])["hq_state"]
    torch.testing.assert_close(alone, got["hq_state"], atol=1e-6, rtol=0)
