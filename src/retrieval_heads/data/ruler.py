"""RULER-style needles (Hsieh et al. 2024): "One of the special magic numbers for {query} is: {value}."

- the value is a 7-digit number (``number``), an English word (``word``) or a UUID (``uuid``); the query is
  an adjective-noun pair (``quiet-harbor``) naming the needle;
- single needle: one such sentence, asked by its query;
- multi-key (``keys`` > 1): as many sentences of one value kind, each with its own query and value, the
  others placed at random depths in the haystack; one is asked (the needle), the rest are distractors.

Queries and values come from the word lists below (no value word is in the filler or the filing text; the
query words are not in the filler), drawn from ``random.Random`` of the task, seed and sample index: sample ``i`` is the same whatever
the number of samples, and the keys of one sample are all distinct.

>>> n = ruler_needle(random.Random("x:0:0"), "number", keys=4)
>>> n.text[n.key_chars[0] : n.key_chars[1]] == n.answer, len(n.distractors)
(True, 3)
"""

from __future__ import annotations

import random
import uuid

from .passkey import Needle

KINDS = ("number", "word", "uuid")
_PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}
ADJECTIVES = ["quiet", "amber", "brisk", "silver", "hollow", "gentle", "crimson", "distant", "frozen", "golden",
              "humble", "ivory", "jagged", "lively", "mellow", "narrow", "polished", "rapid", "scarlet", "tidy",
              "velvet", "wooden", "ancient", "bitter", "curious", "dusty", "eager", "fragile", "gloomy", "hasty"]
NOUNS = ["harbor", "lantern", "meadow", "canyon", "pebble", "orchard", "violin", "glacier", "compass", "falcon",
         "island", "kettle", "ladder", "marble", "nickel", "oyster", "parrot", "quarry", "ribbon", "saddle",
         "thimble", "umbrella", "walnut", "anchor", "blossom", "candle", "dolphin", "feather", "garden", "helmet"]
VALUE_WORDS = ["apricot", "bicycle", "cactus", "diamond", "elephant", "fountain", "giraffe", "hammock",
               "igloo", "jasmine", "kangaroo", "lobster", "mango", "nutmeg", "octopus", "penguin", "raccoon",
               "sapphire", "tortoise", "volcano", "waffle", "zeppelin", "biscuit", "coconut", "dragon",
               "emerald", "flamingo", "gondola", "hazelnut", "jellyfish"]


def instruction(kind: str) -> str:
    p = _PLURAL[kind]
    return (f"Some special magic {p} are hidden within the following text. Make sure to memorize them. "
            f"I will quiz you about the {p} afterwards.")


def question_template(kind: str) -> str:
    return f"What is the special magic {kind} for {{query}} mentioned in the provided text?"


def _value(r: random.Random, kind: str) -> str:
    if kind == "number":
        return str(r.randrange(1_000_000, 10_000_000))
    if kind == "word":
        return r.choice(VALUE_WORDS)
    return str(uuid.UUID(int=r.getrandbits(128), version=4))


def _sentence(kind: str, query: str, value: str) -> tuple[str, tuple[int, int]]:
    head = f"One of the special magic {_PLURAL[kind]} for {query} is: "
    return f"{head}{value}.", (len(head), len(head) + len(value))


def ruler_needle(r: random.Random, kind: str, keys: int = 1) -> Needle:
    """The asked needle, and ``keys - 1`` distractor needles of the same kind at random depths."""
    if kind not in KINDS:
        raise ValueError(f"unknown key kind {kind!r}; choose from: {', '.join(KINDS)}")
    pairs = r.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], keys)
    values: list[str] = []
    while len(values) < keys:  # distinct values, so only the asked one answers the question
        v = _value(r, kind)
        if v not in values:
            values.append(v)
    text, chars = _sentence(kind, pairs[0], values[0])
    distractors = tuple((round(r.uniform(0.05, 0.95), 4), _sentence(kind, q, v)[0])
                        for q, v in zip(pairs[1:], values[1:]))
    meta = {"query": pairs[0], "key": values[0]} | ({"distractor_keys": values[1:]} if keys > 1 else {})
    return Needle(text, chars, question_template(kind).format(query=pairs[0]), values[0], distractors, meta)
