"""Retrieval score (Wu et al. 2024): how much of the answer a head copies out of the needle while the model answers.

During greedy decoding (:mod:`retrieval_heads.generation`, with the probe recording each head's most
attended key in every pass) a head *copies* on an answer token when, in the pass that predicted that token,
the key it attends most (argmax of its row over all keys: prompt and answer so far) holds the very token
just generated and lies on the gold answer inside the needle. Wu et al.'s needle *is* the answer; here the
needle is a whole Section 1, so the keys that count are the needle tokens that spell the gold answer
(see :func:`gold_span`): on synthetic samples the span of the very fact the question asks for, the same
span ``summed_attention+answer`` reads (:func:`~retrieval_heads.data.spans.prompt_answer_span`), so that
a head copying "Oregon" from the headquarters sentence is not credited for the incorporation state; on a
user's dataset, the answer's first whole-word occurrence in the needle (case-insensitive). Copying "company"
from the needle is not retrieving the fact. As in the paper, ``R = |g ∩ k| / |k|`` per sample, with ``k`` those gold-answer tokens and ``g``
the ones the head copied (each counted once)::

    score(l, h) = (#gold-answer tokens in the needle that head (l, h) copied) / (#gold-answer tokens in the needle)

so a per-sample score lies in [0, 1]. It is 0 on samples the model answers wrongly (counted on correct
samples only, as Wu et al.) and on samples whose needle does not contain the answer as whole words (e.g.
"Kansas" only inside "Arkansas", "Virginia" only inside "West Virginia": the gold span is then empty). An experiment's score,
like the seed's, is the sum over samples, i.e. over the correctly answered ones; divide by
``extra.n_correct`` for Wu et al.'s average.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.prompt import PromptSample
from ..data.spans import prompt_answer_span
from .base import Method, MethodContext, register


def gold_span(tokenizer, prompt: PromptSample) -> tuple[int, int] | None:
    """Prompt positions [start, end) of the gold answer's tokens in the needle: the asked fact's span on a
    synthetic sample (even when another fact has the same text), else the tokens that overlap the answer's
    first whole-word occurrence in the needle (case-insensitive, see
    :func:`~retrieval_heads.data.spans.whole_word_spans`); None when the needle holds the answer only inside
    longer words ("Kansas" only as part of "Arkansas") or not at all. The one span every method calls "the
    answer" (:func:`~retrieval_heads.data.spans.prompt_answer_span`)."""
    return prompt_answer_span(tokenizer, prompt)


def retrieval_hits(prompt_ids: torch.Tensor, span: tuple[int, int], answer_ids: Sequence[int],
                   argmax: torch.Tensor) -> torch.Tensor:
    """(L, H): how many distinct positions of ``span`` each head copied from.

    prompt_ids (N,); argmax (T, L, H), the key each head attended most when predicting answer token t. A
    head copies from position j on token t when argmax[t] == j, j lies in ``span`` and prompt_ids[j] is the
    token generated at t.
    """
    N = prompt_ids.shape[0]
    T = len(answer_ids)
    if T == 0:
        return torch.zeros(argmax.shape[1:], dtype=torch.long)
    a = argmax[:T]  # (T, L, H)
    token_there = prompt_ids[a.clamp(max=N - 1)]  # (T, L, H) id at the attended key (if it is a prompt key)
    generated = torch.tensor(list(answer_ids), dtype=prompt_ids.dtype)[:, None, None]  # (T, 1, 1)
    copies = (a >= span[0]) & (a < span[1]) & (token_there == generated)  # (T, L, H)
    positions = torch.arange(span[0], span[1])  # (P,)
    at = copies[..., None] & (a[..., None] == positions)  # (T, L, H, P)
    return at.any(0).sum(-1)  # (L, H)


class RetrievalScore(Method):
    name = "retrieval_score"
    needs = frozenset({"answers", "tokenizer"})  # answers decoded with track_argmax=True
    success_only = True  # scores are always counted on correct samples only
    shared = True  # reads no rows: the answers, decoded from the shared context's cache

    def from_reads(self, model, real, null, batch, ctx) -> torch.Tensor:
        return self.score_batch(model, batch, ctx)

    def score_batch(self, model, batch: Sequence[PromptSample], ctx: MethodContext | None = None) -> torch.Tensor:
        """Per-sample scores (B, L, H) from answers decoded with ``track_argmax``."""
        from ..models import input_device

        ctx = self.check_context(ctx)
        answers, tokenizer = ctx.answers, ctx.tokenizer
        out = []
        for p, a in zip(batch, answers):
            if a.argmax is None:
                raise ValueError("retrieval_score needs answers decoded with track_argmax=True")
            span = gold_span(tokenizer, p)
            if span is None or not a.correct:
                out.append(torch.zeros(a.argmax.shape[1:]))  # (L, H)
                continue
            hits = retrieval_hits(torch.tensor(p.input_ids), span, a.ids, a.argmax)  # (L, H)
            out.append(hits.float() / (span[1] - span[0]))
        return torch.stack(out).to(input_device(model))  # (B, L, H)


register(RetrievalScore())


@torch.no_grad()
def reference_argmax(model, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> torch.Tensor:
    """The slow reference for what decoding records: eager attention with ``output_attentions=True``, step by
    step over a KV cache feeding the given answer tokens; (T, L, H) position of the argmax of each head's
    full row per step (its keys are the last ones of the sequence so far)."""
    from ..capture import eager_attention
    from ..hf import cache_kwarg, input_device, returned_cache

    rows = []
    with eager_attention(model):
        dev = input_device(model)
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=dev), use_cache=True, output_attentions=True)
        for t in range(len(answer_ids)):
            seen = len(prompt_ids) + t
            rows.append(torch.stack([a[0, :, -1, :].float().argmax(-1).cpu() + seen - a.shape[-1]
                                     for a in out.attentions]))  # (L, H)
            if t + 1 < len(answer_ids):
                out = model(input_ids=torch.tensor([[answer_ids[t]]], device=dev), use_cache=True,
                            output_attentions=True, **{cache_kwarg(model): returned_cache(out)})
    return torch.stack(rows)  # (T, L, H)
