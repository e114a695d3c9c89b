"""What a result's fields claim about the experiment, checked against its provenance.

A result names its experiment by ``model_key`` and ``question``; its ``provenance`` says what produced it
(the model's source, the dataset's file and hash). Both are covered by the checksum, but a file edited with
its checksum recomputed could claim a built-in model or question that it was not made with, and pass for
that experiment's result wherever the key is trusted (``report`` groups by it, ``ablate`` rebuilds the
built-in question's samples from it). :func:`claim_problem` finds such a contradiction:

- a built-in model key (``smollm2``, ``instruct``, ``base``) with a recorded source other than that key, or
  a recorded built-in source under another key (a local folder named like a key is filed as ``KEY+local``);
- a built-in question (a filing question or a task) whose samples came from a dataset file (a dataset's
  results are filed under the file's name, ``STEM`` or ``STEM+dataset``).

Unknown (null) fields, and results without provenance (older versions), are not compared.

>>> claim_problem({"model_key": "smollm2", "question": "inc_state",
...                "provenance": {"model": {"source": "/tmp/tiny"}, "dataset": None}})
"model_key 'smollm2' is a built-in model, but provenance.model.source is '/tmp/tiny'"
"""

from __future__ import annotations

from typing import Any

BUILTIN_MODELS = ("smollm2", "instruct", "base")  # models.MODELS's keys, without importing torch for them


def claim_problem(record: dict[str, Any]) -> str | None:
    """The first contradiction between a result's ``model_key`` / ``question`` and its ``provenance``, or None."""
    prov = record.get("provenance")
    if not isinstance(prov, dict):
        return None
    key, source = record.get("model_key"), (prov.get("model") or {}).get("source")
    if source is not None:
        if key in BUILTIN_MODELS and source != key:
            return f"model_key {key!r} is a built-in model, but provenance.model.source is {str(source)[:80]!r}"
        if source in BUILTIN_MODELS and key != source:
            return f"provenance.model.source is the built-in model {source!r}, but model_key is {str(key)[:80]!r}"
    data = prov.get("dataset")
    if isinstance(data, dict):
        from .data.questions import QUESTIONS
        from .data.tasks import is_task

        q = record.get("question")
        if isinstance(q, str) and (q in QUESTIONS or is_task(q)):
            return (f"question {q!r} is a built-in question, but provenance.dataset says its samples came from "
                    f"{str(data.get('file'))[:80]!r}")
    return None
