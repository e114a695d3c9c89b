"""One prefill for several questions: score the questions that share a context on one cached context pass.

The four built-in questions ask about the same filing, and :func:`~retrieval_heads.data.samples.synthetic_samples`
builds their prompts so that ``input_ids[:context_end]`` (template prefix, haystack, needle) is identical for
all of them; only the suffix (question, answer hint, generation prompt) differs. Instead of one full forward
pass per question, :func:`shared_reads` (which :mod:`retrieval_heads.onepass` calls for every method)

1. runs the context once with a KV cache (a ``DynamicCache`` laid out for the model, passed as ``cache=``;
   ``past_key_values=`` before transformers deprecated it), under the probe's attention function but with no
   row callback: the cached keys and values are computed exactly as in a full pass, and no attention row is
   built for the context;
2. repeats each sample's cache once per question (``cache.batch_repeat_interleave(Q)``) and runs all the
   suffixes in one pass on it, right-padded to the longest (under causal attention no real token sees the
   padding that follows it), with the probe active on the suffix rows the methods read (e.g. the last
   token's row, which spans every key it attends to, cached + new): their mass on each span is measured. The
   cache is then dropped; nothing is cropped or rolled back.

Why this equals separate full runs: causal attention makes every context position's keys and values
independent of what follows, and the cache hands the suffix the same keys at the same positions (RoPE and
learned position ids continue from ``cache.get_seq_length()``). Tests hold it to each method's own
``score_batch`` on each full prompt within 1e-5 in float32 (Llama, Mistral with a sliding
window shorter than the prompt, Qwen2/3, Gemma2 with soft-capping and alternating windows, Phi3, GPT-2, and
SmolLM2). Memory: the context's keys and values, once per question, during the suffix pass.

Key alignment: a layer may hand the probe fewer keys than the prompt has (a sliding-window layer's cache
keeps its last ``window - 1`` keys, so it returns ``window - 1 + suffix`` keys). The keys are always the
*last* ones, so the needle mask is aligned on the right: key ``j`` of ``K`` is prompt position ``N - K + j``;
positions before the window get no attention anyway.

Length bookkeeping: ``--tokens`` counts every id of the *longest* question's prompt. The shared context gets
exactly ``tokens - reserve`` ids, ``reserve`` being the longest suffix of the four built-in questions (see
:mod:`retrieval_heads.data.prompt`); so the context, the needle's span and its depth are identical for every
question, and a shorter question's prompt is shorter than ``--tokens`` by the difference of the suffix
lengths (a few tokens, always < 64). Because the reserve always covers all four questions, a sample's ids
do not depend on which questions are asked together, and the shared part is the context only (never a
common start of the suffixes), so neither do the scores, up to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .capture import attention_probe
from .data.prompt import PromptSample
from .hf import cache_kwarg, check_finite


def _new_cache(model):
    """An empty dynamic cache laid out for ``model`` (sliding-window layers where its config has them); None
    when some layer is of another kind (e.g. linear attention), whose state the suffix pass cannot share."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    return cache if all(isinstance(layer, DynamicLayer) for layer in cache.layers) else None


def can_share(model) -> bool:
    """Whether ``model``'s cache holds only keys and values, so that a context pass can be shared."""
    return _new_cache(model) is not None


def shared_length(group: Mapping[str, PromptSample], questions: Sequence[str], where: str = "sample") -> int:
    """``context_end`` of the prompts of ``questions``, after checking that they share their ids up to it
    and their needle span, and that each has a suffix. Raises ValueError otherwise.

    The shared part is the context only, never a common start of the suffixes: it then does not depend on
    which questions are scored together, and neither do the scores."""
    first = group[questions[0]]
    end = first.context_end
    for q in questions:
        p = group[q]
        if p.context_end != end or p.input_ids[:end] != first.input_ids[:end] or \
                (p.needle_start, p.needle_end) != (first.needle_start, first.needle_end):
            raise ValueError(f"{where}: questions {questions[0]!r} and {q!r} do not share their context")
        if not (0 <= p.needle_start < p.needle_end <= end < len(p.input_ids)):
            raise ValueError(f"{where}: the needle of {q!r} is not inside the shared context, or no suffix follows")
    return end


