"""The Summed Attention Method: per head, the attention mass the last prompt token puts on the needle span.

An experiment's score is the sum of the per-sample masses over its samples (so it can exceed 1).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..capture import eager_attention, reference_rows
from ..data.prompt import PromptSample
from ..models import input_device
from .base import Method, MethodContext, needle_mass, register, span_mask, stack_ids


class SummedAttention(Method):
    name = "summed_attention"
    shared = True
    measures_spans = True  # needle, answer and fact spans, each with a chance baseline and a control

    def row_span(self, fmt, p: PromptSample) -> tuple[int, int]:
        return len(p.input_ids) - 1, len(p.input_ids)  # the last prompt token

    def from_reads(self, model, real, null, batch, ctx) -> torch.Tensor:
        return real.mass["needle"]  # (B, L, H)

    def score_batch(self, model, batch: Sequence[PromptSample], ctx: MethodContext | None = None) -> torch.Tensor:
        device = input_device(model)
        ids = stack_ids(batch, device)  # (B, N)
        return needle_mass(model, ids, span_mask(batch, device))[..., 0]  # (B, L, H)


register(SummedAttention())


@torch.no_grad()
def seed_reference_scores(model, input_ids: torch.Tensor, needle_start: int, needle_end: int) -> dict[str, float]:
    """The seed's own full version, kept as the slow reference: eager attention, ``output_attentions=True``,
    full N x N matrices, one ``.item()`` per head. input_ids (1, N)."""
    with eager_attention(model):
        outputs = model(input_ids=input_ids, output_attentions=True, use_cache=False, logits_to_keep=1)
    head_scores = {}
    for layer_idx, layer_attn in enumerate(outputs.attentions):  # (1, H, N, N)
        for head_idx in range(layer_attn.size(1)):
            attn_to_needle = layer_attn[0, head_idx, -1, needle_start:needle_end]
            head_scores[f"L{layer_idx}H{head_idx}"] = attn_to_needle.float().sum().item()
    return head_scores


def reference_scores(model, batch: Sequence[PromptSample]) -> torch.Tensor:
    """The same scores as :class:`SummedAttention` through :func:`reference_rows` (eager, full matrices)."""
    device = input_device(model)
    ids = stack_ids(batch, device)
    mask = span_mask(batch, device)
    rows = reference_rows(model, ids)  # L x (B, H, 1, N)
    return torch.stack([(r[:, :, 0, :] * mask[:, None, :]).sum(-1) for r in rows], dim=1)  # (B, L, H)
