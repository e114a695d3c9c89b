"""Rows from the model's own full attention matrices, for families without transformers' attention interface.

Families such as bloom, gpt_neo, mpt, xglm or openai-gpt compute attention inside their modules; the probe
(:mod:`retrieval_heads.capture`) cannot reach them and refuses them. ``--eager-attentions`` (``detect``,
``sweep``; :func:`enable` in Python) scores them anyway, exactly: within an ``attention_probe`` block every
forward pass runs with ``output_attentions=True``, and a hook on each decoder layer takes that layer's
(B, H, Q, K) weights as it returns them, hands the selected rows (by default the last) to the probe's
callbacks, and drops the matrix before the next layer runs.

The block switches the model itself (its config's ``output_attentions`` and hooks on its layers), so two
threads must not probe one model this way at once.

Memory: one layer's full matrices at a time, ``B x H x Q x K`` floats in the model's dtype (float32: 4 bytes),
on top of the pass itself: for a 16-head model at 8K tokens, 16 x 8192^2 x 4 B = 4 GiB per batch row, where
the probe needs O(H x K). Time: the family's own (eager) attention, as without the flag.

The keys a row may see (for the chance baselines) are those with a non-zero weight: a masked key's weight
is exactly 0 after the family's softmax; an unmasked key whose weight underflows to 0 in float32 (a logit
more than ~100 below the row's largest) would count as masked. Heads cannot be removed on this path
(``ablate`` refuses it): removing a head needs the per-head output the attention interface exposes.

>>> enable(lm.model)                                            # doctest: +SKIP
>>> with attention_probe(lm.model, on_layer) as probe:          # doctest: +SKIP
...     lm.model(input_ids=ids, use_cache=False); probe.end_pass(lm.model)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_ENABLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

FLAG = "--eager-attentions"


def enable(model) -> None:
    """Score ``model`` from its own full attention matrices (see the module's docstring)."""
    _ENABLED[model] = True


def enabled(model) -> bool:
    return bool(_ENABLED.get(model, False))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers: its first ModuleList as long as the config's layer count."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__} has no list of {n} decoder layers")


@contextmanager
def hooked(model, report: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Within this block every forward pass of ``model`` returns attention matrices, and decoder layer i's
    weights (B, H, Q, K) go to ``report(i, weights)`` and are then dropped from its output."""

    def hook(index):
        def after(module, args, output):
            if not isinstance(output, tuple):
                return None
            for j, item in enumerate(output):
                if isinstance(item, torch.Tensor) and item.dim() == 4:  # (B, H, Q, K): the layer's weights
                    report(index, item)
                    return output[:j] + (None,) + output[j + 1:]
            return None
        return after

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(decoder_layers(model))]
    previous = model.config.output_attentions
    model.config.output_attentions = True
    try:
        yield
    finally:
        model.config.output_attentions = previous
        for h in handles:
            h.remove()
