"""Chance baselines, control spans and span kinds: uniform attention (zero queries) scores lift 1.0 and nothing
is significant; baselines come from the mask the probe applies; the shared prefill measures the same."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from retrieval_heads import chance
from retrieval_heads.capture import allowed_keys, attention_probe
from retrieval_heads.data.prompt import PromptSample
from retrieval_heads.methods.base import needle_mass, span_masses

FAMILIES = ["llama", "mistral", "gemma2", "qwen2", "gpt2"]  # mistral: window 16; gemma2: alternating windows


def zero_queries(model):
    """Zero every query projection (weights and biases): all logits are 0, attention is uniform over the keys
    each row may see."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("q_proj"):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            elif name.endswith("attn.c_attn"):  # GPT-2: q, k, v in one Conv1D (in, 3 * out)
                d = mod.weight.shape[0]
                mod.weight[:, :d].zero_()
                mod.bias[:d].zero_()
    return model


class WordTokenizer:
    """Decodes id i as the word "w{i}": enough for the control-span search (whole words)."""

    def decode(self, ids):
        return " ".join(f"w{int(i)}" for i in ids)


N, CONTEXT = 40, 36  # prompt length and context end; the suffix is the last 4 ids


def prompts(n_samples=8, seed=0, needle=(22, 28)):
    """Synthetic-like prompts from random ids: haystack A [2, 20), separator [20, 22), the needle with four
    facts, haystack B up to CONTEXT. With Mistral's 16-token window the last token sees keys 24..39 only: the
    needle's first two tokens are out of its sight."""
    g = torch.Generator().manual_seed(seed)
    out = []
    a, b = needle
    for i in range(n_samples):
        ids = torch.randint(1, 128, (N,), generator=g).tolist()
        facts = {"inc_state": (a, a + 1), "inc_year": (a + 2, a + 3), "employee_count": (a + 3, a + 5),
                 "hq_state": (a + 5, b)}
        out.append(PromptSample(ids, a, b, CONTEXT, "q?", "x", question_key="hq_state", haystack_start=2,
                                separator_start=20, fact_spans=facts))
    return out


