"""User data sets: one JSON object per line.

Schema of a record (extra keys are kept in ``meta`` and ignored otherwise)::

    {"needle":   "Item 1. Business ... incorporated in Delaware ...",   # str, non-empty
     "haystack": ["first document ...", "second document ..."],         # str or list of str, non-empty
     "question": "What state was the company incorporated in?",         # str, or a built-in key: inc_state
     "answer":   "Delaware"}                                             # str, non-empty

The haystack texts are read in order as one stream of paragraphs (split on blank lines); the needle goes in
at a sentence boundary at ``--needle-position`` depth of the tokens used, and the stream is cut to length.
An answer that does not occur in its needle (by the lenient matcher of ``questions.answer_matches``) is a
warning on stderr, not an error: the record still measures attention, but its accuracy is meaningless.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io import JSONError, parse_json, read_regular
from .questions import QUESTIONS, answer_matches


@dataclass
class Record:
    needle: str
    haystack: list[str]
    question: str
    answer: str
    line: int
    meta: dict = field(default_factory=dict)


def load_jsonl(path: str | Path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> list[Record]:
    path = Path(path)
    try:
        raw = read_regular(path)
    except FileNotFoundError:
        raise UserError(f"dataset {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read dataset {path}: {e.strerror or e}") from None
    records: list[Record] = []
    for n, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{n}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except JSONError as e:  # malformed, nested too deep, a number out of range
            raise UserError(f"{where}: malformed JSON ({str(e).removesuffix(' at line 1')})") from None
        records.append(_record(obj, where, n, warn))
    if not records:
        raise UserError(f"dataset {path} has no records")
    return records


def _record(obj, where: str, n: int, warn) -> Record:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a record must be a JSON object")
    missing = [k for k in ("needle", "haystack", "question", "answer") if k not in obj]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    for k in ("needle", "question", "answer"):
        if not isinstance(obj[k], str):
            raise UserError(f"{where}: field {k!r} must be a string")
        if not obj[k].strip():
            raise UserError(f"{where}: field {k!r} is empty")
    hay = obj["haystack"]
    hay = [hay] if isinstance(hay, str) else hay
    if not isinstance(hay, list) or not all(isinstance(h, str) for h in hay):
        raise UserError(f"{where}: field 'haystack' must be a string or a list of strings")
    if not any(h.strip() for h in hay):
        raise UserError(f"{where}: field 'haystack' is empty")
    for k, texts in (("needle", [obj["needle"]]), ("haystack", hay), ("question", [obj["question"]]),
                     ("answer", [obj["answer"]])):
        for t in texts:  # JSON's \ud800 escape gives a lone surrogate: not text, and the tokenizer would fail on it
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"{where}: field {k!r} holds a lone surrogate (\\u{ord(t[e.start]):04x}), which is "
                                "not text") from None
    question = obj["question"]
    if question in QUESTIONS:
        question = QUESTIONS.get(question).prompt
    if not answer_matches(obj["needle"], obj["answer"]):
        warn(f"{where}: the answer {obj['answer']!r} does not occur in its needle")
    meta = {k: v for k, v in obj.items() if k not in ("needle", "haystack", "question", "answer")}
    return Record(obj["needle"], hay, question, obj["answer"], n, meta)


def paragraphs(texts: list[str]) -> list[str]:
    return [p for t in texts for p in t.split("\n\n") if p.strip()]
