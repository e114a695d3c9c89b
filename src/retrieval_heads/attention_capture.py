"""Capturing the attention rows that :mod:`retrieval_heads.attention` saves: one probed pass per prompt for the
union of the top heads of every result that reads that prompt.

- :func:`capture_rows`: the last prompt token's rows of some heads, one probed forward pass per batch;
- :func:`for_results`: the attention files of several results on the same prompts (the methods and span
  kinds of one ``detect``): one pass for all of them;
- :func:`for_unit`: the same for a sweep unit, whose results read one prompt set per question: one pass per
  question and sample, whatever the number of methods and span kinds, where one pass per result was made
  before (a unit of 4 questions with summed_attention on 2 spans, query_focused, retrieval_score and qrhead
  made 20 passes per sample; it now makes 4).

The rows of a pass do not depend on which heads are kept (the probe computes every head's row; the heads
only pick what is copied out), so a result's rows are exactly those of a pass made for it alone (tested).

>>> from retrieval_heads.attention_capture import for_results                         # doctest: +SKIP
>>> files = for_results(lm, [(res.record, res.prompts)], k=10)                        # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .attention import pack, top_heads
from .capture import attention_probe
from .data.prompt import PromptSample
from .errors import UserError
from .methods.base import batches, stack_ids

if TYPE_CHECKING:
    from .models import LoadedModel


@torch.no_grad()
def capture_rows(lm: LoadedModel, prompts: Sequence[PromptSample], heads: Sequence[tuple[int, int]],
                 batch_size: int = 1) -> list[torch.Tensor]:
    """The last prompt token's attention rows of ``heads`` over every position: one (K, N) float32 CPU tensor
    per prompt, rows in the order of ``heads``. One probed forward pass per batch (prompts of one length)."""
    by_layer: dict[int, list[tuple[int, int]]] = defaultdict(list)  # layer -> [(k, head)]
    for k, (layer, head) in enumerate(heads):
        by_layer[layer].append((k, head))
    out: list[torch.Tensor | None] = [None] * len(prompts)
    device = lm.device
    for idx in batches(prompts, batch_size):
        ids = stack_ids([prompts[i] for i in idx], device)  # (B, N)
        rows = torch.zeros(len(idx), len(heads), ids.shape[1])  # (B, K, N)

        def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, 1, N)
            sel = by_layer.get(layer)
            if sel:
                ks, hs = [k for k, _ in sel], [h for _, h in sel]
                rows[:, ks] = probs[:, hs, -1, :].float().cpu()  # (B, k_l, N)

        with attention_probe(lm.model, on_layer) as probe:
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            probe.end_pass(lm.model)  # every layer reported exactly once
        if not bool(torch.isfinite(rows).all()):
            raise UserError("the forward pass produced NaN/inf attention while saving attention rows")
        for j, i in enumerate(idx):
            out[i] = rows[j]
    return out  # type: ignore[return-value]


def for_results(lm: LoadedModel, items: Sequence[tuple[dict, Sequence[PromptSample]]], k: int,
                batch_size: int = 1) -> list[bytes]:
    """Attention files for several results on the same prompts (e.g. several methods of one ``detect``):
    one probed pass per batch for the union of their top-``k`` heads. ``items``: (record, prompts)."""
    if not items:
        return []
    prompts = items[0][1]
    wanted: list[tuple[int, int]] = []
    for record, _ in items:
        wanted += [h for h in top_heads(record, k) if h not in wanted]
    rows = capture_rows(lm, prompts, wanted, batch_size)
    out = []
    for record, ps in items:
        pick = [wanted.index(h) for h in top_heads(record, k)]
        out.append(pack(record, ps, [r[pick] for r in rows], lm.tokenizer))
    return out


def for_unit(lm: LoadedModel, results: Sequence, k: int, batch_size: int = 1) -> None:
    """Set ``r.attention`` of every result of a sweep unit (``DetectResult``s, with ``record`` and ``prompts``):
    the results that read the same prompts (one question's, whichever method or span kind) share one probed
    pass per batch (:func:`for_results`)."""
    by_prompts: dict[tuple[int, ...], list] = {}
    for r in results:
        by_prompts.setdefault(tuple(map(id, r.prompts)), []).append(r)
    for same in by_prompts.values():
        files = for_results(lm, [(r.record, r.prompts) for r in same], k, batch_size)
        for r, data in zip(same, files):
            r.attention = data
