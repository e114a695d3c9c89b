"""The passkey task (Mohtashami & Jaggi 2023): a five-digit key, stated twice in one short passage, hidden in
the repeated filler; the question asks for it.

The needle is ``"The pass key is {key}. Remember it. {key} is the pass key."``; its key span (the answer span
the methods score) is the first statement of the key. The key is drawn from ``random.Random`` of the task,
seed and sample index, so sample ``i`` is the same whatever the number of samples.

>>> n = passkey_needle(random.Random("passkey:0:0"))
>>> n.text[n.key_chars[0] : n.key_chars[1]] == n.answer
True
>>> n.text.count(n.answer)
2
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.")
QUESTION = "What is the pass key?"


@dataclass(frozen=True)
class Needle:
    """One sample's needle: its text, the key's character span in it, the question and the gold answer,
    and any distractor sentences as (depth, text)."""

    text: str
    key_chars: tuple[int, int]
    question: str
    answer: str
    distractors: tuple = field(default=())
    meta: dict = field(default_factory=dict)


def passkey_needle(r: random.Random) -> Needle:
    key = str(r.randrange(10000, 100000))
    head = "The pass key is "
    text = f"{head}{key}. Remember it. {key} is the pass key."
    return Needle(text, (len(head), len(head) + len(key)), QUESTION, key, meta={"key": key})
