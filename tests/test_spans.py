"""Answer and fact spans: whole-word matching, and exact token spans for every question on synthetic samples."""

import pytest

from retrieval_heads.data.filings import make_sample
from retrieval_heads.data.spans import char_ends, token_span, whole_word_spans


@pytest.mark.parametrize("text, answer, want", [
    ("incorporated in Arkansas in 1990", "Kansas", []),
    ("Arkansas, then Kansas", "Kansas", [(15, 21)]),
    ("offices in West Virginia.", "Virginia", []),
    ("West Virginia and Virginia", "Virginia", [(18, 26)]),
    ("West Virginia and Virginia", "West Virginia", [(0, 13)]),
    ("offices in West\nVirginia", "West Virginia", [(11, 24)]),  # any whitespace between the words
    ("in KANSAS", "kansas", [(3, 9)]),  # case-insensitive
    ("12,400,000 shares; 12,400 people; 112,400", "12,400", [(19, 25)]),
    ("in 19905 and 1990.", "1990", [(13, 17)]),
    ("North Dakota, Dakota", "Dakota", [(14, 20)]),  # not a state, but not part of a longer one either
    ("New York", "York", []),  # part of the longer state name "New York"
    ("anything", "  ", []),
])
def test_whole_word_spans(text, answer, want):
    assert whole_word_spans(text, answer) == want


def test_token_span_overlap():
    ends = [0, 4, 6, 15, 16]  # tokens: [0,4) [4,6) [6,15) [15,16)
    assert token_span(ends, 7, 15) == (2, 3)
    assert token_span(ends, 3, 7) == (0, 3)
    assert token_span(ends, 16, 20) is None


def test_generator_fact_spans_hold_the_facts():
    for i in range(200):
        s = make_sample(0, i)
        assert sorted(s.fact_spans) == ["employee_count", "hq_state", "inc_state", "inc_year"]
        for key, (a, b) in s.fact_spans.items():
            assert s.needle[a:b] == s.company.facts[key]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retrieval_heads.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.mark.slow
def test_spans_are_exact_for_every_question(tokenizer):
    """On synthetic samples, decoding each fact's and each answer's span gives exactly its text (up to the
    leading space a token carries), for every question, at two depths; and the answer span of a question is
    its own fact's span, even when another fact has the same text."""
    from retrieval_heads.data.prompt import PromptFormat
    from retrieval_heads.data.questions import QUESTIONS
    from retrieval_heads.data.samples import synthetic_samples
    from retrieval_heads.data.spans import answer_span, prompt_answer_span

    fmt = PromptFormat(tokenizer)
    same_text = 0
    for depth in (0.1, 0.7):
        for i, group in enumerate(synthetic_samples(fmt, list(QUESTIONS), 400, 30, depth, 0)):
            facts = make_sample(0, i).company.facts
            for q, p in group.items():
                assert set(p.fact_spans) == set(facts)
                for key, (a, b) in p.fact_spans.items():
                    assert p.needle_start <= a < b <= p.needle_end
                    assert tokenizer.decode(p.input_ids[a:b]).strip() == facts[key]
                    assert tokenizer.decode(p.input_ids[a + 1 : b]).strip() != facts[key]  # no extra token
                assert prompt_answer_span(tokenizer, p) == p.fact_spans[QUESTIONS.get(q).fact]
                needle = p.input_ids[p.needle_start : p.needle_end]
                found = answer_span(tokenizer, needle, p.answer)
                assert found is not None and tokenizer.decode(needle[found[0] : found[1]]).strip() == p.answer
                same_text += facts["inc_state"] == facts["hq_state"]
                # haystack A and B: the separator and needle lie between them
                assert p.haystack_start < p.separator_start < p.needle_start < p.needle_end < p.context_end
    assert len(char_ends(tokenizer, [1, 2, 3])) == 4


@pytest.mark.slow
def test_answer_span_whole_words_in_token_ids(tokenizer):
    text = "Item 1. Business\n\nWe were incorporated in Arkansas in 1990. Our offices are in West Virginia and Kansas."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    from retrieval_heads.data.spans import answer_span

    a, b = answer_span(tokenizer, ids, "Kansas")
    assert tokenizer.decode(ids[a:b]).strip() == "Kansas" and a > len(ids) // 2
    assert answer_span(tokenizer, ids, "Virginia") is None
    a, b = answer_span(tokenizer, ids, "west virginia")
    assert tokenizer.decode(ids[a:b]).strip() == "West Virginia"
