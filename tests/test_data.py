"""Synthetic filings, prompt assembly (exact spans, lengths), answer matching, JSONL loading."""

import json

import pytest

from retrieval_heads.data.dataset import load_jsonl
from retrieval_heads.data.filings import make_sample
from retrieval_heads.data.prompt import MAX_SHORTFALL, PromptFormat, build_prompt
from retrieval_heads.data.questions import QUESTIONS, answer_matches
from retrieval_heads.data.samples import dataset_samples, synthetic_samples
from retrieval_heads.errors import UserError


@pytest.fixture(scope="module")
def fmt(smollm2_tokenizer):
    return PromptFormat(smollm2_tokenizer)


def test_generator_is_deterministic_and_index_addressed():
    a, b = make_sample(7, 3), make_sample(7, 3)
    assert a.needle == b.needle and a.haystack_after[:5] == b.haystack_after[:5]
    assert make_sample(7, 4).needle != a.needle
    for key in ("inc_state", "inc_year", "employee_count", "hq_state"):
        assert a.company.facts[key] in a.needle


def test_section_1_is_the_same_on_every_call():
    """A company's needle does not consume its generator: every call gives the sample's needle."""
    company = make_sample(7, 3).company
    assert company.section_1() == company.section_1() == make_sample(7, 3).needle


def test_questions_registry():
    assert QUESTIONS.get("inc_state").prompt == "What state was the company incorporated in?"
    assert QUESTIONS.names() == ["inc_state", "inc_year", "employee_count", "hq_state"]
    with pytest.raises(UserError, match="did you mean 'hq_state'"):
        QUESTIONS.get("hq_stat")


@pytest.mark.parametrize("gen,gold,ok", [
    ("Delaware", "Delaware", True), ("It was incorporated in DE.", "Delaware", True),
    ("delaware", "Delaware", True), ("Delawares", "Delaware", False), ("Ohio", "Delaware", False),
    ("12400", "12,400", True), ("about 12 400 people", "12,400", True), ("124000", "12,400", False),
    ("in 1987.", "1987", True), ("19870", "1987", False), ("New York", "New York", True),
    ("York", "New York", False), ("the state of west virginia", "West Virginia", True),
    # a longer state name is not the shorter one, however spaced or cased; the shorter one beside it is
    ("West Virginia", "Virginia", False), ("the state of west  virginia", "Virginia", False),
    ("WV", "Virginia", False), ("Virginia", "Virginia", True), ("VA", "Virginia", True),
    ("Virginia, not West Virginia", "Virginia", True), ("Virginia", "West Virginia", False),
    ("Arkansas", "Kansas", False), ("Kansas", "Arkansas", False),
])
def test_answer_matches(gen, gold, ok):
    assert answer_matches(gen, gold) is ok


@pytest.mark.parametrize("tokens,pos", [(512, 0.5), (1024, 0.0), (1024, 1.0), (2048, 0.25)])
def test_prompt_lengths_and_exact_spans(fmt, tokens, pos):
    groups = synthetic_samples(fmt, QUESTIONS.names(), tokens, 2, pos, seed=0)
    for g in groups:
        lens = {k: len(p.input_ids) for k, p in g.items()}
        assert max(lens.values()) == tokens  # the longest question fills the budget exactly
        assert min(lens.values()) >= tokens - MAX_SHORTFALL
        ctx = {tuple(p.input_ids[: p.context_end]) for p in g.values()}
        assert len(ctx) == 1  # all questions share one context
        p = g["inc_state"]
        needle_ids = fmt.encode(make_sample(0, groups.index(g)).needle)
        assert p.input_ids[p.needle_start : p.needle_end] == needle_ids
        assert p.answer in fmt.tokenizer.decode(p.input_ids[p.needle_start : p.needle_end])
        haystack = p.context_end - len(fmt.prefix) - len(needle_ids) - len(fmt.separator)
        before = p.needle_start - len(fmt.prefix) - len(fmt.separator)
        assert abs(before - pos * haystack) <= 80  # depth within about one sentence


def test_prompt_ends_with_generation_prompt(fmt, smollm2_tokenizer):
    p = synthetic_samples(fmt, ["hq_state"], 512, 1, 0.5, 0)[0]["hq_state"]
    tail = smollm2_tokenizer.decode(p.input_ids[-30:])
    assert tail.endswith("<|im_start|>assistant\n")
    assert "Question: In what state is the company headquartered?" in tail


def test_too_few_tokens(fmt):
    s = make_sample(0, 0)
    with pytest.raises(UserError, match="too small"):
        build_prompt(fmt, s.needle, s.haystack_before, s.haystack_after, "Q?", "x", 150, 0.5)


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return p


GOOD = {"needle": "Item 1. Acme was incorporated in Ohio in 1950.", "haystack": ["Filler text. " * 300],
        "question": "inc_state", "answer": "Ohio"}


def test_jsonl_roundtrip(tmp_path, fmt):
    recs = load_jsonl(write_jsonl(tmp_path, [GOOD, dict(GOOD, question="Where?", answer="Ohio", id=7)]))
    assert recs[0].question == QUESTIONS.get("inc_state").prompt and recs[1].meta == {"id": 7}
    prompts = dataset_samples(fmt, recs, 512, 0.5)
    for p in prompts:
        assert tokens_ok(p, 512)
        assert fmt.tokenizer.decode(p.input_ids[p.needle_start : p.needle_end]) == GOOD["needle"]


def tokens_ok(p, tokens):
    return tokens - MAX_SHORTFALL <= len(p.input_ids) <= tokens


@pytest.mark.parametrize("line,msg", [
    ("{not json", "d.jsonl:2: malformed JSON"),
    (json.dumps({"needle": "x"}), "d.jsonl:2: missing field"),
    (json.dumps(dict(GOOD, needle="  ")), "d.jsonl:2: field 'needle' is empty"),
    (json.dumps(dict(GOOD, haystack=[])), "d.jsonl:2: field 'haystack' is empty"),
    (json.dumps(dict(GOOD, haystack=3)), "d.jsonl:2: field 'haystack' must be"),
    ("[1, 2]", "d.jsonl:2: a record must be a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, msg):
    with pytest.raises(UserError, match=msg):
        load_jsonl(write_jsonl(tmp_path, [GOOD, line]))


def test_jsonl_non_utf8_and_empty(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(UserError, match="d.jsonl:2: not valid UTF-8"):
        load_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        load_jsonl(p)


def test_jsonl_answer_not_in_needle_warns(tmp_path):
    warnings = []
    load_jsonl(write_jsonl(tmp_path, [dict(GOOD, answer="Texas")]), warn=warnings.append)
    assert len(warnings) == 1 and "does not occur in its needle" in warnings[0]


def test_jsonl_haystack_too_short(tmp_path, fmt):
    recs = load_jsonl(write_jsonl(tmp_path, [dict(GOOD, haystack="Short.")]))
    with pytest.raises(UserError, match="line 1: the haystack is too short"):
        dataset_samples(fmt, recs, 1024, 0.5)
