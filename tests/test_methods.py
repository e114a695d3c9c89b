"""The methods beyond the seed's: each fast path against a slow reference; several methods on one experiment."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config, tiny_model
from retrieval_heads import experiments
from retrieval_heads.data.prompt import PromptFormat, PromptSample
from retrieval_heads.data.samples import synthetic_samples
from retrieval_heads.data.questions import answer_matches
from retrieval_heads.generation import DEFAULT_MAX_NEW_TOKENS, greedy_decode, stop_rule
from retrieval_heads.methods import METHODS, MethodContext
from retrieval_heads.methods.qrhead import filtered_sum
from reference import query_focused_scores as qf_reference, reference_argmax
from retrieval_heads.methods.query_focused import question_mass
from retrieval_heads.data.spans import whole_word_spans
from retrieval_heads.data.spans import gold_span
from retrieval_heads.methods.retrieval_score import retrieval_hits
from retrieval_heads.results import load_result

# one method of each kind: span-measuring, calibrated, answers-only (their behaviours are tested by name below)
MIXED = "summed_attention,query_focused,retrieval_score"


def never(ids, tok):
    return False


def peaky(family):
    """A tiny model whose attention rows have clear maxima (random init gives near-uniform rows, whose argmax
    would hang on rounding)."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name and name.endswith("weight"):
                p.mul_(40)
    return model


# --- decoding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_follows_the_contract(name):
    """What each registered method declares, on the one base type: its needs are MethodContext fields, a
    method read from a shared pass says which rows it reads, and its result names follow from its span kinds."""
    from retrieval_heads.methods.base import CONTEXT_FIELDS, SPAN_KINDS, Method

    m = METHODS.get(name)
    assert isinstance(m, Method) and m.name == name
    assert isinstance(m.needs, frozenset) and m.needs <= CONTEXT_FIELDS
    assert CONTEXT_FIELDS == {"tokenizer", "prompt_format", "answers"}
    if m.shared:  # its shared-pass reader is its own, not the base's
        assert type(m).from_reads is not Method.from_reads
    if m.reads_null or m.reads_needle_keys or m.measures_spans:  # these read rows of a shared pass
        assert m.shared and type(m).row_span is not Method.row_span
    spans = list(SPAN_KINDS)
    assert m.result_spans(spans) == (tuple(spans) if m.measures_spans else ("needle",))
    names = m.result_names(spans, success_only=True)
    first = name if m.success_only else f"{name}_success"
    assert names[0] == first and names[1:] == [f"{first}+{sp}" for sp in m.result_spans(spans)[1:]]
    assert m.result_names() == [name]


def test_every_module_of_the_methods_folder_registers_its_method():
    """A new file in methods/ is all it takes: the package imports every module but base, each registering."""
    import pkgutil

    import retrieval_heads.methods as pkg

    modules = {i.name for i in pkgutil.iter_modules(pkg.__path__)} - {"base"}
    assert {type(METHODS.get(n)).__module__.rpartition(".")[2] for n in METHODS} == modules
    assert list(METHODS)[:4] == list(pkg.BUILT_IN)  # the built-in ones first, in their documented order


def test_the_contract_s_declarations_of_the_built_in_methods():
    """The built-in methods as documented in docs/methods.md (a method added later is not listed here: the
    test above covers it)."""
    get = METHODS.get
    assert get("summed_attention").measures_spans and get("summed_attention").needs == frozenset()
    assert get("retrieval_score").success_only and get("retrieval_score").needs == {"answers", "tokenizer"}
    assert get("query_focused").reads_null and not get("query_focused").reads_needle_keys
    assert get("qrhead").reads_null and get("qrhead").reads_needle_keys


def test_register_refuses_collisions_and_strays():
    from retrieval_heads.methods import register
    from retrieval_heads.methods.base import Method

    class Again(Method):
        name = "summed_attention"

        def score_batch(self, model, batch, ctx=None):
            return torch.zeros(len(batch), 1, 1)

    class Greedy(Again):
        name = "greedy_needs"
        needs = frozenset({"weights"})

    with pytest.raises(ValueError, match="already registered"):
        register(Again())
    with pytest.raises(ValueError, match="needs must be a frozenset"):
        register(Greedy())
    with pytest.raises(TypeError, match="not a Method"):
        register(object())
    assert "greedy_needs" not in METHODS


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS.get(n).needs])
def test_a_method_without_its_context_says_what_is_missing(name):
    p = PromptSample(input_ids=[1, 2, 3, 4], needle_start=1, needle_end=2, context_end=3, question="q", answer="x")
    missing = ", ".join(sorted(METHODS.get(name).needs))
    with pytest.raises(ValueError, match=f"needs {missing} in its MethodContext"):
        METHODS.get(name).score_batch(tiny_model("llama"), [p])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mistral"])