def context_groups(groups: Sequence[Mapping[str, PromptSample]], questions: Sequence[str]) -> list[tuple[int, list[int]]]:
    """(shared length, sample indices) of samples that can be batched: equal shared length and, per
    question, equal suffix length (no padding between samples). First-seen order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        end = shared_length(g, questions, f"sample {i}")
        shape = (end,) + tuple(len(g[q].input_ids) - end for q in questions)
        by_shape.setdefault(shape, []).append(i)
    return [(shape[0], idx) for shape, idx in by_shape.items()]


@dataclass
class Reads:
    """What :func:`shared_reads` measured for one suffix: per row set j (a weighted mean of the suffix's query
    rows), the attention mass on each span and its chance baseline, and the attention on chosen keys."""

    mass: torch.Tensor  # (B, L, H, J, M) float32
    baseline: torch.Tensor  # (B, L, H, J, M) float32: the same rows under uniform attention over visible keys
    keys: torch.Tensor | None  # (B, L, H, J, P) float32: attention on each chosen context key (0 outside a window)


@torch.no_grad()
def context_cache(model, context_ids: torch.Tensor):
    """The KV cache of one pass over the context (B, C), under the probe's attention function with no rows
    built; None for a model whose cache holds more than keys and values (see :func:`_new_cache`)."""
    cache = _new_cache(model)
    if cache is None:
        return None
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    with attention_probe(model, None) as probe:  # same attention function as the suffix passes; no rows
        model(input_ids=context_ids, **kw)
        probe.end_pass(model)
    if cache.get_seq_length() != context_ids.shape[1]:
        raise RuntimeError(f"{type(model).__name__} did not fill the cache it was given")
    return cache


def fork(cache):
    """A cache that starts as ``cache`` and grows on its own, sharing its tensors (no copy): a dynamic layer's
    update and ``batch_repeat_interleave`` make new tensors, so the original keeps its length and batch."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


