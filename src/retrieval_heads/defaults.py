"""What ``retrieval-heads detect`` (and :func:`~retrieval_heads.experiments.detect`) runs when a setting is
not given, per question.

- No question given: the ``passkey`` task (:mod:`retrieval_heads.data.tasks`) on the ``answer`` span, answers
  decoded: the experiment at which the embedded model answers and named heads beat the control, chosen by
  the rule stated, before measuring, in ``bench/results/default_experiment.md`` (measured by
  ``bench/default_task.py``: ``bench/results/default_task.md``).
- A filing question (``--question inc_state``, ...) or ``--dataset``: the seed's experiment as it was, 512
  tokens, 16 samples, the ``needle`` span, answers only when asked for (the filing rule of the same page).
- Another long-context task: the passkey default's length, samples, span and answers.

Importable without torch (the CLI reads these to build its help before anything heavy is loaded).

>>> DEFAULT_MAX_NEW_TOKENS
12
>>> settings_for("inc_state", dataset=False)
Settings(tokens=512, samples=16, span='needle', answers=False)
>>> settings_for(DEFAULT_QUESTION, dataset=False).span
'answer'
"""

from __future__ import annotations

from dataclasses import dataclass

# Longest greedy answer, in tokens, of a filing question or a dataset: detect --answers, retrieval_score, sweep,
# ablate. The built-in answers are a state, a year or a count (at most 5 tokens on SmolLM2's tokenizer); Wu et
# al.'s code decodes up to 50. bench/peers.py measures what 50 would change. A long-context task decodes its
# own budget (retrieval_heads.data.tasks.decode_budget).
DEFAULT_MAX_NEW_TOKENS = 12


@dataclass(frozen=True)
class Settings:
    tokens: int
    samples: int
    span: str
    answers: bool


DEFAULT_QUESTION = "passkey"
FILING = Settings(tokens=512, samples=16, span="needle", answers=False)
TASK = Settings(tokens=1024, samples=8, span="answer", answers=True)


def settings_for(question: str | None, dataset: bool) -> Settings:
    """The defaults of an experiment on ``question`` (a dataset's: the filing experiment's)."""
    from .data.tasks import is_task

    return TASK if not dataset and is_task(question) else FILING