def test_decoding_argmax_equals_eager_reference(family):
    """The probe's per-step argmax over the KV cache equals eager attention, step by step, full rows."""
    model = peaky(family)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    answers, tracks = greedy_decode(model, ids, 6, never, track_argmax=True)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)[:, 40:]  # stops (and pads) after an EOS
    for b in range(2):
        n = next((i + 1 for i, t in enumerate(ref[b].tolist()) if t == model.config.eos_token_id), 6)
        assert answers[b][:n] == ref[b, :n].tolist()  # the loop is greedy decoding
        expect = reference_argmax(model, ids[b].tolist(), answers[b])
        assert tracks[b].shape == expect.shape == (6, 3, 4)
        assert torch.equal(tracks[b], expect), f"{family} sample {b}"


def test_retrieval_hits_by_hand():
    prompt = torch.tensor([5, 6, 7, 8, 9, 7])  # gold span = positions 1..3 (ids 6, 7, 8)
    argmax = torch.tensor([  # (T=4, L=1, H=3)
        [[2, 5, 0]],  # token 7: head 0 at pos 2 (id 7, in span) copies; head 1 at pos 5 (id 7, outside) no
        [[3, 3, 0]],  # token 8: heads 0, 1 at pos 3 (id 8) copy; head 2 at pos 0 no
        [[7, 1, 1]],  # token 6: head 0 at a generated position (7) no; heads 1, 2 at pos 1 (id 6) copy
        [[2, 4, 2]],  # token 7: head 0 at pos 2 again (counted once); head 1 at pos 4 (id 9) no; head 2 copies
    ])
    hits = retrieval_hits(prompt, (1, 4), [7, 8, 6, 7], argmax)
    assert hits.tolist() == [[2, 2, 2]]
    assert retrieval_hits(prompt, (1, 4), [7, 8, 6], argmax).tolist() == [[2, 2, 1]]
    assert retrieval_hits(prompt, (1, 4), [], argmax).tolist() == [[0, 0, 0]]


# --- the gold span: whole words ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2's tokenizer alone (byte-level BPE whose tokens carry their leading space), loaded offline."""
    from transformers import AutoTokenizer

    from retrieval_heads.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


