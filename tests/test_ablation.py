"""Ablation: removal is exact, k = 0 changes nothing, the random control never holds a top head."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from retrieval_heads.ablation import (ablate, ablate_map, evaluate, leadins, matched_heads, measure_sequential,
                                     measure_shared, random_heads, removal_mask,
                                     run_ablation, top_heads)
from retrieval_heads.capture import attention_probe
from retrieval_heads.data.prompt import PromptSample
from retrieval_heads.errors import UserError
from retrieval_heads.experiments import build_prompts
from retrieval_heads.generation import answer_prompts, gold_logprob
from retrieval_heads.models import LoadedModel
from retrieval_heads.results import make_record, parse_head


class WordTokenizer:
    """Token i is the word ``t{i}``: enough of a tokenizer for decoding and answer matching on tiny models."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def tiny_lm(family="llama"):
    model = tiny_model(family)
    with torch.no_grad():  # peaky attention, so that heads matter and answers are not all alike
        for name, p in model.named_parameters():
            if "q_proj" in name and name.endswith("weight"):
                p.mul_(20)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return LoadedModel(model, WordTokenizer(), "tiny", "tiny")


def tiny_prompts(n=3, length=32):
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append(PromptSample(ids, 8, 16, 28, "q", f"t{ids[10]} t{ids[11]}"))
    return out


MAKE = dict(method="summed_attention", model_key="tiny", model_name="tiny", question="inc_state", question_prompt="q",
            total_tokens=32, needle_position=0.5, scores=torch.ones(3, 4), samples_processed=4, seed=0, dtype="float32")


def tiny_record(scores):
    return make_record(**{**MAKE, "scores": scores})


def test_removing_one_head_changes_only_its_contribution():
    """Through ablate_map: head L1H2's slice of the o_proj input is zero, every other slice is unchanged."""
    lm = tiny_lm()
    ids = torch.tensor([tiny_prompts(1)[0].input_ids])
    captured = {}
    o_proj = lm.model.model.layers[1].self_attn.o_proj
    hook = o_proj.register_forward_hook(lambda m, inp, out: captured.__setitem__("x", inp[0].clone()))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
            full = captured["x"].view(1, 32, 4, 16)
            with attention_probe(lm.model, None, ablate=ablate_map(["L1H2"])):
                lm.model(input_ids=ids, use_cache=False)
            ablated = captured["x"].view(1, 32, 4, 16)
    finally:
        hook.remove()
    assert ablate_map(["L1H2", "L0H3", "L1H0"]) == {0: [3], 1: [0, 2]}
    assert torch.all(ablated[:, :, 2] == 0) and full[:, :, 2].abs().sum() > 0
    assert torch.equal(ablated[:, :, [0, 1, 3]], full[:, :, [0, 1, 3]])


def test_k0_reproduces_the_unablated_answers_exactly():
    lm = tiny_lm()
    prompts = tiny_prompts()
    plain = answer_prompts(lm, prompts, 4)  # no probe at all
    plain_lp = [gold_logprob(lm.model, lm.tokenizer, p) for p in prompts]
    record = tiny_record(torch.rand(3, 4, generator=torch.Generator().manual_seed(3)))
    report = run_ablation(lm, record, prompts, [0, 2], random_seeds=2, max_new_tokens=4, batch_size=1)
    k0 = report["top"][0]
    assert k0["k"] == 0 and k0["heads"] == []
    assert [s["generated"] for s in k0["samples"]] == [a.text for a in plain]
    assert [s["logprob"] for s in k0["samples"]] == [round(x, 6) for x in plain_lp]
    assert [r["heads"] for r in report["random"] + report["matched"] if r["k"] == 0] == [[], [], [], []]
    k2 = report["top"][1]
    assert k2["heads"] == top_heads(record, 2)
    assert k2["logprob"] != k0["logprob"]  # removing heads does something
    by_hand = evaluate(lm, prompts, k2["heads"], 4)
    assert by_hand == {k: v for k, v in k2.items() if k != "k"}
    row = report["summary"][1]
    for kind in ("matched", "random"):
        lps = sorted(r["logprob"] for r in report[kind] if r["k"] == 2)
        assert (row[f"{kind}_logprob_min"], row[f"{kind}_logprob_median"], row[f"{kind}_logprob_max"]) == \
            (lps[0], pytest.approx((lps[0] + lps[1]) / 2, abs=1e-6), lps[1])


