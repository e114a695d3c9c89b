"""What scoring methods share: the registry, and needle mass measured through the probe."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..capture import attention_probe
from ..data.prompt import PromptSample
from ..hf import check_finite
from ..registry import Registry


class Method(Protocol):
    name: str

    def score_batch(self, model, batch: Sequence[PromptSample]) -> torch.Tensor:
        """Per-sample scores (B, layers, heads) of a batch of equal-length prompts, on the model's device."""
        ...


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    METHODS.register(method.name, method)
    return method


def span_mask(batch: Sequence[PromptSample], device) -> torch.Tensor:
    """(B, N) float mask of the needle span of each prompt."""
    n = len(batch[0].input_ids)
    m = torch.zeros(len(batch), n, device=device)
    for i, s in enumerate(batch):
        m[i, s.needle_start : s.needle_end] = 1.0
    return m


def batches(prompts: Sequence[PromptSample], batch_size: int) -> list[list[int]]:
    """Indices of prompts, grouped by length (no padding needed) and cut into batches, in first-seen order."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.input_ids), []).append(i)
    return [idx[j : j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]


def stack_ids(batch: Sequence[PromptSample], device) -> torch.Tensor:
    lengths = {len(s.input_ids) for s in batch}
    if len(lengths) != 1:
        raise ValueError(f"a batch must hold prompts of one length, got {sorted(lengths)}")
    return torch.tensor([s.input_ids for s in batch], device=device)  # (B, N)


@torch.no_grad()
def needle_mass(
    model, input_ids: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor | None = None, **forward_kwargs
) -> torch.Tensor:
    """Attention mass that the query rows ``positions`` (default: the last) put on the keys in ``key_mask``.

    input_ids (B, N); key_mask (B, N). Returns (B, L, H, S) on the model's device. One forward pass with
    ``use_cache=False`` and ``logits_to_keep=1``; nothing leaves the device. Raises NumericalError naming the
    first layer whose attention is not finite (e.g. float16 overflow), and UserError when a layer did not
    report exactly once (its attention bypasses the probe).
    """
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    B = input_ids.shape[0]
    S = 1 if positions is None else positions.numel()
    out = torch.zeros(B, L, H, S, device=input_ids.device)  # (B, L, H, S)
    weights = key_mask.float()[:, None, None, :]  # (B, 1, 1, N)

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, S, N)
        out[:, layer] = (probs * weights[..., : probs.shape[-1]].to(probs.device)).sum(-1).to(out.device)

    with attention_probe(model, on_layer, query_positions=positions) as probe:
        result = model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
        probe.end_pass(model)  # every layer reported exactly once
    check_finite(out, result.logits)
    return out


@torch.no_grad()
def span_masses(
    model, input_ids: torch.Tensor, key_masks: torch.Tensor, positions: torch.Tensor | None = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass that the query rows ``positions`` (default: the last) put on each of M key spans, and
    each span's chance baseline, from one forward pass.

    input_ids (B, N); key_masks (B, M, N) 0/1. Returns (mass, baseline), both (B, L, H, S, M) on the model's
    device: ``mass`` is what the probe's rows put on the span; ``baseline`` is what a row spreading its
    attention evenly over the keys it may see would put there, |span ∩ visible| / |visible|, with the
    visible keys taken from the very mask the probe applies (causal, sliding windows, padding).
    """
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    B, M, _ = key_masks.shape
    S = 1 if positions is None else positions.numel()
    mass = torch.zeros(B, L, H, S, M, device=input_ids.device)  # (B, L, H, S, M)
    baseline = torch.zeros(B, L, H, S, M, device=input_ids.device)  # (B, L, H, S, M)
    weights = key_masks.float()[:, None, None]  # (B, 1, 1, M, N)

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, S, K)
        w = weights[..., : probs.shape[-1]].to(probs.device)  # (B, 1, 1, M, K)
        # the same product and sum as needle_mass, one span at a time: bit-identical to it
        mass[:, layer] = (probs[..., None, :] * w).sum(-1).to(mass.device)  # (B, H, S, M)

    def on_visible(layer: int, allowed: torch.Tensor) -> None:  # allowed: (B, 1 or H, S, K)
        a = allowed.double()[..., None, :]  # (B, 1 or H, S, 1, K)
        w = weights[..., : a.shape[-1]].to(a.device).double()  # (B, 1, 1, M, K)
        share = (a * w).sum(-1) / a.sum(-1).clamp(min=1)  # (B, 1 or H, S, M), exact counts
        baseline[:, layer] = share.expand(B, H, S, M).to(baseline.device, baseline.dtype)

    with attention_probe(model, on_layer, query_positions=positions, on_visible=on_visible) as probe:
        result = model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
        probe.end_pass(model)  # every layer reported exactly once
    check_finite(mass, result.logits)
    return mass, baseline