class PieceTok:
    """A SentencePiece-like tokenizer: pieces mark a leading space with "▁", decoding drops the text's first
    space; words are split into pieces that do not follow word boundaries ("▁Ar", "kansas")."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **kw):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def needle_prompt(ids, answer, before=(1, 2), after=(3,)):
    """A prompt with ``ids`` as its needle between a few filler ids."""
    full = list(before) + list(ids) + list(after)
    return PromptSample(full, len(before), len(before) + len(ids), len(full), "q", answer)


def test_whole_word_spans_by_hand():
    text = "Arkansas and West Virginia; Kansas, then Virginia. 12,400,000 or 112,400 or 12,400 staff in 19905, 1990."
    assert whole_word_spans(text, "Kansas") == [(28, 34)]  # not inside "Arkansas"
    assert whole_word_spans(text, "kansas") == [(28, 34)]  # case-insensitive
    assert whole_word_spans(text, "Virginia") == [(41, 49)]  # not inside "West Virginia"
    assert whole_word_spans(text, "West Virginia") == [(13, 26)]
    assert whole_word_spans(text, "12,400") == [(76, 82)]  # not inside 12,400,000 nor 112,400
    assert whole_word_spans(text, "1990") == [(99, 103)]  # not inside 19905
    assert whole_word_spans("in West\nVirginia", "Virginia") == []  # the longer name across a line break
    assert whole_word_spans(text, "Arkansas and") == [(0, 12)]
    assert whole_word_spans(text, "  ") == [] and whole_word_spans(text, "Ohio") == []


@pytest.mark.parametrize("answer, text, expect", [
    ("Kansas", "Formed in Arkansas; incorporated in| Kansas|.", " Kansas"),
    ("Virginia", "Offices in West Virginia, incorporated in| Virginia| in 1990.", " Virginia"),
    ("West Virginia", "Offices in| West Virginia|, incorporated in Virginia in 1990.", " West Virginia"),
    ("Kansas", "|Kansas| law governs; the company is in Arkansas.", "Kansas"),
    ("12,400", "Revenue 112,400; it employs |12,400| people.", "12,400"),  # digits split, space apart
])
def test_gold_span_matches_whole_words(smol_tok, answer, text, expect):
    """The span is exactly the tokens between the bars (where the text is cut into segments), leading space
    included."""
    parts = text.split("|")
    ids = [t for part in parts for t in smol_tok(part, add_special_tokens=False)["input_ids"]]
    at = len(smol_tok(parts[0], add_special_tokens=False)["input_ids"])
    n = len(smol_tok(parts[1], add_special_tokens=False)["input_ids"])
    p = needle_prompt(ids, answer)
    assert gold_span(smol_tok, p) == (2 + at, 2 + at + n)
    assert smol_tok.decode(p.input_ids[2 + at : 2 + at + n]) == expect


@pytest.mark.parametrize("answer, text", [
    ("Kansas", "The company was incorporated in Arkansas."),
    ("Virginia", "Headquarters: West Virginia; incorporated in West Virginia."),
    ("1990", "Founded in 19905 BC."),
    ("Atlantis", "Nothing here."),
])
def test_gold_span_is_empty_when_the_answer_is_only_inside_longer_words(smol_tok, answer, text):
    ids = smol_tok(text, add_special_tokens=False)["input_ids"]
    assert gold_span(smol_tok, needle_prompt(ids, answer)) is None


def test_gold_span_maps_word_pieces_exactly():
    """Pieces that split words ("▁Ar" "kansas") and carry the leading space: the span is exactly the pieces
    that spell the whole-word answer."""
    pieces = ["▁in", "▁Ar", "kansas", "▁and", "▁Kan", "sas", ".", "▁West", "▁Virginia", "▁or", "▁Virginia"]
    tok = PieceTok(pieces)
    ids = list(range(len(pieces)))
    assert gold_span(tok, needle_prompt(ids, "Kansas", before=(), after=())) == (4, 6)
    assert gold_span(tok, needle_prompt(ids, "Virginia", before=(), after=())) == (10, 11)
    assert gold_span(tok, needle_prompt(ids, "West Virginia", before=(), after=())) == (7, 9)
    assert gold_span(tok, needle_prompt(ids[:7], "Kansas", before=(), after=())) == (4, 6)
    assert gold_span(tok, needle_prompt(ids[:4], "Kansas", before=(), after=())) is None  # only in "Arkansas"


def test_retrieval_score_is_zero_without_a_whole_word_gold_span(smol_tok):
    """A correctly answered sample whose needle holds "Kansas" only inside "Arkansas" scores 0 everywhere
    (before the whole-word match, heads copying " Arkansas" scored on it)."""
    from retrieval_heads.generation import Answer

    ids = smol_tok("Incorporated in Arkansas.", add_special_tokens=False)["input_ids"]
    p = needle_prompt(ids, "Kansas")
    ark = ids.index(smol_tok(" Arkansas", add_special_tokens=False)["input_ids"][0])
    argmax = torch.full((1, 2, 3), 2 + ark)  # every head attends the " Arkansas" token
    a = Answer("Kansas", [p.input_ids[2 + ark]], True, argmax)
    scores = METHODS.get("retrieval_score").score_batch(tiny_model("llama"), [p], MethodContext(tokenizer=smol_tok, answers=[a]))
    assert scores.shape == (1, 2, 3) and scores.abs().sum() == 0


# --- query focused on tiny models --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_question_mass_equals_reference(family):
    from reference import reference_rows

    model = tiny_model(family)
    g = torch.Generator().manual_seed(8)
    batch = [PromptSample(torch.randint(0, 128, (48,), generator=g).tolist(), 10, 20, 40, "q", "a",
                          question_start=s, question_end=e) for s, e in [(41, 45), (42, 47)]]
    fast = question_mass(model, batch)  # (B, L, H)
    for i, p in enumerate(batch):
        rows = reference_rows(model, torch.tensor([p.input_ids]), torch.arange(p.question_start, p.question_end))
        ref = torch.stack([r[0, :, :, 10:20].sum(-1).mean(-1) for r in rows])  # (L, H)
        assert torch.allclose(fast[i], ref, atol=1e-5)


# --- qrhead: QRHead's recipe against a plain reference ------------------------------------------------------

class CharTok:
    """A tokenizer without a chat template: one id per character (mod 128), for tiny random models."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        enc = lambda t: [ord(c) % 128 for c in t]  # noqa: E731
        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}

    def decode(self, ids, **kw):
        return "".join(chr(i) for i in ids)


