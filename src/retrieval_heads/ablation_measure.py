"""What an ablation measures on each sample under each condition (a set of removed heads), two ways.

Per (sample, condition): the greedy answer (``max_new_tokens`` at most, :mod:`retrieval_heads.generation`'s
stop rule), the mean log-probability of the gold answer's tokens teacher-forced right after the prompt
(``logprob``), and the same after the model's own lead-in (``leadin_logprob``, see :func:`leadins`).

- :func:`measure_sequential` is the reference: one condition and one sample at a time, every quantity from
  its own plain forward passes (:func:`~retrieval_heads.generation.answer_prompts`,
  :func:`~retrieval_heads.generation.gold_logprob`, :func:`leadin_logprob`).
- :func:`measure_shared` gives the same numbers for less. The layers below the lowest removed head are the
  same for every condition of a sample: one unablated pass over the sample computes them once (its hidden
  state there and its keys and values), and each batch of conditions runs only the layers from there on,
  each row with its own removed heads (the probe's (B, L, H) ``ablate``). One prefill per row serves all
  three measures: the prompt followed by the gold answer gives the gold log-probs and, at the prompt's
  last position, the first answer token; the KV cache is then cut back to the prompt (``crop``) and serves
  the lead-in pass and the greedy decoding. The rows of a batch are conditions of one sample, so they share
  one prompt length and stop independently.

Both give the same answers and log-probs within 1e-5 in float32 (``tests/test_ablation_fast.py``).

>>> leads = leadins(lm.tokenizer, prompts, base)                                            # doctest: +SKIP
>>> got = measure_shared(lm, prompts, [[], ["L20H3", "L22H1"]], 12, leads)                  # doctest: +SKIP
>>> got.logprob[1][0]        # condition 1, sample 0                                                   # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from .console import bar_disabled
from .capture import attention_probe
from .data.prompt import PromptSample
from .data.questions import answer_matches
from .generation import Answer, answer_prompts, gold_logprob, stop_rule
from .hf import cache_kwarg, input_device, returned_cache
from .results import parse_head

LEADIN_RULE = ("the unablated greedy answer's tokens before the gold answer, where that answer is right and "
               "holds the gold text ('own'); otherwise the most common own lead-in of the samples ('shared'); "
               "none where no sample has one (then the lead-in log-prob is the bare gold log-prob)")


@dataclass
class Leadin:
    """The tokens the model says before its answer, and the gold answer's tokens as they follow them."""

    ids: list[int]  # the lead-in (empty: none)
    cont: list[int]  # the gold answer's tokens after the lead-in
    text: str
    source: str  # "own", "shared" or "none"


@dataclass
class Measured:
    """[condition][sample] answers and unrounded log-probs."""

    answers: list[list[Answer]]
    logprob: list[list[float]]
    leadin_logprob: list[list[float]]


def gold_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _own_leadin(tok, answer: Answer, gold: str) -> list[int] | None:
    """The answer's leading tokens whose text ends before the gold text begins, if the answer is right."""
    if not answer.correct:
        return None
    at = answer.text.lower().find(gold.strip().lower())
    if at < 0:
        return None
    j = 0
    while j < len(answer.ids) and len(tok.decode(answer.ids[: j + 1], skip_special_tokens=True).strip()) <= at:
        j += 1
    return list(answer.ids[:j])


def leadins(tok, prompts: Sequence[PromptSample], baseline: Sequence[Answer]) -> list[Leadin]:
    """Each sample's lead-in by :data:`LEADIN_RULE`, from the unablated greedy answers ``baseline``."""
    own = [_own_leadin(tok, a, p.answer) for p, a in zip(prompts, baseline)]
    counts = Counter(tuple(o) for o in own if o)
    common = list(counts.most_common(1)[0][0]) if counts else []
    out = []
    for p, o in zip(prompts, own):
        ids, source = (o, "own") if o is not None else (common, "shared" if common else "none")
        text = tok.decode(ids, skip_special_tokens=True) if ids else ""
        cont = gold_ids(tok, (" " if ids and not text.endswith((" ", "\n")) else "") + p.answer.strip()) \
            if ids else gold_ids(tok, p.answer)
        out.append(Leadin(ids, cont, text.strip(), source))
    return out


@torch.no_grad()
def leadin_logprob(model, prompt: PromptSample, leadin: Leadin, ablate: dict[int, list[int]] | None = None) -> float:
    """Mean log-prob of the gold answer's tokens teacher-forced after the prompt and the lead-in (reference)."""
    feed = leadin.ids + leadin.cont[:-1]
    ids = torch.tensor([prompt.input_ids + feed], device=input_device(model))  # (1, N + len(feed))
    with (attention_probe(model, None, ablate=ablate) if ablate else nullcontext()) as state:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(leadin.cont)).logits[0]  # (T, V)
        if state is not None:
            state.end_pass(model)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    return float(logp[torch.arange(len(leadin.cont)), torch.tensor(leadin.cont)].mean())


