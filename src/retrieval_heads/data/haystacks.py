"""The haystacks of the long-context tasks, as streams of sentence units (each with the whitespace that joins it
to the one before, as :func:`~retrieval_heads.data.prompt.build_prompt` reads them).

- ``filler``: the repeated filler of the passkey test (Mohtashami & Jaggi 2023) and of RULER's noise haystack
  (Hsieh et al. 2024): five plain sentences, over and over, in one paragraph. It holds no digit and none of
  the tasks' key words, so a key is the only thing in the context worth retrieving.
- ``filings``: the filing text of the seed's synthetic samples (:func:`~retrieval_heads.data.filings.make_sample`
  for the same seed and index): sections full of states, years and numbers, as distractors.

>>> filler_units(7)[:2]
['\\n\\nThe grass is green.', ' The sky is blue.']
>>> len(filler_units(7))
7
"""

from __future__ import annotations

from .filings import make_sample
from .prompt import _units

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_FILLER_SENTENCES = FILLER.replace(". ", ".\n").split("\n")
HAYSTACKS = ("filler", "filings")


def filler_units(n: int) -> list[str]:
    """The first ``n`` units of the endless filler paragraph."""
    k = len(_FILLER_SENTENCES)
    return [("\n\n" if i == 0 else " ") + _FILLER_SENTENCES[i % k] for i in range(n)]


def filings_units(seed: int, index: int) -> tuple[list[str], list[str]]:
    """(before, after) units of filing sample ``index`` of ``seed``: the text read backwards from the needle's
    place (nearest last) and the text that follows it; each stream is long enough for 8K-token prompts."""
    fs = make_sample(seed, index)
    return _units(fs.haystack_before), _units(fs.haystack_after)


def haystack_units(kind: str, seed: int, index: int, tokens: int) -> tuple[list[str], list[str]]:
    """(before, after) units of haystack ``kind`` for a prompt of ``tokens``: enough text on each side."""
    if kind == "filler":
        units = filler_units(tokens + 16)  # a unit is at least one token: always enough
        return units, units
    if kind == "filings":
        return filings_units(seed, index)
    raise ValueError(f"unknown haystack {kind!r}; choose from: {', '.join(HAYSTACKS)}")
