"""Query-focused score (after QRHead, simplified): attention from the question's tokens to the needle, calibrated.

Per sample and head::

    score(l, h) = mean over question tokens q of mass(q -> needle)  -  the same for a content-free question

where mass is the attention the query row puts on the needle span (summed over the needle's tokens), the
question's tokens are its own tokens inside the prompt (``PromptSample.question_start:question_end``, the
text between "Question: " and the answer instruction), and the content-free question is "N/A" asked over
the very same context (same ids up to the suffix), its mean taken over its own tokens ("N/A"). The
calibration removes what a head pays to the needle whatever is asked (position, recency). A per-sample
score lies in [-1, 1]; an experiment's score is the sum over samples.

This is not QRHead's recipe, in two ways: QRHead averages over its whole query part (instruction, query and
the chat template's end of turn, to the last token), not over the question's own tokens; and it calibrates
each needle token's score and drops the tokens scoring at or below mean - 2 std (over the needle's tokens)
before summing (an outlier filter). Registered method ``qrhead`` (:mod:`retrieval_heads.methods.qrhead`) computes QRHead's recipe.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.prompt import PromptSample
from .base import Method, MethodContext, batches, needle_mass, null_prompt, register, span_mask, stack_ids

def question_rows(batch: Sequence[PromptSample], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions covering every prompt's question span, and (B, S) weights 1/len on each prompt's own
    question rows (0 elsewhere), so that a weighted sum over rows is the mean over the question."""
    for p in batch:
        if p.question_start is None or p.question_end is None or p.question_end <= p.question_start:
            raise ValueError("query_focused needs prompts that record their question span")
    lo, hi = min(p.question_start for p in batch), max(p.question_end for p in batch)
    positions = torch.arange(lo, hi, device=device)  # (S,)
    w = torch.zeros(len(batch), hi - lo, device=device)  # (B, S)
    for i, p in enumerate(batch):
        w[i, p.question_start - lo : p.question_end - lo] = 1.0 / (p.question_end - p.question_start)
    return positions, w


def question_mass(model, batch: Sequence[PromptSample]) -> torch.Tensor:
    """(B, L, H): mean over each prompt's question tokens of the attention mass on its needle."""
    from ..models import input_device

    device = input_device(model)
    ids = stack_ids(batch, device)  # (B, N)
    positions, w = question_rows(batch, device)
    mass = needle_mass(model, ids, span_mask(batch, device), positions)  # (B, L, H, S)
    return (mass * w.to(mass.device)[:, None, None, :]).sum(-1)  # (B, L, H)


class QueryFocused(Method):
    name = "query_focused"
    needs = frozenset({"prompt_format"})
    shared = True
    reads_null = True

    def row_span(self, fmt, p: PromptSample) -> tuple[int, int]:
        question_rows([p], "cpu")  # checks that the prompt records its question span
        return p.question_start, p.question_end

    def from_reads(self, model, real, null, batch, ctx) -> torch.Tensor:
        return real.mass["needle"] - null.mass["needle"]  # (B, L, H)

    def score_batch(self, model, batch: Sequence[PromptSample], ctx: MethodContext | None = None) -> torch.Tensor:
        fmt = self.check_context(ctx).prompt_format
        real = question_mass(model, batch)  # (B, L, H)
        null = [null_prompt(fmt, p) for p in batch]
        calib = torch.zeros_like(real)  # (B, L, H)
        for idx in batches(null, len(null)):  # null prompts of one batch differ in length only if their contexts do
            calib[idx] = question_mass(model, [null[i] for i in idx]).to(calib.dtype)
        return real - calib


register(QueryFocused())