def ablate_map(heads: Sequence[str]) -> dict[int, list[int]]:
    """{layer: [head, ...]} for :func:`retrieval_heads.capture.attention_probe`."""
    out: dict[int, list[int]] = {}
    for name in heads:
        layer, head = parse_head(name)
        out.setdefault(layer, []).append(head)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def removal_mask(head_sets: Sequence[Sequence[str]], num_layers: int, num_heads: int) -> torch.Tensor:
    """(C, L, H) boolean: True where condition c removes head (l, h); the probe's per-row ``ablate``."""
    mask = torch.zeros(len(head_sets), num_layers, num_heads, dtype=torch.bool)  # (C, L, H)
    for c, heads in enumerate(head_sets):
        for name in heads:
            mask[(c, *parse_head(name))] = True
    return mask


def measure_sequential(lm, prompts: Sequence[PromptSample], head_sets: Sequence[Sequence[str]],
                       max_new_tokens: int, leads: Sequence[Leadin], progress: bool = False) -> Measured:
    """The reference: every condition alone, every sample alone, every measure from its own passes."""
    answers, logps, leads_lp = [], [], []
    for c, heads in enumerate(head_sets):
        ab = ablate_map(heads) or None
        answers.append(answer_prompts(lm, prompts, max_new_tokens, 1, ablate=ab, progress=progress,
                                      desc=f"condition {c + 1}/{len(head_sets)}"))
        logps.append([gold_logprob(lm.model, lm.tokenizer, p, ab) for p in prompts])
        leads_lp.append([leadin_logprob(lm.model, p, le, ab) if le.ids else lp
                         for p, le, lp in zip(prompts, leads, logps[-1])])
    return Measured(answers, logps, leads_lp)


def decoder_layers(model) -> list:
    """The model's decoder layers in order: the ModuleList of num_hidden_layers modules holding attention
    modules with a ``layer_idx``."""
    n = model.config.get_text_config().num_hidden_layers
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and all(
                any(getattr(m, "layer_idx", None) == i for m in layer.modules()) for i, layer in enumerate(mod)):
            return list(mod)
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")


def can_share(model) -> bool:
    """Whether :func:`measure_shared` applies: every layer keeps plain keys and values in its cache (full or
    sliding-window attention) and the decoder layers can be found. Hybrids with linear-attention or recurrent
    layers (a state, not keys) are measured by :func:`measure_sequential`."""
    from transformers.cache_utils import DynamicLayer

    try:
        cache = _new_cache(model)
        decoder_layers(model)
    except (ValueError, TypeError, AttributeError, NotImplementedError):
        return False
    n = model.config.get_text_config().num_hidden_layers
    return len(cache.layers) == n and all(isinstance(layer, DynamicLayer) for layer in cache.layers)


class _Done(Exception):
    """Stops the shared pass once the deepest hidden state it must give is known."""


def _new_cache(model):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    cache.activate_past_recording()  # sliding-window layers keep every key until cropped
    return cache


def _shared_pass(model, layers, ids: torch.Tensor, starts: set[int]):
    """One unablated pass over ids (1, N'): the output of layer s - 1 for each s in ``starts`` (s > 0) and every
    layer's keys and values below max(starts)."""
    deepest = max(starts)
    hidden: dict[int, torch.Tensor] = {}
    cache = _new_cache(model)

    def keep(s):
        def hook(module, args, out):
            hidden[s] = out
            if s == deepest:
                raise _Done
        return hook

    hooks = [layers[s - 1].register_forward_hook(keep(s)) for s in starts if s > 0]
    try:
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    except _Done:
        pass
    finally:
        for h in hooks:
            h.remove()
    kv = [(lay.keys, lay.values) for lay in cache.layers[:deepest]]  # (1, Hkv, N', d) each
    return hidden, kv


def _rows_pass(model, layers, ids, start: int, hidden, kv, mask, cache, keep: int):
    """ids (B, N'): the forward pass of B rows from layer ``start`` on (layers below replaced by the shared
    pass's results, their keys and values put in ``cache``), each row removing its own heads. Returns logits
    (B, keep, V)."""
    B = ids.shape[0]
    state_box: list = [None]

    def stub(i):
        def forward(*args, **kwargs):
            k, v = kv[i]
            cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
            if state_box[0] is not None:
                state_box[0].counts[i] += 1  # the layer ran (shared): it reports to the probe's per-pass check
            return _rows(hidden[start], B)
        return forward

    for i in range(start):
        layers[i].forward = stub(i)
    try:
        probe = attention_probe(model, None, ablate=mask) if bool(mask.any()) else nullcontext()
        with probe as state:
            state_box[0] = state
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{cache_kwarg(model): cache}).logits
            if state is not None:
                state.end_pass(model)
    finally:
        for i in range(start):
            del layers[i].forward
    return logits  # (B, keep, V)


