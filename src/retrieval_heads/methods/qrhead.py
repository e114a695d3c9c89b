"""QRHead's score (Zhang et al. 2025, "Query-Focused Retrieval Heads"), as its head-detection code computes it,
with the needle as the one gold document.

QRHead scores a head on a prompt of documents followed by a query part (its closing instruction, "Query:
{query}" and the chat template's end of turn and assistant header). Transposed to our prompts, per sample
and head (l, h):

1. Query tokens ``Q``: the prompt's suffix after its leading blank line, to the last prompt token, i.e.
   "Question: {question}", "Answer with the fact only.", the end of the user turn and the assistant header
   (positions ``context_end + len("\\n\\n" ids) .. N-1``; the blank line is kept out, as QRHead keeps out the
   separator before its instruction). For every key k, ``a(k)`` = mean over q in ``Q`` of the attention
   probability of row q on key k.
2. Calibration: ``a0(k)``, the same with the content-free question "N/A" in place of the question, over the
   very same context ids (the suffix rebuilt; its own query tokens, found the same way).
3. Per needle token k: ``c(k) = a(k) - a0(k)``.
4. Outlier filter: over the needle's tokens, ``t = mean(c) - 2 * std(c)`` (std with Bessel's correction,
   torch's default, as in QRHead's code); the tokens with ``c(k) <= t`` are dropped, and
   ``score(l, h) = sum of c(k) over the needle tokens with c(k) > t``.

A per-sample score lies in [-1, 1]. An experiment's score is the sum over samples, like every method's (QRHead's
QRScore is the mean over instances: divide by ``samples_processed``). A one-token needle has no standard
deviation: its threshold is NaN and it scores 0, as in QRHead's code. Differences from ``query_focused``:
that method averages over the question's own tokens only, sums the mass over the needle (no per-token
calibration and no filter) and subtracts the content-free question's mass afterwards.

:func:`needle_key_attention` reads the rows of ``Q`` through the attention probe (memory O(B x L x H x
needle), never the N x N matrices).

``qrhead`` keeps the chat template's whole assistant header in ``Q``, the "\\n" after "assistant" included
(the last prompt token, the row the model answers from). QRHead's own query ends at "assistant": method
``qrhead_exact`` drops the whitespace-only tokens that end the prompt after a chat template's assistant
header (:func:`query_end`); everything else is the same. On a prompt without a chat template nothing is
dropped and the two agree. ``bench/qrhead_exact.py`` measures how far apart they are (docs/methods.md).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..capture import attention_probe
from ..data.prompt import PromptFormat, PromptSample
from .base import Method, MethodContext, batches, check_finite, null_prompt, register, stack_ids


def query_start(fmt: PromptFormat, p: PromptSample) -> int:
    """First position of QRHead's query tokens in ``p``: the suffix after its leading blank-line ids."""
    sep = fmt.separator
    suffix = p.input_ids[p.context_end :]
    return p.context_end + (len(sep) if suffix[: len(sep)] == sep else 0)


def query_end(fmt: PromptFormat, p: PromptSample) -> int:
    """End (exclusive) of QRHead's own query in ``p``: the prompt's end, less the whitespace-only tokens
    ("\\n") that follow a chat template's assistant header; the prompt's end without a chat template. At
    least one row is kept."""
    end = len(p.input_ids)
    if not fmt.chat:
        return end
    start = query_start(fmt, p)
    while end - 1 > start and not fmt.tokenizer.decode([p.input_ids[end - 1]]).strip():
        end -= 1
    return end


def needle_tokens(batch: Sequence[PromptSample], width: int) -> torch.Tensor:
    """(B, width) bool: True where j < the prompt's needle length (needle token j is key needle_start + j)."""
    return torch.arange(width)[None, :] < torch.tensor([p.needle_end - p.needle_start for p in batch])[:, None]