def ends_at_assistant(tokenizer, ids) -> int:
    """The length of the shortest prefix of ``ids`` whose text ends with "assistant" (QRHead's query end)."""
    return next(i for i in range(len(ids), 0, -1) if not tokenizer.decode(ids[:i]).endswith("assistant\n")
                and tokenizer.decode(ids[:i]).endswith("assistant"))


def qrhead_reference(model, tokenizer, p: PromptSample, drop_outliers: bool = True, exact: bool = False) -> torch.Tensor:
    """QRHead's recipe written out plainly, one prompt at a time: eager attention with output_attentions (full
    N x N matrices); query rows = the suffix after its blank line ("\n\n"), to the last token (``exact``: to
    the token that ends "assistant", as QRHead's query); the same with
    the question replaced by "N/A" in the suffix's text; per needle token the difference of the mean rows;
    per head, drop tokens at or below mean - 2 std (torch's std) and sum the rest. (L, H)."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(p.input_ids[p.context_end :])
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == p.input_ids[p.context_end :]
    null_ids = p.input_ids[: p.context_end] + tokenizer(text.replace(p.question, "N/A"),
                                                        add_special_tokens=False)["input_ids"]

    def mean_rows(ids):
        start = p.context_end + (len(sep) if ids[p.context_end : p.context_end + len(sep)] == sep else 0)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
        finally:
            model.set_attn_implementation(previous)
        end = ends_at_assistant(tokenizer, ids) if exact else len(ids)
        return [a[0, :, start:end, :].float().mean(1) for a in out.attentions]  # L x (H, N)

    real, null = mean_rows(p.input_ids), mean_rows(null_ids)
    scores = torch.zeros(len(real), real[0].shape[0])
    for layer in range(len(real)):
        for head in range(real[0].shape[0]):
            c = real[layer][head, p.needle_start : p.needle_end] - null[layer][head, p.needle_start : p.needle_end]
            scores[layer, head] = c[c > c.mean() - 2 * c.std()].sum() if drop_outliers else c.sum()
    return scores


def test_filtered_sum_by_hand():
    c = torch.tensor([1.0] * 9 + [-5.0, 7.0])  # the last one is padding
    valid = torch.tensor([[True] * 10 + [False]])
    # mean 0.4, std sqrt(32.4 / 9) = 1.897, threshold -3.395: -5 is dropped, the nine 1s kept
    assert filtered_sum(c[None, None, None, :], valid).item() == pytest.approx(9.0)
    c2 = torch.tensor([0.2, 0.1, 0.0, 0.3])  # mean 0.15, std 0.129: threshold -0.108, nothing dropped
    assert filtered_sum(c2[None, None, None, :], torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(0.6)
    assert filtered_sum(torch.tensor([[[[0.5, 1.0]]]]), torch.tensor([[True, False]])).item() == 0  # one token: NaN std


def tiny_qr_batch():
    """Two prompts of one length with different contexts, questions, needle positions and lengths."""
    tok = CharTok()
    g = torch.Generator().manual_seed(3)
    batch = []
    for question, needle in [("Where is it?", (12, 30)), ("Where was it made?", (20, 29))]:
        suffix = tok("\n\nQuestion: " + question + "\nAnswer:")["input_ids"]
        ctx = torch.randint(0, 128, (80 - len(suffix),), generator=g).tolist()
        batch.append(PromptSample(ctx + suffix, needle[0], needle[1], len(ctx), question, "a"))
    return tok, batch


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_qrhead_equals_plain_reference(family):
    model = tiny_model(family)
    tok, batch = tiny_qr_batch()
    fast = METHODS.get("qrhead").score_batch(model, batch, MethodContext(prompt_format=PromptFormat(tok)))  # (B, L, H)
    assert fast.shape == (2, 3, 4)
    for i, p in enumerate(batch):
        assert torch.allclose(fast[i], qrhead_reference(model, tok, p), atol=1e-5), f"{family} sample {i}"


def test_qrhead_exact_ends_its_query_at_assistant(smol_tok):
    """On a chat template, qrhead_exact's query rows stop after "assistant" (the "\\n" after it dropped) and
    equal the plain reference, by score_batch and by the shared pass; qrhead keeps the "\\n" row and differs.
    Without a chat template the two are one method."""
    from transformers import AutoModelForCausalLM

    from retrieval_heads.methods.qrhead import query_end, query_start
    from retrieval_heads.models import LoadedModel
    from retrieval_heads.onepass import score_groups

    fmt = PromptFormat(smol_tok)
    groups = synthetic_samples(fmt, ["hq_state"], 260, 2, 0.5, 0)
    batch = [g["hq_state"] for g in groups]
    for p in batch:
        end = query_end(fmt, p)
        assert end == len(p.input_ids) - 1 == ends_at_assistant(smol_tok, p.input_ids)
        assert smol_tok.decode(p.input_ids[end:]) == "\n" and query_start(fmt, p) < end
    cfg = tiny_config("llama")
    cfg.vocab_size = len(smol_tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ctx = MethodContext(prompt_format=fmt)
    exact = METHODS.get("qrhead_exact").score_batch(model, batch, ctx)  # (B, L, H)
    plain = METHODS.get("qrhead").score_batch(model, batch, ctx)  # (B, L, H)
    for i, p in enumerate(batch):
        torch.testing.assert_close(exact[i], qrhead_reference(model, smol_tok, p, exact=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(plain[i], qrhead_reference(model, smol_tok, p), atol=1e-5, rtol=0)
    assert (exact - plain).abs().max() > 1e-5
    shared = score_groups(LoadedModel(model, smol_tok, "llama", "llama"), groups, ["hq_state"],
                          ["qrhead", "qrhead_exact"])["hq_state"].scores
    torch.testing.assert_close(shared["qrhead_exact"], exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared["qrhead"], plain, atol=1e-5, rtol=0)
    tok, plain_batch = tiny_qr_batch()  # no chat template: nothing to drop
    no_chat = MethodContext(prompt_format=PromptFormat(tok))
    m = tiny_model("llama")
    assert torch.equal(METHODS.get("qrhead_exact").score_batch(m, plain_batch, no_chat),
                       METHODS.get("qrhead").score_batch(m, plain_batch, no_chat))


# --- SmolLM2 --------------------------------------------------------------------------------------------

def test_question_span_is_the_question(smollm2):
    fmt = PromptFormat(smollm2.tokenizer)
    p = synthetic_samples(fmt, ["inc_state"], 320, 1, 0.5, 0)[0]["inc_state"]
    q = smollm2.tokenizer.decode(p.input_ids[p.question_start : p.question_end])
    assert q.strip() == "What state was the company incorporated in?"
    assert p.context_end < p.question_start < p.question_end < len(p.input_ids)


def test_query_focused_equals_reference_on_smollm2(smollm2):
    ctx = MethodContext(prompt_format=PromptFormat(smollm2.tokenizer))
    p = synthetic_samples(ctx.prompt_format, ["hq_state"], 256, 1, 0.5, 0)[0]["hq_state"]
    fast = METHODS.get("query_focused").score_batch(smollm2.model, [p], ctx)
    ref = qf_reference(smollm2.model, smollm2.tokenizer, [p])
    assert fast.shape == ref.shape == (1, 30, 9)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert fast.abs().max() > 0.01 and (fast < 0).any()  # a calibrated score: some heads lose mass


@pytest.mark.slow
def test_qrhead_equals_plain_reference_on_smollm2(smollm2):
    ctx = MethodContext(prompt_format=PromptFormat(smollm2.tokenizer))
    p = synthetic_samples(ctx.prompt_format, ["hq_state"], 256, 1, 0.5, 0)[0]["hq_state"]
    fast = METHODS.get("qrhead").score_batch(smollm2.model, [p], ctx)[0]  # (L, H)
    ref = qrhead_reference(smollm2.model, smollm2.tokenizer, p)
    assert fast.shape == ref.shape == (30, 9)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert fast.abs().max() > 0.01 and (fast < 0).any()  # a calibrated score: some heads lose mass
    qf = METHODS.get("query_focused").score_batch(smollm2.model, [p], ctx)[0]
    assert (fast - qf).abs().max() > 1e-3  # another recipe than query_focused's
    unfiltered = qrhead_reference(smollm2.model, smollm2.tokenizer, p, drop_outliers=False)
    assert (fast - unfiltered).abs().max() > 1e-3  # the filter drops tokens on some heads


@pytest.fixture(scope="module")
def experiment(smollm2, tmp_path_factory):
    """hq_state at 512 tokens, samples 0 and 1 (with transformers 5.x SmolLM2 answers one of them correctly;
    the tests below hold for any outcome, checked sample by sample against slow references)."""
    out = tmp_path_factory.mktemp("methods")
    res = experiments.detect(smollm2, question="hq_state", tokens=512, samples=2, method=MIXED, output_dir=out,
                             save_samples=True, success_only=True)
    return out, res


@torch.no_grad()
def hf_greedy(model, tokenizer, prompt_ids, max_new_tokens=DEFAULT_MAX_NEW_TOKENS) -> list[int]:
    """transformers' own greedy ``generate`` (an independent decoding loop), cut by the same stop rule."""
    ids = torch.tensor([list(prompt_ids)])  # (1, N)
    full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                          max_new_tokens=max_new_tokens)[0, ids.shape[1]:].tolist()
    stop = stop_rule(model, tokenizer)
    out: list[int] = []
    for tok in full:
        if stop(out, tok):
            return out
        out.append(tok)
    assert len(out) == max_new_tokens, "generate stopped where the stop rule does not"
    return out


