"""Slow, obviously correct references that the library's fast paths are tested against (test code only).

- :func:`reference_rows`: attention rows the slow way, eager attention with ``output_attentions=True`` and
  full (B, H, N, N) matrices, rows picked afterwards (what the probe is held to);
- :func:`eager_head_scores`: the original summed-attention loop, eager attention with
  ``output_attentions=True``, full N x N matrices, one ``.item()`` per head;
- :func:`summed_attention_scores`, :func:`query_focused_scores`: the methods' scores through
  :func:`retrieval_heads.capture.reference_rows` (eager, full matrices);
- :func:`reference_argmax`: what greedy decoding records per head, eager and step by step over a KV cache;
- :func:`score_shared` (with :func:`shared_needle_mass` and :func:`shared_span_masses`): summed-attention
  scores of every question of a sample from one cached context pass, the needle alone, as the shared pass
  first computed them (``onepass`` now reads every method from the same pass).

Benchmarks import this module too (``bench/`` puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from retrieval_heads.data.prompt import PromptFormat, PromptSample
from retrieval_heads.hf import cache_kwarg, input_device, returned_cache
from retrieval_heads.methods.base import null_prompt, span_mask, span_masses, stack_ids
from retrieval_heads.prefill import can_share, context_groups, shared_reads


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Within this block ``model`` runs its family's own eager attention, which returns the full (B, H, Q, K)
    weights with ``output_attentions=True``: the slow references are built on it. The model's previous
    function (the probe's, once prepared) is restored afterwards. This switches the model itself, for every
    thread: a probe running meanwhile in another thread fails its per-pass layer check."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def reference_rows(model, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The slow reference: eager attention, ``output_attentions=True``, full (B, H, N, N) matrices per layer;
    returns the selected rows (B, H, S, N) of each layer in float32."""
    with eager_attention(model):
        out = model(input_ids=input_ids, output_attentions=True, use_cache=False, logits_to_keep=1)
    n = input_ids.shape[1]
    pos = torch.tensor([n - 1]) if positions is None else positions % n
    return [a[:, :, pos.to(a.device), :].float() for a in out.attentions]


@torch.no_grad()
def eager_head_scores(model, input_ids: torch.Tensor, needle_start: int, needle_end: int) -> dict[str, float]:
    """The original method's own loop, kept as the slow reference: eager attention, ``output_attentions=True``,
    full N x N matrices, one ``.item()`` per head. input_ids (1, N). Returns {"L{l}H{h}": mass}."""
    with eager_attention(model):
        outputs = model(input_ids=input_ids, output_attentions=True, use_cache=False, logits_to_keep=1)
    head_scores = {}
    for layer_idx, layer_attn in enumerate(outputs.attentions):  # (1, H, N, N)
        for head_idx in range(layer_attn.size(1)):
            attn_to_needle = layer_attn[0, head_idx, -1, needle_start:needle_end]
            head_scores[f"L{layer_idx}H{head_idx}"] = attn_to_needle.float().sum().item()
    return head_scores


def summed_attention_scores(model, batch: Sequence[PromptSample]) -> torch.Tensor:
    """``summed_attention``'s scores (B, L, H) through :func:`reference_rows` (eager, full matrices)."""
    device = input_device(model)
    ids = stack_ids(batch, device)
    mask = span_mask(batch, device)
    rows = reference_rows(model, ids)  # L x (B, H, 1, N)
    return torch.stack([(r[:, :, 0, :] * mask[:, None, :]).sum(-1) for r in rows], dim=1)  # (B, L, H)


def query_focused_scores(model, tokenizer, batch: Sequence[PromptSample]) -> torch.Tensor:
    """``query_focused``'s scores (B, L, H) through :func:`reference_rows`, one prompt at a time."""
    fmt = PromptFormat(tokenizer)
    out = []
    for p in batch:
        per = []
        for q in (p, null_prompt(fmt, p)):
            ids = torch.tensor([q.input_ids])
            rows = reference_rows(model, ids, torch.arange(q.question_start, q.question_end))  # L x (1, H, S, N)
            mass = torch.stack([r[0, :, :, q.needle_start : q.needle_end].sum(-1).mean(-1) for r in rows])  # (L, H)
            per.append(mass)
        out.append(per[0] - per[1])
    return torch.stack(out)  # (B, L, H)


