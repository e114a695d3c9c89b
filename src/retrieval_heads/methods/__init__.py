"""Scoring methods, chosen by name: ``METHODS.get("summed_attention")``.

A method is a :class:`~retrieval_heads.methods.base.Method`: a ``name``, ``score_batch(model, batch, ctx)
-> (B, L, H)`` per-sample scores, and what it needs beyond the model and the prompts, named in ``needs`` (a
frozenset, default empty) and passed in one :class:`~retrieval_heads.methods.base.MethodContext`:
``"tokenizer"`` (the model's tokenizer), ``"prompt_format"`` (its :class:`~retrieval_heads.data.prompt.
PromptFormat`), ``"answers"`` (the model's greedy answers, :class:`retrieval_heads.generation.Answer`, one
per prompt of the batch, decoded with ``track_argmax``). ``success_only = True`` marks a method whose scores
already count only the samples the model answers correctly. docs/adding-a-method.md walks through adding one.
"""

import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, RowReads, needle_mass, register, unregister

# Every module of this folder but ``base`` holds a method and registers it on import: the built-in ones in
# this order (the registry's, shown in messages), then any other module, by name.
BUILT_IN = ("summed_attention", "query_focused", "retrieval_score", "qrhead")
for _name in BUILT_IN + tuple(sorted({i.name for i in pkgutil.iter_modules(__path__)} - {"base", *BUILT_IN})):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["METHODS", "Method", "MethodContext", "RowReads", "needle_mass", "register", "unregister"]
