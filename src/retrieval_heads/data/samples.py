"""The samples of one experiment: synthetic filings or a user's JSONL, as exact token ids.

>>> from transformers import AutoTokenizer                                   # doctest: +SKIP
>>> fmt = PromptFormat(AutoTokenizer.from_pretrained(path))                  # doctest: +SKIP
>>> groups = synthetic_samples(fmt, ["inc_state", "hq_state"], tokens=1024, n=2, needle_position=0.5, seed=0)
>>> groups[0]["inc_state"].needle_start                                       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

from .dataset import Record, paragraphs
from .filings import make_sample
from .prompt import PromptFormat, PromptSample, build_prompt
from .questions import QUESTIONS
from .spans import char_spans_to_tokens


def synthetic_samples(
    fmt: PromptFormat, question_keys: Sequence[str], tokens: int, n: int, needle_position: float, seed: int
) -> list[dict[str, PromptSample]]:
    """``n`` samples; each maps every question key to its prompt. All questions of a sample share one
    context (identical ids up to ``context_end``), sized for the longest suffix of the four built-in questions,
    so a sample's ids do not depend on which questions are asked together."""
    questions = [QUESTIONS.get(k) for k in question_keys]
    reserve = max(len(fmt.suffix(q.prompt)) for q in (QUESTIONS.get(k) for k in QUESTIONS))
    out = []
    for i in range(n):
        fs = make_sample(seed, i)
        group = {}
        facts = None
        for q in questions:
            p = build_prompt(fmt, fs.needle, fs.haystack_before, fs.haystack_after, q.prompt,
                             fs.company.facts[q.fact], tokens, needle_position, reserve, what=f"sample {i}")
            p.question_key = q.key
            p.meta = {"company": fs.company.name}
            if facts is None:  # the needle's ids are the same for every question
                facts = _fact_spans(fmt, fs.needle, p, fs.fact_spans)
            p.fact_spans = dict(facts)
            group[q.key] = p
        out.append(group)
    return out


def _fact_spans(fmt: PromptFormat, needle: str, p: PromptSample, chars: dict[str, tuple[int, int]]) -> dict:
    """Each fact's prompt positions [start, end), from its character span in the needle; {} when the
    tokenizer does not decode the needle back to its text (then only the needle and answer spans exist)."""
    try:
        spans = char_spans_to_tokens(fmt.tokenizer, needle, p.input_ids[p.needle_start : p.needle_end], chars)
    except ValueError:
        return {}
    return {k: (p.needle_start + a, p.needle_start + b) for k, (a, b) in spans.items()}


def dataset_samples(
    fmt: PromptFormat, records: Sequence[Record], tokens: int, needle_position: float
) -> list[PromptSample]:
    """One prompt per record; the needle goes in at a paragraph boundary near the requested depth."""
    out = []
    for rec in records:
        paras = paragraphs(rec.haystack)
        lengths = [len(x) for x in fmt.encode_many(paras)]
        budget = tokens - len(fmt.prefix) - len(fmt.suffix(rec.question)) - len(fmt.encode(rec.needle))
        want_before = needle_position * max(budget, 0)
        k, cum = 0, 0
        while k < len(paras) and cum < want_before:
            cum += lengths[k]
            k += 1
        p = build_prompt(fmt, rec.needle, paras[:k], paras[k:], rec.question, rec.answer, tokens,
                         needle_position, what=f"record on line {rec.line}")
        p.meta = dict(rec.meta, line=rec.line)
        out.append(p)
    return out
