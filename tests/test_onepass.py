"""Every method, span and answer from one context pass per sample equals each method's own passes (float32,
1e-5; answers and argmax keys identical), on the tiny families and on SmolLM2; and a sweep of several methods."""

import json

import pytest
import torch
from conftest import FAMILIES, save_tiny, tiny_config

import retrieval_heads.prefill as prefill
from retrieval_heads.chance import probe_prompts
from retrieval_heads.data.prompt import PromptFormat
from retrieval_heads.data.questions import QUESTIONS
from retrieval_heads.data.samples import synthetic_samples
from retrieval_heads.experiments import detect, score_prompts
from retrieval_heads.generation import answer_prompts
from retrieval_heads.models import LoadedModel
from retrieval_heads.methods import METHODS
from retrieval_heads.onepass import measure_spans, score_groups
from retrieval_heads.results import load_result, result_path
from retrieval_heads.sweep import make_grid, run_sweep

ALL = list(METHODS)  # every registered method
QS = list(QUESTIONS)


def family_lm(family: str, tokenizer) -> LoadedModel:
    """A tiny random model of ``family`` that reads SmolLM2's tokenizer (real prompts, real suffixes)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.vocab_size = len(tokenizer)
    for k in ("max_position_embeddings", "n_positions"):
        if hasattr(cfg, k):
            setattr(cfg, k, 1024)
    torch.manual_seed(0)
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), tokenizer, family, family)


def check_equal(lm, groups, got, questions, max_new_tokens, methods=ALL):
    """Each question's shared numbers against the plain paths: spans and baselines (summed_attention's full
    pass), answers and argmax (greedy decoding of the whole prompt), each other method's score_batch."""
    for q in questions:
        prompts = [g[q] for g in groups]
        for m in (m for m in methods if METHODS.get(m).measures_spans):
            ref = probe_prompts(lm, prompts) if m == "summed_attention" else measure_spans(lm, METHODS.get(m), prompts)
            mine = got[q].span_masses[m]
            assert set(mine.mass) == set(ref.mass)
            for n in ref.mass:
                torch.testing.assert_close(mine.mass[n], ref.mass[n], atol=1e-5, rtol=0)
                torch.testing.assert_close(mine.baseline[n], ref.baseline[n], atol=1e-7, rtol=0)
        answers = answer_prompts(lm, prompts, max_new_tokens, track_argmax=True)
        assert [a.ids for a in got[q].answers] == [a.ids for a in answers]
        for a, b in zip(got[q].answers, answers):
            assert torch.equal(a.argmax, b.argmax) and a.correct == b.correct
        for m in methods:
            if not METHODS.get(m).measures_spans:
                torch.testing.assert_close(got[q].scores[m], score_prompts(lm, m, prompts, answers=answers),
                                           atol=1e-5, rtol=0)


# llama in the fast loop; the other families in the full suite
@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_every_method_from_one_prefill_on_tiny_families(family, smollm2_tokenizer):
    """Three questions x four methods x every span, answers tracked, 3 samples in batches of 2 and 1. On this
    tokenizer two suffixes have 25 tokens (decoded together) and one 26 (padded in the reads pass)."""
    lm = family_lm(family, smollm2_tokenizer)
    qs = ["inc_state", "employee_count", "hq_state"]
    groups = synthetic_samples(PromptFormat(smollm2_tokenizer), qs, 300, 3, 0.5, 0)
    got = score_groups(lm, groups, qs, ALL, answers=True, max_new_tokens=2, batch_size=2)
    check_equal(lm, groups, got, qs, 2)
    if family != "mistral":  # its window (16) hides the needle from every suffix row (next test)
        assert max(float(got[q].scores["query_focused"].abs().max()) for q in qs) > 1e-4  # not all zero
        assert max(float(got[q].scores["qrhead"].abs().max()) for q in qs) > 1e-4


