"""A task prompt's ids, segment by segment: the layout of :mod:`retrieval_heads.data.prompt`, plus distractor
needles placed inside the haystack at given depths.

    prefix | haystack A (distractors inside) | "\\n\\n" | needle | haystack B (distractors inside) | suffix

As in :func:`~retrieval_heads.data.prompt.build_prompt`: the context gets ``tokens - len(suffix)`` ids exactly,
B holds whole units from the start of its stream, A the last ids of its stream (cut at a token boundary at
its start), and the needle starts after ``round(needle_position * H)`` of the ``H`` haystack ids, give or take
one unit. A distractor at depth ``d`` goes in at the unit boundary nearest to where it starts ``d * H`` haystack ids
into the haystack (measured from the needle, on its side, earlier distractors included); its ids count against its side's budget, so every distractor
is in the prompt whole, never cut. Each unit and distractor is tokenized on its own, so the needle's ids are
``encode(needle)`` exactly, and the key's token span inside it comes from its character span
(:func:`~retrieval_heads.data.spans.char_spans_to_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ParamError
from .prompt import MAX_SHORTFALL, PromptFormat, PromptSample, context_budget
from .spans import char_spans_to_tokens


def _encoder(fmt: PromptFormat, units: Sequence[str]):
    """ids of each unit, each distinct text tokenized once."""
    distinct = list(dict.fromkeys(units))
    table = dict(zip(distinct, fmt.encode_many(distinct)))
    return [table[u] for u in units]


def _insert(pieces: list[list[int]], items: list[tuple[int, list[int]]], from_end: bool, first: int) -> list[int]:
    """The ids of ``pieces`` with each (distance, ids) item put in at the piece boundary whose distance (in
    ids, items placed before it included) from the start (from the end with ``from_end``) is nearest
    ``distance``, with at least ``first`` pieces beyond it. Items are placed nearest first."""
    order = list(reversed(pieces)) if from_end else list(pieces)
    bounds, at = [0], 0
    for piece in order:
        at += len(piece)
        bounds.append(at)
    slots: dict[int, list[list[int]]] = {}
    for distance, ids in sorted(items, key=lambda x: x[0]):
        def where(j: int) -> int:  # ids before boundary j, the items already placed at or before it included
            return bounds[j] + sum(len(x) for k, xs in slots.items() if k <= j for x in xs)

        j = min(range(len(order) + 1 - first), key=lambda i: (abs(where(i) - distance), i))
        slots.setdefault(j, []).append(ids)
    out: list[list[int]] = []
    for j in range(len(order) + 1):
        out.extend(slots.get(j, []))  # nearest first, outwards from the needle
        if j < len(order):
            out.append(order[j])
    if from_end:
        out.reverse()
    return [t for piece in out for t in piece]


def assemble(
    fmt: PromptFormat, needle: str, key_chars: tuple[int, int], before: Sequence[str], after: Sequence[str],
    question: str, answer: str, tokens: int, needle_position: float,
    distractors: Sequence[tuple[float, str]] = (), what: str = "sample",
) -> PromptSample:
    """One task prompt (see the module docstring). ``key_chars``: the key's [start, end) in ``needle``;
    ``before``/``after``: haystack units (``before`` read backwards from the needle, nearest last);
    ``distractors``: (depth in [0, 1], sentence) pairs."""
    suffix = fmt.suffix(question)
    needle_ids = fmt.encode(needle)
    h = context_budget(fmt, tokens, len(suffix), len(needle_ids))
    target_a = round(needle_position * h)
    side_a = [(ids, round((needle_position - d) * h) - len(ids)) for ids, d in  # its start at depth d, as in B
              ((fmt.encode(" " + s), d) for d, s in distractors if d < needle_position)]
    side_a = [(max(0, dist), ids) for ids, dist in side_a]
    side_b = [(round((d - needle_position) * h), fmt.encode(" " + s)) for d, s in distractors if d >= needle_position]
    # B: whole units from the start of its stream, the distractors' ids reserved
    budget = h - target_a - sum(len(x) for _, x in side_b)
    b_units: list[list[int]] = []
    used = 0
    for u in _encoder(fmt, after):
        if used + len(u) > budget:
            break
        b_units.append(u)
        used += len(u)
    b_ids = _insert(b_units, side_b, from_end=False, first=0)
    # A: the last ids of its stream, exactly what is left, the distractors' ids reserved
    want = h - len(b_ids) - sum(len(x) for _, x in side_a)
    if want < 0 or (side_b and len(b_ids) > h - target_a):
        raise ParamError("tokens", f" {tokens} is too small for the task's needles", prefix=f"{what}: ")
    a_units: list[list[int]] = []
    have = 0
    for u in reversed(_encoder(fmt, before)):
        if have >= want:
            break
        a_units.append(u)
        have += len(u)
    a_units.reverse()
    if a_units and have > want:  # cut the first unit at a token boundary: the prompt shows an excerpt
        a_units[0] = a_units[0][have - want :]
    a_ids = _insert(a_units, side_a, from_end=True, first=1 if a_units else 0)
    prefix = fmt.prefix
    start = len(prefix) + len(a_ids) + len(fmt.separator)
    ids = prefix + a_ids + fmt.separator + needle_ids + b_ids
    context_end = len(ids)
    ids = ids + suffix
    if len(ids) < tokens - MAX_SHORTFALL:
        raise ParamError("tokens", f" {tokens} (the prompt has {len(ids)} tokens)",
                         prefix=f"{what}: the haystack is too short for ")
    try:
        k0, k1 = char_spans_to_tokens(fmt.tokenizer, needle, needle_ids, {"key": key_chars})["key"]
        answer_at = (start + k0, start + k1)
    except ValueError:  # a tokenizer that does not decode the needle back: the answer is found by matching
        answer_at = None
    q0, q1 = fmt.question_span(question)
    return PromptSample(ids, start, start + len(needle_ids), context_end, question, answer,
                        question_start=context_end + q0, question_end=context_end + q1,
                        haystack_start=len(prefix), separator_start=len(prefix) + len(a_ids), answer_at=answer_at)
