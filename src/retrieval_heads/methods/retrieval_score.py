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
like every method's, is the sum over samples, i.e. over the correctly answered ones; divide by
``extra.n_correct`` for Wu et al.'s average.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.prompt import PromptSample
from ..data.spans import gold_span
from .base import Method, MethodContext, register


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
