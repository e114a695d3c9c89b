"""Scoring methods, chosen by name: ``METHODS.get("summed_attention")``.

A method is a :class:`~retrieval_heads.methods.base.Method`: a ``name``, ``score_batch(model, batch, ctx)
-> (B, L, H)`` per-sample scores, and what it needs beyond the model and the prompts, named in ``needs`` (a
frozenset, default empty) and passed in one :class:`~retrieval_heads.methods.base.MethodContext`:
``"tokenizer"`` (the model's tokenizer), ``"prompt_format"`` (its :class:`~retrieval_heads.data.prompt.
PromptFormat`), ``"answers"`` (the model's greedy answers, :class:`retrieval_heads.generation.Answer`, one
per prompt of the batch, decoded with ``track_argmax``). ``success_only = True`` marks a method whose scores
already count only the samples the model answers correctly.
"""

from .base import METHODS, Method, MethodContext, needle_mass, register
from . import summed_attention, query_focused, retrieval_score, qrhead  # noqa: F401  (each registers itself)

__all__ = ["METHODS", "Method", "MethodContext", "needle_mass", "register"]
