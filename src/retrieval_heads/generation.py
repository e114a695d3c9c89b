"""Greedy answers: what the model itself answers to a prompt, and whether that is right.

Decoding is a plain loop over a KV cache: one prefill pass over the prompt (``use_cache=True``), then one
pass per new token with the cache handed back (``cache=`` in recent transformers 5 releases, where
``past_key_values=`` is deprecated; ``past_key_values=`` before). A sample stops at the model's
end-of-sequence token, at a token that holds a line break once its answer has begun, or after
``max_new_tokens``; the stop token is not part of the answer. Prompts of one length are decoded as one
batch (no padding); a finished sample's further tokens are dropped and cannot affect the others.

Correctness is :func:`~retrieval_heads.data.questions.answer_matches` on the decoded text, a documented
lenient match: a state by its name or postal code (``Delaware`` or ``DE``), a number with or without
separators (``12,400`` or ``12400``), other answers as whole words, case-insensitive.

The attention probe can run during decoding: ``track_argmax`` records, for every answer token, the key
each head attended most in the pass that predicted that token (``Answer.argmax``, (T, L, H)), which is what
:mod:`~retrieval_heads.methods.retrieval_score` counts; ``ablate`` ({layer: [head, ...]}) removes heads
(zeroes their outputs before the output projection) in every pass, prefill included.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .capture import attention_probe
from .console import bar_disabled
from .data.prompt import PromptSample
from .data.questions import answer_matches
from .defaults import DEFAULT_MAX_NEW_TOKENS  # noqa: F401  (also read from here)
from .hf import cache_kwarg, input_device, returned_cache  # noqa: F401  (cache_kwarg, returned_cache: also read from here)
from .methods.base import batches, stack_ids

Stop = Callable[[list, int], bool]  # (answer ids so far, next token) -> stop before that token?


@dataclass
class Answer:
    """The model's greedy answer to one prompt."""

    text: str  # decoded, special tokens dropped, stripped
    ids: list[int]  # the answer's token ids (the stop token excluded)
    correct: bool
    argmax: torch.Tensor | None = None  # (T, L, H) int64: key attended most by each head when predicting token t

    def row(self) -> dict:
        """What the .samples.jsonl rows record."""
        return {"generated": self.text, "correct": self.correct}


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the model's generation config and of its tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        for x in e if isinstance(e, (list, tuple)) else [e]:  # generation_config.json is the model folder's
            if isinstance(x, int) and not isinstance(x, bool):  # file: a nested list or a string is no id
                ids.add(x)
    return ids


def stop_rule(model, tokenizer) -> Stop:
    """Stop at an end-of-sequence token, or at a token with a line break once the answer has non-blank text."""
    eos = eos_ids(model, tokenizer)

    def stop(ids: list, tok: int) -> bool:
        if tok in eos:
            return True
        return "\n" in tokenizer.decode([tok]) and bool(tokenizer.decode(ids, skip_special_tokens=True).strip())

    return stop