@torch.no_grad()
def reference_argmax(model, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> torch.Tensor:
    """What decoding records, the slow way: eager attention with ``output_attentions=True``, step by step
    over a KV cache feeding the given answer tokens; (T, L, H) position of the argmax of each head's full row
    per step (its keys are the last ones of the sequence so far)."""
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


@torch.no_grad()
def shared_needle_mass(
    model, context_ids: torch.Tensor, suffix_ids: Sequence[torch.Tensor], needle: torch.Tensor
) -> list[torch.Tensor]:
    """Per suffix, the attention mass its last token puts on the needle, from one context pass.

    context_ids (B, C); each suffix_ids[q] (B, n_q), n_q >= 1; needle (B, C) a 0/1 mask over the context.
    Returns one (B, L, H) tensor per suffix, on the device of ``needle``. Raises NumericalError naming the
    first layer whose attention is not finite, and UserError when a layer did not report exactly once to the
    probe in a pass. Falls back to full passes (context + suffix, no cache) for a
    model whose cache holds more than keys and values.
    """
    return [mass[..., 0] for mass, _ in shared_span_masses(model, context_ids, suffix_ids, needle[:, None])]


@torch.no_grad()
def shared_span_masses(
    model, context_ids: torch.Tensor, suffix_ids: Sequence[torch.Tensor], masks: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`shared_needle_mass` for M spans at once, with their chance baselines (as
    :func:`~retrieval_heads.methods.base.span_masses`): masks (B, M, C) 0/1 over the context. Returns per
    suffix (mass, baseline), each (B, L, H, M); the mass of each span is bit-identical to
    :func:`shared_needle_mass` with that span as the needle.
    """
    if not can_share(model):
        return [_full_mass(model, context_ids, s, masks) for s in suffix_ids]
    B = context_ids.shape[0]
    last = []
    for s in suffix_ids:  # one row set per suffix: its last token
        w = torch.zeros(B, 1, s.shape[1])  # (B, 1, n_q)
        w[:, 0, -1] = 1.0
        last.append(w)
    return [(r.mass[:, :, :, 0], r.baseline[:, :, :, 0]) for r in shared_reads(model, context_ids, suffix_ids, last, masks)]


def _full_mass(model, context_ids, suffix, masks) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([context_ids, suffix.to(context_ids.device)], dim=1)  # (B, C + n)
    full = torch.cat([masks, masks.new_zeros(masks.shape[0], masks.shape[1], suffix.shape[1])], dim=2)  # (B, M, C+n)
    mass, baseline = span_masses(model, ids, full)  # (B, L, H, 1, M) each
    return mass[:, :, :, 0].to(masks.device), baseline[:, :, :, 0].to(masks.device)


def score_shared(
    model,
    groups: Sequence[Mapping[str, PromptSample]],
    questions: Sequence[str],
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Summed-attention scores of every question of every sample, one context pass per sample (batch).

    ``groups`` as from :func:`~retrieval_heads.data.samples.synthetic_samples` ({question: PromptSample} per
    sample, sharing the context). Returns {question: (S, L, H)} on the model's input device; equal to
    ``SummedAttention.score_batch`` on each question's full prompt (within float tolerance).
    ``on_batch(k)`` is called after each batch of ``k`` samples.
    """
    cfg = model.config.get_text_config()
    device = input_device(model)
    S = len(groups)
    out = {q: torch.zeros(S, cfg.num_hidden_layers, cfg.num_attention_heads, device=device) for q in questions}
    for end, same in context_groups(groups, questions):
        for j in range(0, len(same), batch_size):
            idx = same[j : j + batch_size]
            first = [groups[i][questions[0]] for i in idx]
            context = torch.tensor([p.input_ids[:end] for p in first], device=device)  # (B, C)
            needle = torch.zeros(len(idx), end, device=device)  # (B, C)
            for b, p in enumerate(first):
                needle[b, p.needle_start : p.needle_end] = 1.0
            suffixes = [torch.tensor([groups[i][q].input_ids[end:] for i in idx], device=device) for q in questions]
            for q, mass in zip(questions, shared_needle_mass(model, context, suffixes, needle)):
                out[q][idx] = mass
            if on_batch is not None:
                on_batch(len(idx))
    return out