def test_per_row_removal_equals_each_row_alone():
    """The probe's (B, L, H) form: row b removes its own heads, exactly as the {layer: [heads]} form on that row
    alone; an all-False row equals no probe at all."""
    lm = tiny_lm()
    ids = torch.tensor([tiny_prompts(1)[0].input_ids] * 3)  # (3, 32): one prompt, three conditions
    sets = [[], ["L0H1", "L2H3"], ["L1H0", "L1H2", "L2H1"]]
    mask = removal_mask(sets, 3, 4)  # (3, L, H)
    assert mask.sum().item() == 5 and mask[1, 0, 1] and mask[2, 1, 2] and not mask[0].any()
    with torch.no_grad():
        with attention_probe(lm.model, None, ablate=mask):
            rows = lm.model(input_ids=ids, use_cache=False).logits  # (3, 32, V)
        plain = lm.model(input_ids=ids[:1], use_cache=False).logits  # (1, 32, V)
        alone = []
        for heads in sets[1:]:
            with attention_probe(lm.model, None, ablate=ablate_map(heads)):
                alone.append(lm.model(input_ids=ids[:1], use_cache=False).logits)
    torch.testing.assert_close(rows[:1], plain, rtol=0, atol=1e-5)
    for b, ref in enumerate(alone, 1):
        torch.testing.assert_close(rows[b : b + 1], ref, rtol=0, atol=1e-5)
        assert (ref - plain).abs().max() > 1e-3  # the removal does change the output
    with pytest.raises(ValueError, match="boolean"):
        with attention_probe(lm.model, None, ablate=torch.zeros(3, 2, 4, dtype=torch.bool)):
            pass


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_conditions_equal_one_condition_at_a_time(batch_size):
    """Rows of (sample, condition) in batches give the sequential reference's answers and log-probs (float32),
    and the conditions do differ from one another, so the comparison can fail."""
    lm = tiny_lm()
    prompts = tiny_prompts(3) + tiny_prompts(4)[3:]  # 4 samples
    record = tiny_record(torch.rand(3, 4, generator=torch.Generator().manual_seed(5)))
    seq = run_ablation(lm, record, prompts, [0, 2, 5], random_seeds=2, max_new_tokens=5, batch_size=1)
    bat = run_ablation(lm, record, prompts, [0, 2, 5], random_seeds=2, max_new_tokens=5, batch_size=batch_size)
    for a, b in zip(seq["top"] + seq["matched"] + seq["random"], bat["top"] + bat["matched"] + bat["random"],
                    strict=True):
        assert a["heads"] == b["heads"] and a["k"] == b["k"] and a.get("seed") == b.get("seed")
        assert [s["generated"] for s in a["samples"]] == [s["generated"] for s in b["samples"]]
        assert a["n_correct"] == b["n_correct"]
        for x, y in zip(a["samples"], b["samples"]):
            assert abs(x["logprob"] - y["logprob"]) <= 1e-5 and abs(x["leadin_logprob"] - y["leadin_logprob"]) <= 1e-5
    assert len(seq["summary"]) == len(bat["summary"])
    for x, y in zip(seq["summary"], bat["summary"]):  # one flat dict per k (approx takes no nesting)
        assert x == pytest.approx(y, abs=1e-5)
    assert seq["baseline"] == pytest.approx(bat["baseline"], abs=1e-5)
    base = [s["generated"] for s in seq["top"][0]["samples"]]
    changed = [c for c in seq["top"][1:] + seq["random"] if [s["generated"] for s in c["samples"]] != base]
    assert len(changed) >= 3  # removal changes the greedy answers of several conditions
    assert len({c["logprob"] for c in seq["top"] + seq["random"]}) >= 6


def test_random_control_never_draws_a_top_head():
    record = tiny_record(torch.rand(3, 4, generator=torch.Generator().manual_seed(4)))
    names = [r["head"] for r in record["head_rankings"]]
    for k in range(0, 7):
        top = set(top_heads(record, k))
        draws = [random_heads(record, k, seed) for seed in range(5)]
        for d in draws:
            assert len(d) == len(set(d)) == k and not (set(d) & top) and set(d) <= set(names)
        assert draws[0] == random_heads(record, k, 0)  # reproducible
        if 0 < k < 5:
            assert len({tuple(d) for d in draws}) > 1  # seeds differ
    with pytest.raises(UserError, match="outside the top 7"):
        random_heads(record, 7, 0)
    assert [parse_head(h) for h in random_heads(record, 3, 1)] == sorted(parse_head(h) for h in random_heads(record, 3, 1))


