"""The Summed Attention Method: per head, the attention mass the last prompt token puts on the needle span.

An experiment's score is the sum of the per-sample masses over its samples (so it can exceed 1).
"""

from __future__ import annotations

from typing import Sequence

import torch

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
