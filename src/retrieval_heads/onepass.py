"""Every method, every span and the greedy answers from one context pass per sample.

The prompts of an experiment (or of a sweep unit's questions) share their context: ``input_ids[:context_end]``
(template prefix, haystack, needle) is the same for every question of a sample, and only the suffix differs.
:func:`score_groups` runs, per batch of samples:

1. the context once, filling a KV cache (:func:`~retrieval_heads.prefill.context_cache`);
2. one pass over every question's suffix, plus the content-free question "N/A" when a method calibrates
   with it (``reads_null``), all on the context's cache (:func:`~retrieval_heads.prefill.shared_reads`):
   the probe reads, for each method, the mean of the rows that method reads
   (:meth:`~retrieval_heads.methods.base.Method.row_span`, e.g. the last token, or the question's tokens)
   against every span (needle; for a method that ``measures_spans``, also the control spans, facts and
   answer, with their chance baselines) and, for a method that ``reads_needle_keys``, each needle token;
3. greedy decoding (answers, and the most attended key of every head for a method that needs the answers)
   from a fork of the same cache, feeding only the suffixes: the questions whose suffixes have one length
   decode together as rows of one batch.

Each method turns what was read into its scores (:meth:`~retrieval_heads.methods.base.Method.from_reads`).
Why this equals separate full passes: see :mod:`retrieval_heads.prefill` (causal attention; the cache hands
the suffix the context's keys at the same positions). Tests hold every method to its own ``score_batch`` on
the full prompts within 1e-5 in float32, and the answers (and the heads' argmax keys) to be identical, on
the tiny families of the test suite and on SmolLM2.

A method that is not ``shared`` (a user's own), and every method of a model whose cache holds more than keys
and values, is scored the plain way (its own passes), so the results never depend on which path ran.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .chance import SpanMasses, probe_prompts, prompt_spans, span_masks, union_names
from .console import bar_disabled
from .data.prompt import PromptFormat, PromptSample
from .defaults import DEFAULT_MAX_NEW_TOKENS
from .generation import Answer, answer_batch, answer_prompts
from .hf import input_device
from .methods import METHODS
from .methods.base import Method, MethodContext, RowReads, batches, null_prompt
from .prefill import can_share, context_cache, context_groups, fork, shared_reads

if TYPE_CHECKING:
    from .models import LoadedModel


@dataclass
class Scored:
    """One question's numbers over all samples: the span masses of each method that ``measures_spans``
    ({method: SpanMasses}), each other method's per-sample scores (S, L, H), and the greedy answers (None
    when not asked for)."""

    span_masses: dict[str, SpanMasses]
    scores: dict[str, torch.Tensor]
    answers: list[Answer] | None

    @property
    def masses(self) -> SpanMasses | None:
        """The span masses of the one span-measuring method asked for (None: none was)."""
        if len(self.span_masses) > 1:
            raise ValueError(f"several methods measured spans ({', '.join(self.span_masses)}); pick one by name")
        return next(iter(self.span_masses.values()), None)


@torch.no_grad()
def score_groups(
    lm, groups: Sequence[Mapping[str, PromptSample]], questions: Sequence[str], methods: Sequence[str],
    answers: bool = False, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Scored]:
    """Score ``methods`` on every question of every sample, one context pass per sample (batch of samples).

    ``groups``: {question: PromptSample} per sample, sharing the context (as from
    :func:`~retrieval_heads.data.samples.synthetic_samples`, or ``[{key: p} for p in prompts]`` for one
    question). A method that ``measures_spans`` yields :class:`~retrieval_heads.chance.SpanMasses` (every span,
    with baselines); the other methods per-sample scores. Answers are decoded when ``answers`` is set or a method
    needs them. Returns {question: :class:`Scored`}. ``on_batch(k)`` after each batch of k samples.
    """
    model, tok = lm.model, lm.tokenizer
    ms = [METHODS.get(n) for n in methods]
    fmt = PromptFormat(tok) if any("prompt_format" in m.needs for m in ms) else None
    want = answers or any("answers" in m.needs for m in ms)
    track = any("answers" in m.needs for m in ms)
    S = len(groups)
    shared = [m for m in ms if m.shared] if can_share(model) else []
    own = [m for m in ms if m not in shared]
    readers = [m for m in shared if m.row_span(fmt, groups[0][questions[0]]) is not None] if shared else []
    measured = [m for m in ms if m.measures_spans]
    spanned = any(m.measures_spans for m in readers)
    keys = any(m.reads_needle_keys for m in readers)
    null = any(m.reads_null for m in readers)
    spans = [prompt_spans(tok, g[questions[0]]) for g in groups] if spanned else \
        [{"needle": (g[questions[0]].needle_start, g[questions[0]].needle_end)} for g in groups]
    names = union_names(spans)
    device = input_device(model)
    L, H, M = lm.num_layers, lm.num_heads, len(names)
    mass = {q: {m.name: torch.zeros(S, L, H, M, device=lm.device) for m in measured} for q in questions}  # (S, L, H, M)
    base = {q: {m.name: torch.zeros(S, L, H, M, device=lm.device) for m in measured} for q in questions}  # (S, L, H, M)
    scores = {q: {m.name: torch.zeros(S, L, H, device=lm.device) for m in ms if not m.measures_spans}
              for q in questions}
    got: dict[str, list] = {q: [None] * S for q in questions}

    for end, same in (context_groups(groups, questions) if shared else []):
        for j in range(0, len(same), batch_size):
            idx = same[j : j + batch_size]
            batch = {q: [groups[i][q] for i in idx] for q in questions}
            B = len(idx)
            context = torch.tensor([p.input_ids[:end] for p in batch[questions[0]]], device=device)  # (B, C)
            cache = context_cache(model, context)
            reads = {}
            if readers:
                nulls = [null_prompt(fmt, p) for p in batch[questions[0]]] if null else []
                suffixes = [(q, batch[q]) for q in questions] + ([(None, nulls)] if null else [])  # None: "N/A"
                masks = span_masks([spans[i] for i in idx], names, end, device)  # (B, M, C)
                width = max(p.needle_end - p.needle_start for p in batch[questions[0]])
                at = None
                if keys:  # needle token j of each sample, clamped inside its needle (reads past the end are unused)
                    first = batch[questions[0]]
                    at = torch.stack([(torch.arange(width) + p.needle_start).clamp(max=p.needle_end - 1)
                                      for p in first])  # (B, P)
                rows = [_row_weights(fmt, readers, ps, end, null=q is None) for q, ps in suffixes]
                ids = [torch.tensor([p.input_ids[end:] for p in ps], device=device) for _, ps in suffixes]
                out = shared_reads(model, context, ids, rows, masks, at, cache=cache)
                reads = {q: r for (q, _), r in zip(suffixes, out)}
            decoded = _decode(model, tok, batch, questions, cache, end, max_new_tokens, track) if want else {}
            for q in questions:
                ans = decoded.get(q)
                for i, a in zip(idx, ans or ()):
                    got[q][i] = a
                ctx = MethodContext(tokenizer=tok, prompt_format=fmt, answers=ans)
                for k, m in enumerate(readers):
                    r = reads[q]
                    if m.measures_spans:
                        mass[q][m.name][idx] = r.mass[:, :, :, k].to(lm.device)
                        base[q][m.name][idx] = r.baseline[:, :, :, k].to(lm.device)
                        continue
                    real = _row_reads(r, k, names)
                    nr = _row_reads(reads[None], k, names) if m.reads_null else None
                    scores[q][m.name][idx] = m.from_reads(model, real, nr, batch[q], ctx).to(lm.device, torch.float32)
                for m in shared:
                    if m not in readers:  # reads the answers only
                        scores[q][m.name][idx] = m.from_reads(model, None, None, batch[q], ctx).to(lm.device,
                                                                                                   torch.float32)
            del cache, reads
            if on_batch is not None:
                on_batch(B)

    out: dict[str, Scored] = {}
    for q in questions:
        prompts = [g[q] for g in groups]
        answered = got[q] if shared and want else None
        if want and answered is None:  # no shared path: decode the plain way
            answered = answer_prompts(lm, prompts, max_new_tokens, batch_size, track_argmax=track)
        masses = {m.name: SpanMasses({n: mass[q][m.name][..., j] for j, n in enumerate(names)},
                                     {n: base[q][m.name][..., j] for j, n in enumerate(names)}, spans)
                  for m in measured if m in readers}
        for m in own:  # not shareable here: the method's own passes
            if m.measures_spans:
                masses[m.name] = measure_spans(lm, m, prompts, batch_size)
            else:
                scores[q][m.name] = score_prompts(lm, m.name, prompts, batch_size, answers=answered)
        out[q] = Scored({m.name: masses[m.name] for m in measured}, scores[q], answered)
    if not shared and on_batch is not None:  # the plain passes report once, at the end
        on_batch(S)
    return out


def _decode(model, tok, batch: Mapping[str, Sequence[PromptSample]], questions: Sequence[str], cache, end: int,
            max_new_tokens: int, track: bool) -> dict[str, list[Answer]]:
    """Greedy answers of every question of a batch from the context's cache: the questions whose suffixes have
    one length decode together, as rows (sample-major) of one batch on the cache repeated once per question."""
    by_length: dict[int, list[str]] = {}
    for q in questions:
        by_length.setdefault(len(batch[q][0].input_ids), []).append(q)
    out: dict[str, list[Answer]] = {q: [] for q in questions}
    for same in by_length.values():
        rows = [batch[q][b] for b in range(len(batch[same[0]])) for q in same]  # row b * len(same) + j
        grown = fork(cache)
        if len(same) > 1:
            grown.batch_repeat_interleave(len(same))  # new tensors on the fork; the context's cache is unchanged
        answers = answer_batch(model, tok, rows, max_new_tokens, track_argmax=track, cache=grown, past=end)
        for k, a in enumerate(answers):
            out[same[k % len(same)]].append(a)
    return out


def _row_weights(fmt: PromptFormat | None, readers, prompts: Sequence[PromptSample], end: int,
                 null: bool = False) -> torch.Tensor:
    """(B, J, n) weights over the suffix positions: row set k is the mean of method k's rows. On the "N/A"
    suffix (``null``) only the methods that read it get rows."""
    n = len(prompts[0].input_ids) - end
    w = torch.zeros(len(prompts), len(readers), n)  # (B, J, n)
    for k, m in enumerate(readers):
        if null and not m.reads_null:
            continue
        for b, p in enumerate(prompts):
            a, z = m.row_span(fmt, p)
            if not end <= a < z <= len(p.input_ids):
                raise ValueError(f"method {m.name!r} reads rows {a}..{z} outside the suffix ({end}..{len(p.input_ids)})")
            w[b, k, a - end : z - end] = 1.0 / (z - a)
    return w


def _row_reads(r, k: int, names: Sequence[str]) -> RowReads:
    return RowReads({n: r.mass[:, :, :, k, j] for j, n in enumerate(names)},
                    None if r.keys is None else r.keys[:, :, :, k])


def measure_spans(lm, method: Method, prompts: Sequence[PromptSample], batch_size: int = 1, progress: bool = False,
                  desc: str = "spans") -> SpanMasses:
    """The span masses of a method that ``measures_spans``, from its own passes: the mean of its rows
    (:meth:`~retrieval_heads.methods.base.Method.row_span`) on every span of each prompt, with chance
    baselines (:func:`~retrieval_heads.chance.probe_prompts`)."""
    fmt = PromptFormat(lm.tokenizer) if "prompt_format" in method.needs else None
    return probe_prompts(lm, prompts, batch_size, progress, desc, rows=lambda p: method.row_span(fmt, p))


def score_prompts(
    lm: LoadedModel, method: str, prompts: Sequence[PromptSample], batch_size: int = 1, progress: bool = False,
    desc: str = "samples", answers: Sequence | None = None,
) -> torch.Tensor:
    """Per-sample scores (S, L, H), kept on the model's device until the end. ``answers`` (one per prompt)
    go to methods that need them (see :mod:`retrieval_heads.methods`), in the batch's
    :class:`~retrieval_heads.methods.base.MethodContext`."""
    from tqdm.auto import tqdm

    m = METHODS.get(method)
    if "answers" in m.needs and answers is None:
        raise ValueError(f"method {method!r} needs the model's answers")
    ctx = MethodContext(tokenizer=lm.tokenizer,
                        prompt_format=PromptFormat(lm.tokenizer) if "prompt_format" in m.needs else None)

    def context(idx: list[int]) -> MethodContext:
        return replace(ctx, answers=[answers[i] for i in idx]) if "answers" in m.needs else ctx

    out = torch.zeros(len(prompts), lm.num_layers, lm.num_heads, device=lm.device)  # (S, L, H)
    with tqdm(total=len(prompts), desc=desc, unit="sample", disable=bar_disabled(progress), file=sys.stderr, leave=False) as bar:
        for idx in batches(prompts, batch_size):
            out[idx] = m.score_batch(lm.model, [prompts[i] for i in idx], context(idx)).to(out.device, out.dtype)
            bar.update(len(idx))
    return out