@pytest.mark.slow
def test_shared_path_equals_sequential_on_smollm2(smollm2):
    """The real model at 256 tokens: the fast path (lower layers shared, one prefill per row, conditions of a
    sample batched) gives each condition's sequential answers, and gold and lead-in log-probs within 1e-5
    (unrounded; float32); removal changes the answers and the log-probs, so the comparison can fail."""
    scores = torch.rand(30, 9, generator=torch.Generator().manual_seed(0))
    scores[20:, :] += 1  # top heads in the upper layers, as found on real results: layers below are shared
    rec = make_record(method="summed_attention", model_key="smollm2", model_name="m", question="inc_state",
                      question_prompt="q", total_tokens=256, needle_position=0.5, scores=scores, samples_processed=2,
                      seed=0, dtype="float32")
    prompts = [g["inc_state"] for g in build_prompts(smollm2, ["inc_state"], 256, 2, 0.5, 0)]
    sets = [[], top_heads(rec, 10), matched_heads(rec, 10, 0)[0], random_heads(rec, 10, 1)]
    base = answer_prompts(smollm2, prompts, 8)
    leads = leadins(smollm2.tokenizer, prompts, base)
    ref = measure_sequential(smollm2, prompts, sets, 8, leads)
    got = measure_shared(smollm2, prompts, sets, 8, leads, batch_size=3)
    for c in range(len(sets)):
        assert [a.ids for a in got.answers[c]] == [a.ids for a in ref.answers[c]]
        for what in ("logprob", "leadin_logprob"):
            assert max(abs(x - y) for x, y in zip(getattr(got, what)[c], getattr(ref, what)[c])) <= 1e-5
    assert [a.text for a in ref.answers[0]] == [a.text for a in base]
    assert len({tuple(a.text for a in ans) for ans in ref.answers}) >= 2
    assert len({round(x, 3) for lp in ref.logprob for x in lp}) == len(sets) * len(prompts)
    assert any(le.ids for le in leads)  # the model's own lead-in ("The company ...") is used


def test_ablate_checks_everything_before_loading_a_model():
    """The library function refuses bad settings before it loads the model (which here does not exist), naming
    the parameter (the CLI names its flag)."""
    rec = tiny_record(torch.rand(3, 4, generator=torch.Generator().manual_seed(6)))
    for kw, msg in [({"ks": (0, 13)}, "^k 13 is outside 0..12"), ({"ks": (7,)}, "only 5 heads lie outside"),
                    ({"batch_size": 0}, "^batch_size must be positive"), ({"tokens": 0}, "^tokens must be positive"),
                    ({"max_new_tokens": 0}, "^max_new_tokens must be positive"),
                    ({"random_seeds": -1}, "^random_seeds must lie in \\[0, 1000\\], got -1"),
                    ({"controls": ("matched", "x")}, "^controls: unknown control 'x'")]:
        with pytest.raises(UserError, match=msg):
            ablate(rec, model="/no/such/model", **{"ks": (0, 2), **kw})
    with pytest.raises(UserError, match="checksum"):
        ablate({**rec, "total_tokens": 64}, model="/no/such/model", ks=(0, 2))
    foreign = make_record(**{**MAKE, "question": "my_file"})
    with pytest.raises(UserError, match="made from a dataset"):
        ablate(foreign, model="/no/such/model", ks=(0, 2))
    with pytest.raises(UserError, match="does not exist"):  # every check passed: the model is what fails
        ablate(rec, model="/no/such/model", ks=(0, 2))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "retrieval_heads", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_ablate_end_to_end(tmp_path):
    r = run_cli("detect", "--question", "hq_state", "--tokens", "256", "--samples", "1", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = tmp_path / "summed_attention" / "smollm2_hq_state_256.json"
    r = run_cli("ablate", str(result), "--k", "0", "3", "--random-seeds", "2", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    report = json.loads(result.with_name("smollm2_hq_state_256.ablation.json").read_text())
    png = result.with_name("smollm2_hq_state_256.ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["ks"] == [0, 3] and report["samples"] == 1 and report["total_tokens"] == 256
    rec = json.loads(result.read_text())
    assert report["top"][1]["heads"] == rec["top_50_heads"][:3]
    for rnd in report["random"]:
        assert not set(rnd["heads"]) & set(rec["top_50_heads"][: rnd["k"]]) and len(rnd["heads"]) == rnd["k"]
    assert report["top"][0]["logprob"] == report["baseline"]["logprob"]
    assert report["top"][0]["logprob"] < 0


@pytest.mark.parametrize("args,msg", [
    (["--k", "0,x"], "--k: 'x' is not a whole number"),
    (["--k", "300"], "--k 300 is outside 0..270"),
    (["--k", "200"], "only 70 heads lie outside the top 200"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--controls", "matched,foo"], "--controls: unknown control 'foo' (choose from matched, random)"),
])
@pytest.mark.slow
def test_cli_ablate_bad_input(tmp_path, args, msg):
    scores = torch.arange(270, dtype=torch.float32).view(30, 9)
    rec = make_record(method="summed_attention", model_key="smollm2", model_name="m", question="inc_state",
                      question_prompt="q", total_tokens=256, needle_position=0.5, scores=scores, samples_processed=1,
                      seed=0, dtype="float32")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    r = run_cli("ablate", str(path), *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r.ablation.json").exists()
