"""Scoring methods, chosen by name: ``METHODS.get("summed_attention")``.

A method has a ``name`` and ``score_batch(model, batch, **needs) -> (B, L, H)`` per-sample scores. What it
needs beyond the model and the prompts it names in ``needs`` (default none): ``"tokenizer"`` (the model's
tokenizer), ``"answers"`` (the model's greedy answers, :class:`retrieval_heads.generation.Answer`, decoded
with ``track_argmax``). ``success_only = True`` marks a method whose scores already count only the samples
the model answers correctly.
"""

from .base import METHODS, Method, needle_mass, register
from . import summed_attention, query_focused, retrieval_score, qrhead  # noqa: F401  (each registers itself)

__all__ = ["METHODS", "Method", "needle_mass", "register"]