def loaded(model):
    cfg = model.config.get_text_config()
    return SimpleNamespace(model=model, tokenizer=WordTokenizer(), num_layers=cfg.num_hidden_layers,
                           num_heads=cfg.num_attention_heads, device=torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_visible_keys_are_what_the_zero_query_probe_spreads_over(family):
    """allowed_keys is exactly the support of the probe's rows under zero queries, and those rows are uniform
    over it: the baseline counts the very keys the probe lets a row see (windows, causality)."""
    model = zero_queries(tiny_model(family))
    ids = torch.randint(1, 128, (2, N))
    got = {}

    def on_layer(layer, probs):  # (B, H, S, K)
        got.setdefault(layer, {})["probs"] = probs

    def on_visible(layer, allowed):  # (B, 1 or H, S, K)
        got.setdefault(layer, {})["allowed"] = allowed

    positions = torch.tensor([5, 20, N - 1])
    with attention_probe(model, on_layer, query_positions=positions, on_visible=on_visible):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    windowed = False
    for layer, d in got.items():
        probs, allowed = d["probs"], d["allowed"].expand_as(d["probs"])
        assert torch.equal(probs > 0, allowed)
        uniform = allowed.float() / allowed.sum(-1, keepdim=True)
        torch.testing.assert_close(probs, uniform, atol=1e-7, rtol=0)
        windowed |= int(allowed[0, 0, -1].sum()) < N
    assert windowed == (family in ("mistral", "gemma2"))
    # the plain-causal shortcut (no mask tensor) gives the same rows as an explicit causal mask
    q, k = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    assert torch.equal(allowed_keys(q, k, None, torch.tensor([1, 5])), allowed_keys(q, k, causal, torch.tensor([1, 5])))


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_attention_has_lift_one_and_nothing_significant(family):
    model = zero_queries(tiny_model(family))
    ps = prompts()
    masses = chance.probe_prompts(loaded(model), ps, batch_size=4)
    for span in chance.SPANS:
        ss = chance.span_scores(masses, ps, span)
        assert bool(ss.tested.all())
        torch.testing.assert_close(ss.lift, torch.ones_like(ss.lift, dtype=ss.lift.dtype), atol=1e-5, rtol=0)
        torch.testing.assert_close(ss.target_lift, ss.control_lift, atol=1e-5, rtol=0)
        fields = chance.chance_fields(ss)
        assert fields["significance"]["heads"] == [] and fields["significance"]["min_attainable_p"] == 1 / 256
        assert all(abs(x - 1.0) < 1e-5 for row in fields["lift"] for x in row)
        assert fields["verdict"].startswith("no head beats the control on these 8 samples; top lift 1.0x")
    if family == "mistral":  # the window hides part of the needle: the baseline counts visible keys only
        ss = chance.span_scores(masses, ps, "needle")
        torch.testing.assert_close(ss.baseline[0, 0, 0], torch.tensor(4 / 16, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_shared_prefill_measures_the_same_spans(family):
    """The sweep's shared prefill gives each span's mass and baseline as separate full passes do, and the
    needle's mass bit-identical to the needle-only shared pass (tests/reference.py's score_shared)."""
    from retrieval_heads.onepass import score_groups
    from reference import score_shared

    model = tiny_model(family)
    ps = prompts(n_samples=3)
    other = [PromptSample(p.input_ids[:CONTEXT] + [7, 8], p.needle_start, p.needle_end, CONTEXT, "r?", "y",
                          question_key="inc_year", haystack_start=2, separator_start=20, fact_spans=p.fact_spans)
             for p in ps]
    groups = [{"hq_state": p, "inc_year": o} for p, o in zip(ps, other)]
    got = score_groups(loaded(model), groups, ["hq_state", "inc_year"], ["summed_attention"], batch_size=2)
    shared = {q: got[q].masses for q in got}
    needle_only = score_shared(model, groups, ["hq_state", "inc_year"], batch_size=2)
    for q, ref_prompts in (("hq_state", ps), ("inc_year", other)):
        full = chance.probe_prompts(loaded(model), ref_prompts)
        assert set(shared[q].mass) == set(full.mass)
        for name in full.mass:
            torch.testing.assert_close(shared[q].mass[name], full.mass[name], atol=1e-5, rtol=0)
            torch.testing.assert_close(shared[q].baseline[name], full.baseline[name], atol=1e-7, rtol=0)
        assert torch.equal(shared[q].mass["needle"], needle_only[q])


def test_every_span_column_is_needle_mass_of_that_span():
    model = tiny_model("qwen2")
    ps = prompts(n_samples=2)
    ids = torch.tensor([p.input_ids for p in ps])
    spans = [chance.prompt_spans(WordTokenizer(), p) for p in ps]
    names = chance.union_names(spans)
    masks = chance.span_masks(spans, names, N)
    mass, _ = span_masses(model, ids, masks)
    for j in range(len(names)):
        assert torch.equal(mass[..., j], needle_mass(model, ids, masks[:, j]))


def test_control_span_place_and_avoidance():
    p = prompts(n_samples=1)[0]
    tok = WordTokenizer()
    # first place: right after the needle
    assert chance.control_span(tok, p, 6, []) == (28, 34)
    # a fact's text in that run pushes it on by n tokens, then before the needle
    word = f"w{p.input_ids[30]}"
    # ((34, 40) would run into the suffix), so the first clean run before the separator at 20, stepping back
    before = [(14, 20), (8, 14), (2, 8)]
    want = next(r for r in before if word not in tok.decode(p.input_ids[r[0] : r[1]]).split())
    assert chance.control_span(tok, p, 6, [word]) == want
    # too long for either side: no control; the sample is left out of the test
    assert chance.control_span(tok, p, 19, []) is None


def test_fact_score_is_asked_minus_mean_of_others():
    model = tiny_model("llama")
    ps = prompts(n_samples=2)
    masses = chance.probe_prompts(loaded(model), ps)
    ss = chance.span_scores(masses, ps, "fact")
    m = masses.mass
    want = m["fact:hq_state"].double() - (m["fact:inc_state"] + m["fact:inc_year"] + m["fact:employee_count"]).double() / 3
    torch.testing.assert_close(ss.score, want, atol=1e-7, rtol=0)
    ans = chance.span_scores(masses, ps, "answer")
    assert torch.equal(ans.score, m["fact:hq_state"].double())  # synthetic: the answer is the asked fact's span


def test_span_names_and_result_names():
    assert chance.span_names(["needle,answer", "fact", "answer"]) == ["needle", "answer", "fact"]
    assert chance.span_result_name("summed_attention", "needle") == "summed_attention"
    assert chance.span_result_name("summed_attention_success", "answer") == "summed_attention_success+answer"


def test_rank_by_lift_orders_the_record():
    from retrieval_heads.results import make_record, validate

    kw = dict(method="m", model_key="k", model_name="n", question="q", question_prompt="p", total_tokens=10,
              needle_position=0.5, scores=torch.tensor([[0.3, 0.2], [0.1, 0.0]]), samples_processed=1, seed=0,
              dtype="float32")
    added = {"lift": [[1.0, 4.0], [2.0, 0.0]]}
    by_score = make_record(**kw, added=added)
    by_lift = make_record(**kw, added=added, rank_by="lift")
    assert [r["head"] for r in by_score["head_rankings"]] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert [(r["head"], r["score"], r["lift"]) for r in by_lift["head_rankings"]] == \
        [("L0H1", 0.2, 4.0), ("L1H0", 0.1, 2.0), ("L0H0", 0.3, 1.0), ("L1H1", 0.0, 0.0)]
    assert by_lift["rank_by"] == "lift" and by_lift["top_50_heads"][0] == "L0H1"
    validate(by_lift)
    plain = make_record(**kw)
    assert "rank_by" not in plain and "lift" not in plain["head_rankings"][0]


@pytest.mark.slow  # runs the CLI in a subprocess
@pytest.mark.parametrize("args, message", [
    (["--span", "fact", "--dataset", "DATA"], "error: --span fact needs the synthetic samples"),
    (["--span", "words"], "error: unknown span 'words'; choose from: needle, answer, fact"),
    (["--rank-by", "height"], "error: unknown --rank-by 'height'; choose from: score, lift"),
    (["--alpha", "1.5"], "error: --alpha must lie in (0, 1), got 1.5"),
])
def test_cli_bad_span_options_one_line_exit_2(tmp_path, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"needle": "n in Ohio", "haystack": "h", "question": "q", "answer": "Ohio"}\n')
    args = [str(data) if a == "DATA" else a for a in args]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "retrieval_heads", "detect", "--output-dir", str(out), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith(message) and not out.exists()


@pytest.mark.slow
def test_detect_spans_on_smollm2(smollm2, tmp_path):
    """Every span kind from one pass per sample, each under its own name; lift = score / baseline; the
    default result is the core fields plus the added ones."""
    from retrieval_heads import detect

    res = detect(smollm2, question="hq_state", tokens=384, samples=2, span="needle,answer,fact", output_dir=tmp_path,
                 save_samples=True)
    assert list(res) == ["summed_attention", "summed_attention+answer", "summed_attention+fact"]
    for name, r in res.items():
        rec = r.record
        assert (tmp_path / name / "smollm2_hq_state_384.json").exists() and rec["method"] == name
        for key in ("baseline", "lift", "control_scores", "significance", "verdict", "span", "rank_by"):
            assert key in rec
        s = torch.tensor(rec["scores"], dtype=torch.float64)
        b = torch.tensor(rec["baseline"], dtype=torch.float64)
        if rec["span"] != "fact":
            want = torch.where(b > 0, s / b, torch.zeros_like(s))
            torch.testing.assert_close(torch.tensor(rec["lift"], dtype=torch.float64), want, atol=1e-3, rtol=1e-3)
        assert rec["significance"]["note"].startswith("too few samples: with 2 sample(s)")
        assert rec["verdict"].startswith("no head beats the control on these 2 samples (too few samples")
    needle = res["summed_attention"]
    plain = detect(smollm2, question="hq_state", tokens=384, samples=2, method="query_focused,summed_attention")
    # with another method, summed_attention comes from the shared prefill: equal within float rounding
    torch.testing.assert_close(plain["summed_attention"].sample_scores, needle.sample_scores, atol=1e-6, rtol=0)
    assert "lift" not in plain["query_focused"].record