def test_sliding_window_reads_of_qrhead_and_summed(smollm2_tokenizer):
    """Mistral's window (16) ends far after the needle: through the cache, as in a full pass, neither the
    last token nor the query rows see it (0), and the control spans near the question are seen."""
    lm = family_lm("mistral", smollm2_tokenizer)
    groups = synthetic_samples(PromptFormat(smollm2_tokenizer), ["hq_state"], 300, 2, 0.5, 0)
    got = score_groups(lm, groups, ["hq_state"], ["summed_attention", "qrhead"])["hq_state"]
    assert float(got.masses.mass["needle"].abs().max()) == 0.0
    assert float(got.scores["qrhead"].abs().max()) == 0.0


def test_fallback_without_a_plain_cache_gives_the_same(monkeypatch, smollm2_tokenizer):
    lm = family_lm("llama", smollm2_tokenizer)
    groups = synthetic_samples(PromptFormat(smollm2_tokenizer), ["inc_year"], 300, 2, 0.5, 0)
    shared = score_groups(lm, groups, ["inc_year"], ALL, answers=True, max_new_tokens=3)["inc_year"]
    monkeypatch.setattr(prefill, "_new_cache", lambda model: None)
    plain = score_groups(lm, groups, ["inc_year"], ALL, answers=True, max_new_tokens=3)["inc_year"]
    for m in ("query_focused", "qrhead", "retrieval_score"):
        torch.testing.assert_close(shared.scores[m], plain.scores[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.masses.mass["needle"], plain.masses.mass["needle"], atol=1e-5, rtol=0)
    assert [a.ids for a in shared.answers] == [a.ids for a in plain.answers]


def test_one_context_pass_per_batch(smollm2_tokenizer):
    """Two questions x four methods, 3 samples in batches of 2: two context passes, two suffix passes, and
    the decoding steps; no other full pass."""
    lm = family_lm("llama", smollm2_tokenizer)
    groups = synthetic_samples(PromptFormat(smollm2_tokenizer), QS[:2], 300, 3, 0.5, 0)
    lengths = []
    lm.model.register_forward_pre_hook(lambda mod, args, kw: lengths.append(int(kw["input_ids"].shape[1])),
                                       with_kwargs=True)
    score_groups(lm, groups, QS[:2], ALL, answers=True, max_new_tokens=2, batch_size=2)
    context = groups[0][QS[0]].context_end
    assert lengths.count(context) == 2  # one context pass per batch
    assert all(n < 40 for n in lengths if n != context)  # everything else: suffixes and answer tokens


@pytest.mark.slow
def test_detect_of_several_methods_shares_the_prefill(smollm2_tokenizer):
    """detect's default path for several methods equals its separate passes (one_prefill=False)."""
    lm = family_lm("qwen2", smollm2_tokenizer)
    kw = dict(question="employee_count", tokens=300, samples=2, method=ALL, answers=True, max_new_tokens=3,
              span="needle,fact")
    a, b = detect(lm, **kw), detect(lm, one_prefill=False, **kw)
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name].sample_scores, b[name].sample_scores, atol=1e-5, rtol=0)
        assert a[name].record["extra"] == b[name].record["extra"]
    assert a["summed_attention+fact"].record["verdict"] == b["summed_attention+fact"].record["verdict"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from retrieval_heads.models import load_model

    d = save_tiny(tmp_path_factory.mktemp("models") / "tiny")
    return d, load_model(str(d))


@pytest.mark.slow
def test_a_sweep_of_several_methods(tiny, tmp_path):
    """One sweep of 2 questions x 3 methods writes every method's results, each equal to detect's for that
    method and question; deleting one file recomputes that one only."""
    d, lm = tiny
    out = tmp_path / "out"
    grid = make_grid(models=[str(d)], questions=["inc_state", "hq_state"], tokens=[260], samples=2,
                     method="summed_attention,query_focused,retrieval_score")
    assert grid.methods == ("summed_attention", "query_focused", "retrieval_score") and grid.size == 6
    lines: list[str] = []
    s = run_sweep(grid, out, load=lambda m, **k: lm, progress=False, echo=lines.append, check_models=False)
    assert len(s.done) == 6 and "x 3 results = 6 experiments" in lines[0]
    for m in grid.methods:
        for q in grid.questions:
            path = result_path(out, m, lm.key, q, 260)
            rec = load_result(path)
            ref = detect(lm, question=q, tokens=260, samples=2, method=m, answers=True).result  # answers: as
            # retrieval_score's decoding gives every result of the unit its accuracy
            got = torch.tensor(json.loads(path.read_text())["scores"])
            torch.testing.assert_close(got, ref.scores, atol=1e-5, rtol=0)
            assert rec["extra"].keys() == ref.record["extra"].keys()
    gone = result_path(out, "query_focused", lm.key, "hq_state", 260)
    gone.unlink()
    s = run_sweep(grid, out, load=lambda m, **k: lm, progress=False, echo=lines.append, check_models=False)
    assert s.done == [gone] and len(s.skipped) == 5


def test_a_grid_file_may_list_methods(tmp_path):
    g = make_grid(models=["smollm2"], method=["qrhead", "summed_attention", "qrhead"])
    assert g.method == "qrhead,summed_attention" and g.size == 2 * 4 * 4
    from retrieval_heads.errors import UserError

    with pytest.raises(UserError, match="unknown method"):
        make_grid(models=["smollm2"], method="summed_attention,nope")


def test_every_method_from_one_prefill_on_smollm2(smollm2):
    """The embedded model at 256 tokens, where it answers some questions right: retrieval_score counts real
    copies, and every method equals its own passes."""
    qs = ["inc_state"]  # the question it answers best at 256 tokens (bench/results/accuracy.md)
    groups = synthetic_samples(PromptFormat(smollm2.tokenizer), qs, 256, 3, 0.5, 0)
    got = score_groups(smollm2, groups, qs, ALL, answers=True, max_new_tokens=12, batch_size=3)
    check_equal(smollm2, groups, got, qs, 12)
    assert sum(a.correct for a in got["inc_state"].answers) >= 2
    assert float(got["inc_state"].scores["retrieval_score"].max()) > 0


def test_the_context_cache_keeps_no_autograd_graph(smollm2_tokenizer):
    """Called with autograd on, the cache holds plain tensors (a graph kept alive by the cache costs the
    activations of the whole context pass)."""
    lm = family_lm("llama", smollm2_tokenizer)
    ids = torch.randint(0, 1000, (1, 40))
    cache = prefill.context_cache(lm.model, ids)
    assert all(not (layer.keys.requires_grad or layer.values.requires_grad) for layer in cache.layers)
    assert cache.get_seq_length() == 40


@pytest.mark.slow
def test_a_sweep_of_span_kinds(tiny, tmp_path):
    """--span needle,answer,fact in a sweep: one result per kind (summed_attention, +answer, +fact), each as
    detect makes it (scores, lift, verdict), from the unit's one context pass per sample; a rerun skips all."""
    d, lm = tiny
    out = tmp_path / "out"
    grid = make_grid(models=[str(d)], questions=["inc_year"], tokens=[260], samples=2, span=["needle", "answer", "fact"],
                     method="summed_attention,qrhead")
    assert grid.results == ("summed_attention", "summed_attention+answer", "summed_attention+fact", "qrhead")
    s = run_sweep(grid, out, load=lambda m, **k: lm, progress=False, echo=lambda s: None, check_models=False)
    assert len(s.done) == 4
    ref = detect(lm, question="inc_year", tokens=260, samples=2, span="needle,answer,fact", method="summed_attention,qrhead")
    for name in grid.results:
        rec = load_result(result_path(out, name, lm.key, "inc_year", 260))
        assert rec["method"] == name
        torch.testing.assert_close(torch.tensor(rec["scores"]), ref[name].scores, atol=1e-5, rtol=0)
        if name != "qrhead":
            assert rec["verdict"] == ref[name].record["verdict"] and rec["span"] == ref[name].record["span"]
            torch.testing.assert_close(torch.tensor(rec["lift"]), torch.tensor(ref[name].record["lift"]), atol=1e-4,
                                       rtol=1e-4)
    s = run_sweep(grid, out, load=lambda m, **k: lm, progress=False, echo=lambda s: None, check_models=False)
    assert s.done == [] and len(s.skipped) == 4
    from retrieval_heads.errors import UserError

    with pytest.raises(UserError, match="unknown span"):
        make_grid(models=["smollm2"], span="needle,nope")