def test_answers_and_accuracy(smollm2, experiment):
    """The answers (ids, text, correctness) are those of an independent greedy decode, whatever they are."""
    out, res = experiment
    assert list(res) == ["summed_attention_success", "query_focused_success", "retrieval_score"]
    r = res["retrieval_score"]
    answers = r.answers
    for p, a in zip(r.prompts, answers):
        ids = hf_greedy(smollm2.model, smollm2.tokenizer, p.input_ids)
        text = smollm2.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert (a.ids, a.text, a.correct) == (ids, text, answer_matches(text, p.answer))
    n = sum(a.correct for a in answers)
    for name, r in res.items():
        assert r.record["extra"]["accuracy"] == n / 2 and r.record["extra"]["n_correct"] == n
        assert r.record["extra"]["num_key_value_heads"] == 3
        rows = [json.loads(x) for x in (out / name / "smollm2_hq_state_512.samples.jsonl").read_text().splitlines()]
        assert [(x["generated"], x["correct"]) for x in rows] == [(a.text, a.correct) for a in answers]
        assert load_result(out / name / "smollm2_hq_state_512.json")["method"] == name


def test_retrieval_score_equals_reference_on_smollm2(smollm2, experiment):
    _, res = experiment
    r = res["retrieval_score"]
    tok = smollm2.tokenizer
    for i, (p, a) in enumerate(zip(r.prompts, r.answers)):
        if not a.correct:
            assert r.sample_scores[i].abs().sum() == 0  # a wrong answer counts nothing
            continue
        ref = reference_argmax(smollm2.model, p.input_ids, a.ids)  # eager, step by step over the cache
        assert torch.equal(a.argmax, ref)
        ids = torch.tensor(p.input_ids)
        start, end = gold_span(tok, p)
        copied = [[set() for _ in range(9)] for _ in range(30)]
        for t, tokid in enumerate(a.ids):
            for layer in range(30):
                for head in range(9):
                    j = int(ref[t, layer, head])
                    if start <= j < end and int(ids[j]) == tokid:
                        copied[layer][head].add(j)
        by_hand = torch.tensor([[len(c) / (end - start) for c in row] for row in copied])
        assert torch.allclose(r.sample_scores[i], by_hand, atol=1e-6)
    assert r.sample_scores.max() <= 1
    assert torch.allclose(r.scores, r.sample_scores.sum(0))