@torch.no_grad()
def shared_reads(
    model, context_ids: torch.Tensor, suffix_ids: Sequence[torch.Tensor], rows: Sequence[torch.Tensor],
    masks: torch.Tensor, keys: torch.Tensor | None = None, cache=None,
) -> list[Reads]:
    """Every suffix's rows from one pass over the context: what several methods read from one prefill.

    context_ids (B, C); suffix_ids[q] (B, n_q); rows[q] (B, J, n_q) weights over suffix q's positions (row set
    j of suffix q is the weighted sum of those query rows; a one-hot on n_q - 1 is the last token, 1/len on a
    range its mean); masks (B, M, C) 0/1 spans over the context; keys (B, P) context positions whose attention
    is read (or None). ``cache``: the context's cache from :func:`context_cache` (it is forked, not changed);
    None runs the context pass here. All suffixes run as one pass on the context's keys and values repeated
    once per suffix, right-padded to the longest (under causal attention no real row sees the padding).
    Returns one :class:`Reads` per suffix. Raises NumericalError naming the first layer whose attention is not
    finite, UserError when a layer did not report exactly once, RuntimeError for a model without a plain
    key/value cache (call :func:`context_cache` first to know).
    """
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    B, C = context_ids.shape
    M = masks.shape[1]
    Q = len(suffix_ids)
    J = rows[0].shape[1]
    if cache is None:
        cache = context_cache(model, context_ids)
        if cache is None:
            raise RuntimeError(f"{type(model).__name__} keeps more than keys and values in its cache")
    cache = fork(cache)
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}

    # Row r = b * Q + q is sample b's suffix q, right-padded to the longest (n).
    lengths = [s.shape[1] for s in suffix_ids]
    n = max(lengths)
    padded = torch.stack(
        [torch.cat([s, s[:, -1:].expand(B, n - s.shape[1])], dim=1) for s in suffix_ids], dim=1
    ).reshape(B * Q, n)  # (B*Q, n)
    w_all = torch.stack([torch.nn.functional.pad(r.float().cpu(), (0, n - r.shape[2])) for r in rows], dim=1)
    w_all = w_all.reshape(B * Q, J, n)  # (B*Q, J, n)
    picked = torch.nonzero(w_all.abs().sum((0, 1))).flatten()  # (S,) the query rows any row set reads
    query_positions = picked.clone()
    W = w_all[:, :, picked]  # (B*Q, J, S)
    cache.batch_repeat_interleave(Q)  # each sample's keys and values, once per suffix
    weights = torch.cat([masks.float(), masks.new_zeros(B, M, n).float()], dim=2)  # (B, M, C + n)
    weights = weights.repeat_interleave(Q, dim=0)[:, None, None]  # (B*Q, 1, 1, M, C + n)
    P = 0 if keys is None else keys.shape[1]
    at_keys = None if keys is None else keys.repeat_interleave(Q, dim=0)  # (B*Q, P) positions in the prompt
    dev = masks.device
    mass = torch.zeros(B * Q, L, H, J, M, device=dev)  # (B*Q, L, H, J, M)
    baseline = torch.zeros(B * Q, L, H, J, M, device=dev)  # (B*Q, L, H, J, M)
    got_keys = torch.zeros(B * Q, L, H, J, P, device=dev) if keys is not None else None  # (B*Q, L, H, J, P)

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs (B*Q, H, S, K): the last K keys
        combined = torch.einsum("rjs,rhsk->rhjk", W.to(probs.device), probs)  # (B*Q, H, J, K)
        K = probs.shape[-1]
        w = weights[..., C + n - K :].to(probs.device)  # (B*Q, 1, 1, M, K)
        for j in range(J):  # the product and sum of needle_mass, one row set at a time
            mass[:, layer, :, j] = (combined[:, :, j, None, :] * w[:, :, 0]).sum(-1).to(dev)  # (B*Q, H, M)
        if at_keys is not None:
            idx = at_keys.to(probs.device) - (C + n - K)  # (B*Q, P) index among this layer's keys
            inside = (idx >= 0) & (idx < K)
            g = combined.gather(-1, idx.clamp(0, K - 1)[:, None, None, :].expand(-1, H, J, -1))  # (B*Q, H, J, P)
            got_keys[:, layer] = (g * inside[:, None, None, :]).to(dev)

    def on_visible(layer: int, allowed: torch.Tensor) -> None:  # allowed (B*Q, 1 or H, S, K)
        a = allowed.double()[..., None, :]  # (B*Q, 1 or H, S, 1, K)
        w = weights[..., C + n - a.shape[-1] :].to(a.device).double()  # (B*Q, 1, 1, M, K)
        share = (a * w).sum(-1) / a.sum(-1).clamp(min=1)  # (B*Q, 1 or H, S, M)
        per_set = torch.einsum("rjs,rhsm->rhjm", W.to(share.device).double(), share)  # (B*Q, 1 or H, J, M)
        baseline[:, layer] = per_set.expand(B * Q, H, J, M).to(dev, baseline.dtype)

    with attention_probe(model, on_layer, query_positions=query_positions, on_visible=on_visible) as probe:
        result = model(input_ids=padded, **kw)
        probe.end_pass(model)  # every layer reported exactly once
    check_finite(mass, result.logits)
    mass, baseline = mass.view(B, Q, L, H, J, M), baseline.view(B, Q, L, H, J, M)
    got = None if got_keys is None else got_keys.view(B, Q, L, H, J, P)
    return [Reads(mass[:, q], baseline[:, q], None if got is None else got[:, q]) for q in range(Q)]