def _rows(out, B: int):
    """A layer's output for one row (a tensor (1, N, D), or a tuple starting with one) as B rows."""
    if isinstance(out, tuple):
        return (_rows(out[0], B), *out[1:])
    return out.expand(B, *out.shape[1:]).contiguous()  # (B, N, D)


def _step(model, feed, cache, mask, keep: int):
    """A cached pass of feed (B, T) under the rows' removals: logits (B, keep, V)."""
    with (attention_probe(model, None, ablate=mask) if bool(mask.any()) else nullcontext()) as state:
        out = model(input_ids=feed, use_cache=True, logits_to_keep=keep, **{cache_kwarg(model): cache})
        if state is not None:
            state.end_pass(model)
    return out.logits, returned_cache(out)


def _mean_logprob(logits: torch.Tensor, target: Sequence[int]) -> list[float]:
    """logits (B, T, V), target T ids: each row's mean log-prob of the targets."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    t = torch.tensor(target, device=logp.device)[None, :, None].expand(logp.shape[0], -1, 1)  # (B, T, 1)
    return logp.gather(-1, t)[..., 0].mean(-1).tolist()


def measure_shared(lm, prompts: Sequence[PromptSample], head_sets: Sequence[Sequence[str]], max_new_tokens: int,
                   leads: Sequence[Leadin], batch_size: int = 8, progress: bool = False) -> Measured:
    """:func:`measure_sequential`'s numbers, sharing what the conditions share (see the module's text)."""
    from tqdm.auto import tqdm

    model, tok = lm.model, lm.tokenizer
    L, device = lm.num_layers, input_device(model)
    layers = decoder_layers(model)
    mask = removal_mask(head_sets, L, lm.num_heads).to(device)  # (C, L, H)
    lowest = [int(m.any(-1).nonzero()[0]) if bool(m.any()) else L for m in mask]  # per condition
    order = sorted(range(len(head_sets)), key=lambda c: lowest[c])
    chunks = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    stop = stop_rule(model, tok)
    C, S = len(head_sets), len(prompts)
    answers = [[None] * S for _ in range(C)]
    logps = [[0.0] * S for _ in range(C)]
    lead_lp = [[0.0] * S for _ in range(C)]
    with tqdm(total=C * S, desc="ablation", unit="row", disable=bar_disabled(progress), file=sys.stderr,
              leave=False) as bar, torch.no_grad():
        for i, p in enumerate(prompts):
            gold = gold_ids(tok, p.answer)
            T = len(gold)
            full = torch.tensor([p.input_ids + gold[:-1]], device=device)  # (1, N + T - 1)
            starts = {min(lowest[c] for c in ch) for ch in chunks}
            hidden, kv = _shared_pass(model, layers, full, starts) if max(starts) > 0 else ({}, [])
            for ch in chunks:
                B, rows = len(ch), mask[ch]  # rows: (B, L, H)
                start = min(lowest[c] for c in ch)
                cache = _new_cache(model)
                logits = _rows_pass(model, layers, full.expand(B, -1), start, hidden, kv, rows, cache, T)  # (B, T, V)
                for c, lp in zip(ch, _mean_logprob(logits, gold)):
                    logps[c][i] = lp
                first = logits[:, 0].argmax(-1)  # (B,) the answer's first token, predicted at the prompt's end
                if T > 1:
                    cache.crop(-(T - 1))  # back to the prompt
                le = leads[i]
                if le.ids:
                    feed = torch.tensor([le.ids + le.cont[:-1]], device=device).expand(B, -1)  # (B, F)
                    got, cache = _step(model, feed, cache, rows, len(le.cont))
                    for c, lp in zip(ch, _mean_logprob(got, le.cont)):
                        lead_lp[c][i] = lp
                    cache.crop(-feed.shape[1])
                else:
                    for c in ch:
                        lead_lp[c][i] = logps[c][i]
                texts = _decode(model, stop, first, cache, rows, max_new_tokens)
                for c, ids in zip(ch, texts):
                    text = tok.decode(ids, skip_special_tokens=True).strip()
                    answers[c][i] = Answer(text, ids, answer_matches(text, p.answer))
                del cache
                bar.update(B)
    return Measured(answers, logps, lead_lp)  # type: ignore[arg-type]


def _decode(model, stop, first: torch.Tensor, cache, rows: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy answers from each row's first token (B,) and its prompt cache, as ``greedy_decode`` stops."""
    B = first.shape[0]
    answers: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    nxt = first
    for step in range(max_new_tokens):
        for b in range(B):
            tok = int(nxt[b])
            if done[b] or stop(answers[b], tok):
                done[b] = True
                continue
            answers[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits, cache = _step(model, nxt[:, None], cache, rows, 1)  # (B, 1, V)
        nxt = logits[:, -1].argmax(-1)
    return answers