def test_gold_span_is_the_answer_in_the_needle(smollm2, experiment):
    _, res = experiment
    tok = smollm2.tokenizer
    for p in res["retrieval_score"].prompts:
        start, end = gold_span(tok, p)
        assert p.needle_start <= start < end <= p.needle_end
        assert tok.decode(p.input_ids[start:end]).strip() == p.answer  # whole-word answers: an exact cover
    assert gold_span(tok, PromptSample(p.input_ids, p.needle_start, p.needle_end, p.context_end, "q", "Atlantis")) is None


def test_success_only_counts_correct_samples(smollm2, experiment):
    _, res = experiment
    succ = res["summed_attention_success"]
    assert succ.record["extra"]["success_only"] and res["retrieval_score"].record["extra"]["success_only"]
    total = torch.zeros(30, 9)
    for i, a in enumerate(res["retrieval_score"].answers):
        if a.correct:
            full = METHODS.get("summed_attention").score_batch(smollm2.model, [succ.prompts[i]])[0].cpu()
            assert torch.allclose(succ.sample_scores[i], full, atol=1e-6)
            total += full
        else:
            assert torch.equal(succ.sample_scores[i], torch.zeros(30, 9))  # a wrong answer counts nothing
    assert torch.allclose(succ.scores, total, atol=1e-6)


