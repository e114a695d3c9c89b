"""Assemble a prompt's token ids segment by segment, so the needle's token span is exact by construction.

Layout of one prompt (``|`` marks a segment boundary; each segment is tokenized on its own and the ids are
concatenated, never re-tokenized as one string)::

    prefix | haystack A | "\\n\\n" | needle | haystack B | suffix(question)

- ``prefix``: the chat template up to the context (system turn, user turn header, one instruction line);
  for tokenizers without a chat template, BOS and the instruction.
- ``haystack A``: the haystack text that precedes the needle, cut at a token boundary at its start (the
  prompt shows an excerpt), whole sentences after that.
- ``needle``: the Section 1 text; ``needle_start:needle_end`` (end exclusive) is exactly its ids.
- ``haystack B``: whole sentences that follow the needle (each paragraph opens with its blank line).
- ``suffix``: a blank line, the question, an answer instruction, the end of the user turn and the assistant header
  (the generation prompt). The last token of the suffix is the "last prompt token" the method reads.

Length bookkeeping: ``total_tokens`` counts every id fed to the model, special tokens and template included.
The context (prefix + A + separator + needle + B) gets ``tokens - reserve`` ids exactly, where ``reserve``
is the longest suffix among the questions that share this context (the four built-in questions share
every context, so one prefill can serve all four). A prompt is therefore ``tokens`` long for the longest
question and at most ``reserve - len(own suffix)`` (a few tokens, always < 64) shorter for the others.
Depth: the needle starts after ``round(needle_position * H)`` of the ``H`` haystack ids, give or take the
length of one sentence (B holds whole sentences; A absorbs the difference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import ParamError, UserError

INSTRUCTION = "Read the following excerpts from company filings, then answer the question."
ANSWER_HINT = "Answer with the fact only."
_CTX = "<<<RH-CONTEXT>>>"
MAX_SHORTFALL = 64  # a prompt is never more than this many tokens under --tokens
# Sentences tokenized per batch call when a haystack is read up to a budget: a haystack stream holds hundreds
# of sentences of which a prompt often needs only a few dozen, so encoding all of them at once wastes time,
# and one at a time pays the tokenizer's per-call overhead. Any value gives the same ids (each sentence is
# encoded on its own); about 64 sentences (~1.5K tokens) keeps the overshoot small at every --tokens.
ENCODE_CHUNK = 64
_SENT = re.compile(r"(?<=[a-z%)\"][.!?])\s+(?=[A-Z\"$])")


@dataclass
class PromptSample:
    input_ids: list[int]
    needle_start: int
    needle_end: int
    context_end: int  # ids[:context_end] are shared by every question; the suffix follows
    question: str
    answer: str
    question_key: str | None = None
    meta: dict = field(default_factory=dict)
    question_start: int | None = None  # ids[question_start:question_end] are the question's own tokens
    question_end: int | None = None
    # added with the chance baselines: where the haystack lies (A: [haystack_start, separator_start); B:
    # [needle_end, context_end)), and on synthetic samples each fact's token span {question key: (start, end)}
    haystack_start: int | None = None
    separator_start: int | None = None
    fact_spans: dict = field(default_factory=dict)
    # a long-context task's key inside the needle (prompt positions [start, end)), exact by construction
    answer_at: tuple[int, int] | None = None


def _chat_frame(tokenizer, content: str) -> tuple[str, str, str]:
    """(before the context, between it and the question, after the question) of one user turn holding
    ``content`` in the tokenizer's chat template. A template comes with the model's files: one that fails
    (raises, breaks the sandbox's rules, is malformed) or does not hold the turn's text exactly once is a
    UserError naming the reason, never a traceback."""
    from ..errors import UserError, first_line

    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError and SecurityError, the sandbox's OverflowError, ...
        raise UserError(f"the model's chat template fails: {type(e).__name__}: {first_line(e)[:200]}") from None
    if not isinstance(text, str) or text.count(_CTX) != 1 or text.count("{Q}") != 1:
        raise UserError("the model's chat template does not hold the user's message exactly once (it drops or "
                        "repeats it), so no prompt can be framed with it; fix chat_template in its tokenizer files")
    before, after = text.split(_CTX)
    if "{Q}" not in after:
        raise UserError("the model's chat template reorders the user's message; fix chat_template in its "
                        "tokenizer files")
    return (before, *after.split("{Q}"))


class PromptFormat:
    """How one tokenizer frames the context and the question. ``instruction`` opens the user turn (the
    filings' by default; a long-context task brings its own): it changes the prefix only, never the suffix."""

    def __init__(self, tokenizer, instruction: str = INSTRUCTION):
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if self.chat:
            self._before, self._after_pre, self._after_post = _chat_frame(tokenizer, self._user_content("{Q}"))
            self._prefix = self.encode(self._before)
        else:
            before = instruction + "\n\n"
            self._prefix = list(tokenizer(before, add_special_tokens=True)["input_ids"])
            self._after_pre, self._after_post = "\n\nQuestion: ", "\nAnswer:"
        self._sep = self.encode("\n\n")
        self._suffix_cache: dict[str, list[int]] = {}

    def _user_content(self, question: str) -> str:
        return f"{self.instruction}\n\n{_CTX}\n\nQuestion: {question}\n{ANSWER_HINT}"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @property
    def prefix(self) -> list[int]:
        return self._prefix

    @property
    def separator(self) -> list[int]:
        return self._sep

    def suffix(self, question: str) -> list[int]:
        if question not in self._suffix_cache:
            self._suffix_cache[question] = self.encode(self._after_pre + question + self._after_post)
        return self._suffix_cache[question]

    def question_span(self, question: str) -> tuple[int, int]:
        """(start, end) of the question's tokens inside ``suffix(question)``: what is left between the longest
        common head with the text before the question and the longest common tail with the text after it
        (a token that straddles a boundary counts as the question's)."""
        ids, pre, post = self.suffix(question), self.encode(self._after_pre), self.encode(self._after_post)
        start = 0
        while start < min(len(ids), len(pre)) and ids[start] == pre[start]:
            start += 1
        end = len(ids)
        while end > start and len(ids) - end < len(post) and ids[end - 1] == post[len(post) - (len(ids) - end) - 1]:
            end -= 1
        return start, end


def _units(paragraphs: Sequence[str]) -> list[str]:
    """Sentences, each with the whitespace that joins it to the one before: '\\n\\n' at the start of a
    paragraph, ' ' inside one."""
    out: list[str] = []
    for p in paragraphs:
        for block in p.split("\n\n"):
            for i, s in enumerate(x for x in _SENT.split(block.strip()) if x):
                out.append(("\n\n" if i == 0 else " ") + s)
    return out


def _take_forward(fmt: PromptFormat, paragraphs: Sequence[str], budget: int) -> list[int]:
    """Whole sentences from the start of ``paragraphs``, as many as fit in ``budget`` ids."""
    ids: list[int] = []
    units = _units(paragraphs)
    for chunk_at in range(0, len(units), ENCODE_CHUNK):
        for u in fmt.encode_many(units[chunk_at : chunk_at + ENCODE_CHUNK]):
            if len(ids) + len(u) > budget:
                return ids
            ids.extend(u)
    return ids


def _take_backward(fmt: PromptFormat, paragraphs: Sequence[str], n: int) -> list[int]:
    """The last ``n`` ids of the text of ``paragraphs`` (cut at a token boundary at its start); fewer if the
    text is shorter."""
    if n == 0:
        return []
    units = _units(paragraphs)
    pieces: list[list[int]] = []
    have = 0
    end = len(units)
    while have < n and end > 0:
        start = max(0, end - ENCODE_CHUNK)
        for u in reversed(fmt.encode_many(units[start:end])):
            pieces.append(u)
            have += len(u)
            if have >= n:
                break
        end = start
    ids = [t for u in reversed(pieces) for t in u]
    return ids[max(0, len(ids) - n) :]


def context_budget(fmt: PromptFormat, tokens: int, reserve: int, needle_len: int) -> int:
    """Haystack ids H for a prompt of ``tokens``; raises UserError when needle and question don't fit."""
    h = tokens - len(fmt.prefix) - reserve - needle_len - len(fmt.separator)
    if h < 0:
        need = tokens - h
        raise UserError(
            f"--tokens {tokens} is too small: the template, needle and question alone take {need} tokens"
        )
    return h


def build_prompt(
    fmt: PromptFormat,
    needle: str,
    before: Sequence[str],
    after: Sequence[str],
    question: str,
    answer: str,
    tokens: int,
    needle_position: float,
    reserve: int | None = None,
    what: str = "sample",
) -> PromptSample:
    """Token ids of one prompt with the needle at ``needle_position`` depth (see the module docstring).

    ``before`` are the paragraphs that precede the needle in reading order (their tail is used),
    ``after`` those that follow it (their head is used).
    """
    suffix = fmt.suffix(question)
    reserve = len(suffix) if reserve is None else reserve
    needle_ids = fmt.encode(needle)
    if not needle_ids:
        raise UserError(f"{what}: the needle is empty")
    h = context_budget(fmt, tokens, reserve, len(needle_ids))
    target_a = round(needle_position * h)
    b_ids = _take_forward(fmt, after, h - target_a)
    a_ids = _take_backward(fmt, before, h - len(b_ids))
    prefix = fmt.prefix
    start = len(prefix) + len(a_ids) + len(fmt.separator)
    ids = prefix + a_ids + fmt.separator + needle_ids + b_ids
    context_end = len(ids)
    ids = ids + suffix
    if len(ids) < tokens - MAX_SHORTFALL:
        raise ParamError("tokens", f" {tokens} (the prompt has {len(ids)} tokens)",
                         prefix=f"{what}: the haystack is too short for ")
    q0, q1 = fmt.question_span(question)
    return PromptSample(ids, start, start + len(needle_ids), context_end, question, answer,
                        question_start=context_end + q0, question_end=context_end + q1,
                        haystack_start=len(prefix), separator_start=len(prefix) + len(a_ids))
