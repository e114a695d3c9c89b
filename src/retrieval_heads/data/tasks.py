"""Built-in long-context tasks beside the seed's four filing questions, chosen by ``--question`` (and in grid
files) like them:

========================  ==========  =====================  ======  =============
task                      key         haystack               needles decoded tokens
========================  ==========  =====================  ======  =============
``passkey``               5 digits    filler                 1       38
``niah_number``           7 digits    filler                 1       40
``niah_word``             a word      filler                 1       36
``niah_uuid``             a UUID      filler                 1       69
``niah_number_filings``   7 digits    filing text            1       40
``niah_word_filings``     a word      filing text            1       36
``niah_uuid_filings``     a UUID      filing text            1       69
``multikey``              7 digits    filler                 4       40
========================  ==========  =====================  ======  =============

``passkey`` is Mohtashami & Jaggi's test (:mod:`~retrieval_heads.data.passkey`); the ``niah_*`` tasks are
RULER's single needles and ``multikey`` its multi-key needle (:mod:`~retrieval_heads.data.ruler`), with the
repeated filler or the seed's filing text as haystack (:mod:`~retrieval_heads.data.haystacks`). Each prompt
is laid out by :mod:`~retrieval_heads.data.layout`: the needle's token span and the key's (the ``answer``
span) are exact by construction. Everything is drawn from ``random.Random(f"{task}:{seed}:{index}")`` (and,
for the filing haystack, the seed's filing sample ``index``), so the same seed gives the same prompts.

Decoded tokens: 32 tokens of room for a lead-in, plus the key's own length under SmolLM2's tokenizer, the
longest there is (a digit is one token: 6 for " 12345", 8 for a 7-digit number; at most 4 for a value word;
37 for a UUID). The model restates the question before the key ("The special magic number for dusty-quarry
mentioned in the provided text is 5654249", 17 tokens before the number), so the lead-in room is the longest
task question (at most 20 tokens) with a margin. A first budget, the seed's 12 tokens of lead-in room, was
set before measuring and cut every ``niah_number`` answer at 512 tokens inside the number (0/8,
docs/tasks.md); it was raised to 32 for that reason alone, before the accuracy table was run.
``--max-new-tokens`` overrides it.

>>> from transformers import AutoTokenizer                                  # doctest: +SKIP
>>> ps = task_prompts(AutoTokenizer.from_pretrained(path), "passkey", tokens=1024, n=2, needle_position=0.5, seed=0)
>>> tok.decode(ps[0].input_ids[slice(*ps[0].answer_at)]).strip() == ps[0].answer    # doctest: +SKIP
True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..registry import Registry
from .haystacks import haystack_units
from .layout import assemble
from .passkey import INSTRUCTION as PASSKEY_INSTRUCTION
from .passkey import QUESTION as PASSKEY_QUESTION
from .passkey import Needle, passkey_needle
from .prompt import PromptFormat, PromptSample
from .questions import QUESTIONS
from .ruler import instruction, question_template, ruler_needle

LEAD_IN_TOKENS = 32  # room to restate the question (at most 20 tokens) before the key
FILING_TOKENS = 12  # the seed's decoding budget (generation.DEFAULT_MAX_NEW_TOKENS)
KEY_TOKENS = {"passkey": 6, "number": 8, "word": 4, "uuid": 37}  # longest key, SmolLM2's tokenizer


@dataclass(frozen=True)
class Task:
    key: str
    kind: str  # passkey, number, word, uuid
    haystack: str  # filler or filings
    keys: int = 1  # needles in the context (the asked one and keys - 1 distractors)

    @property
    def prompt(self) -> str:
        """The question, as results record it (``{query}`` stands for the needle's own name)."""
        return PASSKEY_QUESTION if self.kind == "passkey" else question_template(self.kind)

    @property
    def instruction(self) -> str:
        return PASSKEY_INSTRUCTION if self.kind == "passkey" else instruction(self.kind)

    @property
    def max_new_tokens(self) -> int:
        return LEAD_IN_TOKENS + KEY_TOKENS[self.kind]

    def needle(self, seed: int, index: int) -> Needle:
        r = random.Random(f"{self.key}:{seed}:{index}")
        return passkey_needle(r) if self.kind == "passkey" else ruler_needle(r, self.kind, self.keys)

    def prompt_sample(self, fmt: PromptFormat, seed: int, index: int, tokens: int,
                      needle_position: float) -> PromptSample:
        """Sample ``index`` of ``seed`` (``fmt`` must carry :attr:`instruction`)."""
        n = self.needle(seed, index)
        before, after = haystack_units(self.haystack, seed, index, tokens)
        p = assemble(fmt, n.text, n.key_chars, before, after, n.question, n.answer, tokens, needle_position,
                     n.distractors, what=f"sample {index}")
        p.question_key = self.key
        p.meta = dict(n.meta)
        return p


TASKS: Registry[Task] = Registry("task")
for _t in (
    Task("passkey", "passkey", "filler"),
    Task("niah_number", "number", "filler"),
    Task("niah_word", "word", "filler"),
    Task("niah_uuid", "uuid", "filler"),
    Task("niah_number_filings", "number", "filings"),
    Task("niah_word_filings", "word", "filings"),
    Task("niah_uuid_filings", "uuid", "filings"),
    Task("multikey", "number", "filler", keys=4),
):
    TASKS.register(_t.key, _t)


def is_task(key: str | None) -> bool:
    return key is not None and key in TASKS


def check_question(key: str) -> None:
    """UserError unless ``key`` is a filing question or a task (naming both lists, with a close match)."""
    if key in QUESTIONS or key in TASKS:
        return
    every: Registry[str] = Registry("question")  # one list, the registry's own message and close match
    for name in QUESTIONS.names() + TASKS.names():
        every.register(name, name)
    every.get(key)


def question_text(key: str) -> str:
    """What a result records as its question: the filing question's text, or the task's question."""
    return TASKS.get(key).prompt if key in TASKS else QUESTIONS.get(key).prompt


def decode_budget(key: str | None) -> int:
    """Greedy answer tokens for ``key``: the task's own, else the seed's 12."""
    return TASKS.get(key).max_new_tokens if is_task(key) else FILING_TOKENS


def task_prompts(tokenizer, key: str, tokens: int, n: int, needle_position: float, seed: int) -> list[PromptSample]:
    """``n`` prompts of task ``key``, ``tokens`` long, the needle at ``needle_position``."""
    task = TASKS.get(key)
    fmt = PromptFormat(tokenizer, task.instruction)
    return [task.prompt_sample(fmt, seed, i, tokens, needle_position) for i in range(n)]


def question_groups(tokenizer, keys: Sequence[str], tokens: int, n: int, needle_position: float,
                    seed: int) -> list[dict[str, PromptSample]]:
    """Per sample, {key: prompt} for every key: the filing questions share one context (as
    :func:`~retrieval_heads.data.samples.synthetic_samples` builds it), each task has its own."""
    from .samples import synthetic_samples

    for k in keys:
        check_question(k)
    filings = [k for k in keys if k in QUESTIONS]
    shared = synthetic_samples(PromptFormat(tokenizer), filings, tokens, n, needle_position, seed) if filings \
        else [{} for _ in range(n)]
    tasks = {k: task_prompts(tokenizer, k, tokens, n, needle_position, seed) for k in keys if k in TASKS}
    return [{k: (tasks[k][i] if k in tasks else shared[i][k]) for k in keys} for i in range(n)]


def context_families(keys: Sequence[str]) -> list[tuple[str, ...]]:
    """The keys whose prompts share a context: the filing questions together, each task alone."""
    filings = tuple(k for k in keys if k not in TASKS)
    return ([filings] if filings else []) + [(k,) for k in keys if k in TASKS]


QUESTION_KEYS = tuple(QUESTIONS) + tuple(TASKS)  # what --question takes, as the help lists it
