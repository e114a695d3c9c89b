"""The ablation's fast path (lower layers shared per sample, one prefill per row) equals the plain sequential
path: the same greedy answers, log-probs within 1e-5 (float32, unrounded), on several model families."""

import pytest
import torch

from conftest import tiny_model
from retrieval_heads.ablation_measure import (decoder_layers, leadins, measure_sequential, measure_shared)
from retrieval_heads.data.prompt import PromptSample
from retrieval_heads.generation import answer_prompts
from retrieval_heads.models import LoadedModel


class WordTokenizer:
    """Token i is the word ``t{i}``."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def peaky_lm(family):
    model = tiny_model(family)
    with torch.no_grad():  # peaky attention, so that heads matter and answers are not all alike
        for name, p in model.named_parameters():
            if ("q_proj" in name or "c_attn" in name) and name.endswith("weight"):
                p.mul_(20)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return LoadedModel(model, WordTokenizer(), "tiny", "tiny")


def first_new(ids):
    """The first position after 0 whose token was not said before (a gold answer starting there is first
    found there), or None."""
    return next((j for j in range(1, len(ids) - 1) if ids[j] not in ids[:j]), None)


def prompts_with_leadins(lm, length=24):
    """Three random prompts: the first two with a gold answer of two words the unablated model says after a
    lead-in of its own, the last with a gold answer it does not say (it gets the most common lead-in)."""
    g = torch.Generator().manual_seed(7)
    raw = [PromptSample(torch.randint(3, 128, (length,), generator=g).tolist(), 8, 16, 20, "q", "t1")
           for _ in range(8)]
    said = answer_prompts(lm, raw, 4)
    own = [(p, a.ids[first_new(a.ids):][:2]) for p, a in zip(raw, said) if first_new(a.ids)][:2]
    assert len(own) == 2
    out = [PromptSample(p.input_ids, 8, 16, 20, "q", " ".join(f"t{t}" for t in gold)) for p, gold in own]
    return out + [PromptSample(raw[-1].input_ids, 8, 16, 20, "q", "t0 t1")]


SETS = [[], ["L2H1"], ["L1H0", "L2H3"], ["L0H2"], ["L1H1", "L1H2", "L1H3"]]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gpt2"])
def test_shared_path_equals_sequential(family):
    lm = peaky_lm(family)
    prompts = prompts_with_leadins(lm)
    base = answer_prompts(lm, prompts, 4)
    leads = leadins(lm.tokenizer, prompts, base)
    assert [le.source for le in leads] == ["own"] * 2 + ["shared"]
    for le, a in zip(leads[:2], base):  # the words said before the gold answer
        assert le.ids == a.ids[: a.text.split().index(prompts[base.index(a)].answer.split()[0])]
    assert leads[2].ids and leads[2].ids in [le.ids for le in leads[:2]]
    ref = measure_sequential(lm, prompts, SETS, 4, leads)
    got = measure_shared(lm, prompts, SETS, 4, leads, batch_size=3)  # chunks of 3 and 2 conditions
    for c in range(len(SETS)):
        assert [a.ids for a in got.answers[c]] == [a.ids for a in ref.answers[c]], (family, c)
        assert [a.correct for a in got.answers[c]] == [a.correct for a in ref.answers[c]]
        for what in ("logprob", "leadin_logprob"):
            diff = max(abs(x - y) for x, y in zip(getattr(got, what)[c], getattr(ref, what)[c]))
            assert diff <= 1e-5, (family, c, what, diff)
    assert all(a.correct for a in ref.answers[0][:2])  # the gold answers are what the model says
    assert len({tuple(tuple(a.ids) for a in ans) for ans in ref.answers}) >= 3  # removal changes answers
    assert len({round(x, 4) for lp in ref.logprob for x in lp}) >= 10
    assert ref.leadin_logprob[0][2] != ref.logprob[0][2]  # the lead-in changes what is measured


def test_layers_below_the_lowest_removed_head_run_once_per_sample():
    """Every condition removes heads of layer 2 only: layer 0's attention sees the full prefill (prompt +
    gold) once per sample, in the shared pass, whatever the number of conditions."""
    lm = peaky_lm("llama")
    prompts = prompts_with_leadins(lm)
    leads = leadins(lm.tokenizer, prompts, answer_prompts(lm, prompts, 5))
    sets = [["L2H0"], ["L2H1"], ["L2H2", "L2H3"], ["L2H1", "L2H3"]]
    attn = decoder_layers(lm.model)[0].self_attn
    widths = []
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: widths.append(kwargs["hidden_states"].shape),
                                      with_kwargs=True)
    try:
        measure_shared(lm, prompts, sets, 5, leads, batch_size=2)
    finally:
        hook.remove()
    full = [len(p.input_ids) + 1 for p in prompts]  # prompt + gold[:-1] (2-token answers)
    assert sorted(s[1] for s in widths if s[1] in full) == sorted(full)
    assert all(s[0] == 1 for s in widths if s[1] in full)  # one row: the shared, unablated pass