@torch.no_grad()
def greedy_decode(
    model, input_ids: torch.Tensor, max_new_tokens: int, stop: Stop, track_argmax: bool = False,
    ablate: dict[int, list[int]] | torch.Tensor | None = None, cache=None, past: int = 0,
) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """Greedy continuation of each row of input_ids (B, N), KV cache, stopping as :data:`Stop` says.

    Returns the answer ids of each row and, with ``track_argmax``, one (T_b, L, H) int64 tensor per row:
    the position (in the whole sequence) of the key each head attended most, over all keys (prompt and
    answer so far), in the pass that predicted answer token t. ``cache``: a cache already holding the first
    ``past`` positions (a shared context; it grows), input_ids then being what follows them.
    """
    cfg = model.config.get_text_config()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    B = input_ids.shape[0]
    step: dict[str, torch.Tensor] = {}

    def on_layer(layer: int, probs: torch.Tensor) -> None:  # probs: (B, H, 1, K), the row of the newest position
        # the K keys are the last K positions (a sliding-window layer's cache keeps only its window)
        at = probs[:, :, -1].argmax(-1) + (step["seen"] - probs.shape[-1])  # (B, H) position in the sequence
        step["argmax"][:, layer] = at.to(step["argmax"].device)

    removes = bool(ablate.any()) if isinstance(ablate, torch.Tensor) else bool(ablate)  # dict, or (B, L, H) mask
    probe = attention_probe(model, on_layer if track_argmax else None, ablate=ablate) \
        if (track_argmax or removes) else nullcontext()
    answers: list[list[int]] = [[] for _ in range(B)]
    tracks: list[list[torch.Tensor]] = [[] for _ in range(B)]
    done = [False] * B
    feed, kw, seen = input_ids, cache_kwarg(model), past
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    with probe as state:
        for _ in range(max_new_tokens):
            if limit is not None and seen > 0 and seen + feed.shape[1] > limit:
                break  # the answer has reached the model's last position: an absolute position embedding ends there
            seen += feed.shape[1]
            step["argmax"], step["seen"] = torch.zeros(B, L, H, dtype=torch.long), seen  # (B, L, H)
            out = model(input_ids=feed, use_cache=True, logits_to_keep=1, **{kw: cache})
            if state is not None:
                state.end_pass(model)  # every layer reported (and was ablated) exactly once
            cache = returned_cache(out)
            nxt = out.logits[:, -1].argmax(-1)  # (B,)
            for b in range(B):
                tok = int(nxt[b])
                if done[b] or stop(answers[b], tok):
                    done[b] = True
                    continue
                answers[b].append(tok)
                tracks[b].append(step["argmax"][b])
            if all(done):
                break
            feed = nxt[:, None]  # (B, 1)
    if not track_argmax:
        return answers, None
    return answers, [torch.stack(t) if t else torch.zeros(0, L, H, dtype=torch.long) for t in tracks]


def answer_batch(
    model, tokenizer, batch: Sequence[PromptSample], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    track_argmax: bool = False, ablate: dict[int, list[int]] | None = None, cache=None, past: int = 0,
) -> list[Answer]:
    """Greedy answers to a batch of equal-length prompts, each checked against its gold answer. With
    ``cache`` holding the prompts' first ``past`` ids (their shared context), only the rest is fed."""
    ids = stack_ids(batch, input_device(model))[:, past:]  # (B, N - past)
    answers, tracks = greedy_decode(model, ids, max_new_tokens, stop_rule(model, tokenizer), track_argmax, ablate,
                                    cache=cache, past=past)
    out = []
    for i, (p, a) in enumerate(zip(batch, answers)):
        text = tokenizer.decode(a, skip_special_tokens=True).strip()
        out.append(Answer(text, a, answer_matches(text, p.answer), None if tracks is None else tracks[i]))
    return out


def answer_prompts(
    lm, prompts: Sequence[PromptSample], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 1,
    track_argmax: bool = False, ablate: dict[int, list[int]] | None = None, progress: bool = False,
    desc: str = "answers",
) -> list[Answer]:
    """Greedy answers to every prompt, in order; prompts of one length are decoded ``batch_size`` at a time."""
    from tqdm.auto import tqdm

    out: list[Answer | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="sample", disable=bar_disabled(progress), file=sys.stderr, leave=False) as bar:
        for idx in batches(prompts, batch_size):
            got = answer_batch(lm.model, lm.tokenizer, [prompts[i] for i in idx], max_new_tokens, track_argmax, ablate)
            for i, a in zip(idx, got):
                out[i] = a
            bar.update(len(idx))
    return out  # type: ignore[return-value]


def accuracy(answers: Sequence[Answer]) -> dict:
    """{"accuracy", "n_correct", "n_answered"} of a list of answers."""
    n = sum(a.correct for a in answers)
    return {"accuracy": round(n / len(answers), 6) if answers else 0.0, "n_correct": n, "n_answered": len(answers)}


@torch.no_grad()
def gold_logprob(
    model, tokenizer, prompt: PromptSample, ablate: dict[int, list[int]] | None = None,
) -> float:
    """Mean log-probability of the gold answer's tokens, teacher-forced right after the prompt.

    The gold answer is tokenized on its own (as the assistant turn's first words); one forward pass over
    prompt + answer[:-1] gives the log-probability of each answer token given everything before it.
    """
    gold = list(tokenizer(prompt.answer, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([prompt.input_ids + gold[:-1]], device=input_device(model))  # (1, N + T - 1)
    probe = attention_probe(model, None, ablate=ablate) if ablate else nullcontext()
    with probe as state:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(gold)).logits[0]  # (T, V)
        if state is not None:
            state.end_pass(model)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    target = torch.tensor(gold, device=logp.device)
    return float(logp[torch.arange(len(gold), device=logp.device), target].mean())