@torch.no_grad()
def needle_key_attention(model, batch: Sequence[PromptSample], starts: Sequence[int], width: int,
                         ends: Sequence[int] | None = None) -> torch.Tensor:
    """(B, L, H, width): per needle token k (k = needle_start + j, j < width), the mean over each prompt's query
    rows ``starts[b] .. ends[b] - 1`` (default: to the last, N-1) of the attention on key k; 0 where j >= the
    prompt's needle length."""
    from ..models import input_device

    device = input_device(model)
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    ids = stack_ids(batch, device)  # (B, N)
    B, N = ids.shape
    lo = min(starts)
    positions = torch.arange(lo, N, device=device)  # (S,)
    w = torch.zeros(B, N - lo)  # (B, S): 1/|Q| on each prompt's own query rows
    for i, s in enumerate(starts):
        e = N if ends is None else ends[i]
        w[i, s - lo : e - lo] = 1.0 / (e - s)
    keys = (torch.tensor([p.needle_start for p in batch])[:, None] + torch.arange(width)).clamp(max=N - 1)  # (B, P)
    valid = needle_tokens(batch, width)  # (B, P)
    out = torch.zeros(B, L, H, width, device=device)  # (B, L, H, P)

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, S, K)
        mean = torch.einsum("bhsk,bs->bhk", probs, w.to(probs.device))  # (B, H, K)
        at = mean.gather(-1, keys.to(probs.device)[:, None, :].expand(-1, probs.shape[1], -1))  # (B, H, P)
        out[:, layer] = (at * valid.to(probs.device)[:, None, :]).to(out.device)

    with attention_probe(model, on_layer, query_positions=positions) as probe:
        result = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        probe.end_pass(model)  # every layer reported exactly once
    check_finite(out, result.logits)
    return out


def filtered_sum(c: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """QRHead's outlier filter. c (B, L, H, P) calibrated per-token scores, valid (B, P) the needle's tokens.
    Returns (B, L, H): the sum of c over valid tokens with c > mean - 2 * std (Bessel-corrected, over the
    valid tokens of each (b, l, h))."""
    m = valid[:, None, None, :].to(c.dtype)  # (B, 1, 1, P)
    n = m.sum(-1)  # (B, 1, 1)
    mean = (c * m).sum(-1) / n  # (B, L, H)
    std = ((((c - mean[..., None]) ** 2) * m).sum(-1) / (n - 1)).sqrt()  # (B, L, H); NaN for one token
    keep = (c > (mean - 2 * std)[..., None]) & valid[:, None, None, :]  # (B, L, H, P)
    return (c * keep).sum(-1)  # (B, L, H)


class QRHead(Method):
    name = "qrhead"
    needs = frozenset({"prompt_format"})
    shared = True
    reads_null = True
    reads_needle_keys = True

    def row_span(self, fmt, p: PromptSample) -> tuple[int, int]:
        return query_start(fmt, p), self.query_end(fmt, p)

    def query_end(self, fmt: PromptFormat, p: PromptSample) -> int:
        return len(p.input_ids)

    def from_reads(self, model, real, null, batch, ctx) -> torch.Tensor:
        valid = needle_tokens(batch, real.keys.shape[-1])  # (B, P)
        return filtered_sum(real.keys - null.keys, valid.to(real.keys.device))  # (B, L, H)

    def score_batch(self, model, batch: Sequence[PromptSample], ctx: MethodContext | None = None) -> torch.Tensor:
        """Per-sample scores (B, L, H), see the module's docstring."""
        fmt = self.check_context(ctx).prompt_format
        width = max(p.needle_end - p.needle_start for p in batch)
        real = needle_key_attention(model, batch, [query_start(fmt, p) for p in batch], width,
                                    [self.query_end(fmt, p) for p in batch])  # (B, L, H, P)
        null = [null_prompt(fmt, p) for p in batch]
        calib = torch.zeros_like(real)  # (B, L, H, P)
        for idx in batches(null, len(null)):  # null prompts of one batch differ in length only if their contexts do
            group = [null[i] for i in idx]
            calib[idx] = needle_key_attention(model, group, [query_start(fmt, p) for p in group], width,
                                              [self.query_end(fmt, p) for p in group]).to(calib.dtype)
        return filtered_sum(real - calib, needle_tokens(batch, width).to(real.device))  # (B, L, H)


class QRHeadExact(QRHead):
    """QRHead's query exactly: it ends at "assistant" (see :func:`query_end`)."""

    name = "qrhead_exact"

    def query_end(self, fmt: PromptFormat, p: PromptSample) -> int:
        return query_end(fmt, p)


register(QRHead())
register(QRHeadExact())
