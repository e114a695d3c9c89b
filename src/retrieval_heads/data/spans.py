"""Where an answer or a fact sits in a prompt: whole-word matching, and character spans mapped to token spans.

A prompt's ids are built segment by segment (:mod:`retrieval_heads.data.prompt`), so the needle's ids are
``encode(needle)`` exactly. A character range of the needle text is mapped to the needle tokens that overlap
it, with the character end of every prefix of the needle ids (``decode(ids[:i])``): a token that straddles
the range's edge (e.g. " Delaware" with its leading space) belongs to it.

>>> whole_word_spans("Arkansas and Kansas", "Kansas")
[(13, 19)]
>>> whole_word_spans("West Virginia, not Virginia", "virginia")
[(19, 27)]
>>> whole_word_spans("12,400,000 or 12,400 people", "12,400")
[(14, 20)]
"""

from __future__ import annotations

import re
from typing import Sequence

from .questions import STATES


def _longer_names(answer: str) -> list[str]:
    """US state names that hold ``answer`` as whole words and are longer ("West Virginia" for "Virginia")."""
    a = answer.lower()
    return [s for s in STATES if s.lower() != a and re.search(rf"(?<!\w){re.escape(a)}(?!\w)", s.lower())]


def _pattern(text: str) -> str:
    """``text`` as a regex, any run of whitespace in it matching any run of whitespace."""
    return r"\s+".join(re.escape(w) for w in text.split())


def whole_word_spans(text: str, answer: str) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of the whole-word occurrences of ``answer`` in ``text``,
    case-insensitive, in order.

    Whole words: no letter, digit or underscore directly before or after the occurrence ("Kansas" is not in
    "Arkansas", "1990" not in "19905"); a number also does not continue with a separator and a digit ("12,400"
    is not in "12,400,000" nor in "1.12,400"). An occurrence that is part of a longer US state name there is
    skipped ("Virginia" is not in "West Virginia"). Whitespace inside ``answer`` matches any whitespace.
    """
    answer = answer.strip()
    if not answer:
        return []
    before = r"(?<![\w])" + (r"(?<!\d[.,])" if answer[0].isdigit() else "")
    after = r"(?![\w])" + (r"(?![.,]\d)" if answer[-1].isdigit() else "")
    found = [(m.start(), m.end()) for m in re.finditer(before + _pattern(answer) + after, text, re.IGNORECASE)]
    inside = [(m.start(), m.end()) for name in _longer_names(answer)
              for m in re.finditer(rf"(?<!\w){_pattern(name)}(?!\w)", text, re.IGNORECASE)]
    return [(s, e) for s, e in found if not any(a <= s and e <= b for a, b in inside)]


def char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """``ends[i]`` = number of characters of ``decode(ids[:i])``, for i = 0..len(ids), kept monotone (a
    prefix that ends inside a multi-byte character may decode shorter than the one before it). Decoding
    prefixes, rather than re-tokenizing the text, maps exactly the ids in the prompt, tokens that carry
    their leading space (" Kansas") and word pieces ("kansas" after "Ar") included."""
    ends = [0]
    for i in range(1, len(ids) + 1):
        ends.append(max(ends[-1], len(tokenizer.decode(list(ids[:i]), clean_up_tokenization_spaces=False))))
    return ends


def token_span(ends: Sequence[int], start: int, end: int) -> tuple[int, int] | None:
    """Indices ``[i0, i1)`` of the tokens whose characters overlap ``[start, end)``, with ``ends`` from
    :func:`char_ends`; None when no token does."""
    hit = [i for i in range(len(ends) - 1) if ends[i] < end and ends[i + 1] > start]
    return (hit[0], hit[-1] + 1) if hit else None


def answer_span(tokenizer, ids: Sequence[int], answer: str) -> tuple[int, int] | None:
    """Token indices ``[i0, i1)`` (into ``ids``) of the first whole-word occurrence of ``answer`` in
    ``decode(ids)`` (see :func:`whole_word_spans`), or None if it does not occur."""
    spans = whole_word_spans(tokenizer.decode(list(ids), clean_up_tokenization_spaces=False), answer)
    return token_span(char_ends(tokenizer, ids), *spans[0]) if spans else None


def gold_span(tokenizer, prompt) -> tuple[int, int] | None:
    """Prompt positions [start, end) of the gold answer's tokens in the needle (``retrieval_score``'s gold
    span, the explorer's answer span): the asked fact's span on a synthetic sample (even when another fact
    has the same text), else the tokens that overlap the answer's first whole-word occurrence in the needle
    (case-insensitive, see :func:`whole_word_spans`); None when the needle holds the answer only inside longer
    words ("Kansas" only as part of "Arkansas") or not at all. The one span every method calls "the answer"
    (:func:`prompt_answer_span`, which ``summed_attention+answer`` reads)."""
    return prompt_answer_span(tokenizer, prompt)


def char_spans_to_tokens(tokenizer, text: str, ids: Sequence[int],
                         spans: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Character spans of ``text`` -> token spans of ``ids = encode(text)`` (indices into ``ids``). Raises
    ValueError when ``decode(ids)`` does not give ``text`` back (the character positions would not hold)
    or a span covers no token."""
    if tokenizer.decode(list(ids)) != text:
        raise ValueError("the tokenizer does not decode the needle's ids back to its text; its fact spans "
                         "cannot be mapped to tokens")
    ends = char_ends(tokenizer, ids)
    out = {}
    for key, (start, end) in spans.items():
        span = token_span(ends, start, end)
        if span is None:
            raise ValueError(f"the span of {key!r} covers no token")
        out[key] = span
    return out


def prompt_answer_span(tokenizer, prompt) -> tuple[int, int] | None:
    """Prompt positions ``[start, end)`` of the answer's tokens inside the needle of a
    :class:`~retrieval_heads.data.prompt.PromptSample`: on synthetic samples, the span of the fact the
    question asks for (exact by construction, even when another fact has the same text); otherwise the first
    whole-word occurrence of the answer in the needle; on a long-context task (:mod:`~retrieval_heads.data.tasks`)
    the key's own span (``answer_at``). None when the needle does not hold it."""
    if getattr(prompt, "answer_at", None) is not None:
        return prompt.answer_at
    fact = prompt.fact_spans.get(prompt.question_key) if prompt.question_key else None
    if fact is not None:
        return fact
    needle = prompt.input_ids[prompt.needle_start : prompt.needle_end]
    span = answer_span(tokenizer, needle, prompt.answer)
    return None if span is None else (prompt.needle_start + span[0], prompt.needle_start + span[1])