def test_methods_share_samples_and_differ(experiment):
    _, res = experiment
    ids = [[p.input_ids for p in r.prompts] for r in res.values()]
    assert ids[0] == ids[1] == ids[2]
    tops = [r.record["top_50_heads"][:10] for r in res.values()]
    assert len({tuple(t) for t in tops}) == 3  # every pair of methods differs


@torch.no_grad()
def slow_greedy(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The obvious greedy decode: one full forward pass over prompt + answer so far per token, no cache."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.cat([prompt_ids, torch.tensor(out, dtype=torch.long)])[None]  # (1, N + t)
        out.append(int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_decoding_equals_a_full_recompute(family):
    """greedy_decode (KV cache, batched, probe active for the argmax track) gives the tokens of a decode that
    recomputes the whole sequence for every token."""
    model = peaky(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(12))
    got, _ = greedy_decode(model, ids, 6, never, track_argmax=True)
    assert got == [slow_greedy(model, ids[b], 6) for b in range(2)]


def test_decoding_is_batch_invariant():
    model = peaky("llama")
    ids = torch.randint(0, 128, (3, 30), generator=torch.Generator().manual_seed(9))
    both, tracks = greedy_decode(model, ids, 5, never, track_argmax=True)
    for b in range(3):
        one, track = greedy_decode(model, ids[b : b + 1], 5, never, track_argmax=True)
        assert one[0] == both[b] and torch.equal(track[0], tracks[b])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "retrieval_heads", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_repeated_and_comma_methods(tmp_path):
    r = run_cli("detect", "--question", "inc_state", "--tokens", "256", "--samples", "1", "--method",
                "summed_attention,query_focused",
                "--method", "summed_attention", "--output-dir", str(tmp_path), "--top", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query_focused", "summed_attention"]
    r = run_cli("detect", "--method", "summed_attention,retrieval_scor", "--output-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "did you mean 'retrieval_score'" in r.stderr and not (tmp_path / "x").exists()


def test_gold_span_is_the_asked_fact_when_the_answer_appears_twice(smol_tok):
    """Sample 1 (seed 0) is headquartered and incorporated in Oregon, the headquarters sentence first: the
    gold span of inc_state is the incorporation fact's tokens (the span summed_attention+answer reads), not
    the first mention; a head copying "Oregon" from the headquarters sentence gets no credit."""
    from retrieval_heads.data.prompt import PromptFormat
    from retrieval_heads.data.samples import synthetic_samples
    from retrieval_heads.data.spans import answer_span, prompt_answer_span

    group = synthetic_samples(PromptFormat(smol_tok), ["inc_state", "hq_state"], 256, 2, 0.5, 0)[1]
    inc, hq = group["inc_state"], group["hq_state"]
    assert inc.answer == hq.answer == "Oregon"
    first = answer_span(smol_tok, inc.input_ids[inc.needle_start : inc.needle_end], "Oregon")
    first = (inc.needle_start + first[0], inc.needle_start + first[1])
    assert first == hq.fact_spans["hq_state"] != inc.fact_spans["inc_state"]  # the HQ mention comes first
    assert gold_span(smol_tok, inc) == inc.fact_spans["inc_state"] == prompt_answer_span(smol_tok, inc)
    assert gold_span(smol_tok, hq) == hq.fact_spans["hq_state"]
    a, b = gold_span(smol_tok, inc)
    answer = inc.input_ids[a:b]
    L, H = 1, 2
    argmax = torch.zeros(len(answer), L, H, dtype=torch.long)  # (T, L, H)
    argmax[:, 0, 0] = torch.arange(a, b)  # head 0 copies the incorporation fact
    argmax[:, 0, 1] = torch.arange(first[0], first[1])  # head 1 copies the headquarters mention
    hits = retrieval_hits(torch.tensor(inc.input_ids), gold_span(smol_tok, inc), answer, argmax)
    assert hits.tolist() == [[b - a, 0]]
