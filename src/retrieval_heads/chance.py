"""Is it retrieval? Chance baselines, control spans and span kinds for a span-measuring method (the default).

For every prompt a few key spans are laid out (:func:`prompt_spans`) and the probe measures, in the one
forward pass that scores the needle, the attention mass the method's rows (the last prompt token for the
default method; :meth:`~retrieval_heads.methods.base.Method.row_span`) put on each of them and each one's
chance baseline (:func:`~retrieval_heads.methods.base.span_masses`, or the shared prefill of
:mod:`retrieval_heads.onepass`):

- ``needle``: the original method's span (Section 1); ``control:needle``: a control span as long as the needle;
- ``fact:KEY`` (synthetic samples): the tokens stating each of the needle's four facts;
  ``control:fact:KEY``: a control span as long as that fact;
- ``answer`` (``--dataset``): the answer's first whole-word occurrence in the needle; ``control:answer``.

The control span: ``n`` consecutive haystack tokens (``n`` = the target span's length) that hold none of the
needle's facts (the answer, on a dataset record) as whole words, taken from the first place that qualifies
in this order: right after the needle (starting at its end, then stepping ``n`` tokens at a time towards the
question), then right before it (ending at the separator before the needle, stepping back towards the
start). So it lies in the same neighbourhood, at the same distance or closer to the scored query: a head
that merely favours recent tokens gives the control at least as much as the needle, never less. A prompt
with no such place (a very short one) has no control span, and that sample is left out of the test.

Span kinds (``--span``), per sample and head:

- ``needle``: score = mass on the needle; compared with ``control:needle``;
- ``answer``: score = mass on the answer's tokens (synthetic: the span of the fact the question asks for);
  compared with its control span;
- ``fact``: score = mass on the asked fact minus the mean mass on the needle's other three facts; compared,
  as lifts, with those three facts (the control is the other facts, not haystack text).

``baseline``: the mass a row spreading its attention evenly over the keys it may see would put on the span
(for ``fact``: on the asked fact). ``lift = sum of scores / sum of baselines`` (for ``fact``: the asked fact's
own mass over its baseline). The test compares per-sample lifts (target vs control), so spans of different
lengths, or partly outside a sliding window, compare fairly; under uniform attention both are 1.0. Where a
layer cannot see the target or the control at all (a sliding window), the sample counts as a tie for that
layer's heads (no evidence either way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import spec, stats
from .console import bar_disabled
from .data.prompt import PromptSample
from .data.questions import QUESTIONS
from .data.spans import prompt_answer_span, whole_word_spans
from .errors import ParamError, UserError
from .methods.base import SPAN_KINDS, span_result_name  # noqa: F401  (span_result_name: also read from here)

SPANS = SPAN_KINDS
RANK_BY = spec.RANK_BY


def span_names(span: str | Sequence[str]) -> list[str]:
    """Span kinds from ``"needle,answer"`` or a list; checked, duplicates dropped, order kept."""
    items = [span] if isinstance(span, str) else list(span)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise ParamError("span", ": no span given")
    for n in names:
        if n not in SPANS:
            raise UserError(f"unknown span {n!r}; choose from: {', '.join(SPANS)}")
    return list(dict.fromkeys(names))


def check_rank_by(rank_by: str) -> str:
    if rank_by not in RANK_BY:
        raise ParamError("rank_by", f" {rank_by!r}; choose from: {', '.join(RANK_BY)}", prefix="unknown ")
    return rank_by


def check_spans_for(spans: Sequence[str], dataset: bool, question: str | None = None) -> None:
    if dataset and "fact" in spans:
        raise UserError("--span fact needs the synthetic samples (a dataset record does not say where each "
                        "fact is); use --span needle or answer with --dataset")
    if not dataset and question is not None and question not in QUESTIONS and "fact" in spans:
        raise UserError(f"--span fact needs a filing question (the needle of {question!r} states one key); "
                        "use --span needle or answer")


# --- where the spans lie ------------------------------------------------------------------------------------


def _haystack_runs(p: PromptSample, n: int) -> list[tuple[int, int]]:
    """Candidate control spans of n tokens, in the documented order: after the needle, then before it."""
    out = []
    start = p.needle_end
    while start + n <= p.context_end:
        out.append((start, start + n))
        start += n
    if p.haystack_start is not None and p.separator_start is not None:
        end = p.separator_start
        while end - n >= p.haystack_start:
            out.append((end - n, end))
            end -= n
    return out


def control_span(tokenizer, p: PromptSample, n: int, avoid: Sequence[str]) -> tuple[int, int] | None:
    """The control span of ``n`` haystack tokens (see the module docstring), or None if no place holds one."""
    for a, b in _haystack_runs(p, n):
        text = tokenizer.decode(p.input_ids[a:b])
        if not any(whole_word_spans(text, x) for x in avoid if x.strip()):
            return a, b
    return None


def prompt_spans(tokenizer, p: PromptSample) -> dict[str, tuple[int, int] | None]:
    """Every span of one prompt, by name (see the module docstring); None where a span does not exist."""
    spans: dict[str, tuple[int, int] | None] = {"needle": (p.needle_start, p.needle_end)}
    if p.fact_spans:
        targets = {f"fact:{k}": v for k, v in p.fact_spans.items()}
        avoid = [tokenizer.decode(p.input_ids[a:b]).strip() for a, b in p.fact_spans.values()]
    else:
        targets = {"answer": prompt_answer_span(tokenizer, p)}
        avoid = [p.answer]
    spans["control:needle"] = control_span(tokenizer, p, p.needle_end - p.needle_start, avoid)
    for name, span in targets.items():
        spans[name] = span
        spans[f"control:{name}"] = None if span is None else control_span(tokenizer, p, span[1] - span[0], avoid)
    return spans


def span_masks(spans: Sequence[Mapping[str, tuple[int, int] | None]], names: Sequence[str], length: int,
               device=None) -> torch.Tensor:
    """(B, M, length) 0/1 masks of the named spans of each prompt (zeros where a prompt lacks one)."""
    m = torch.zeros(len(spans), len(names), length, device=device)
    for b, sp in enumerate(spans):
        for j, name in enumerate(names):
            ab = sp.get(name)
            if ab is not None:
                m[b, j, ab[0] : ab[1]] = 1.0
    return m


def union_names(spans: Sequence[Mapping[str, object]]) -> list[str]:
    return list(dict.fromkeys(n for sp in spans for n in sp))


# --- masses of a set of prompts ------------------------------------------------------------------------------


@dataclass
class SpanMasses:
    """What the probe measured on the prompts of one experiment: per sample, every named span's mass and
    chance baseline, (S, L, H) each, and where each span is."""

    mass: dict[str, torch.Tensor]
    baseline: dict[str, torch.Tensor]
    spans: list[dict[str, tuple[int, int] | None]]


def probe_prompts(lm, prompts: Sequence[PromptSample], batch_size: int = 1, progress: bool = False,
                  desc: str = "spans", rows: Callable[[PromptSample], tuple[int, int]] | None = None) -> SpanMasses:
    """One probed forward pass per batch of prompts, every span at once: the mass that the mean of each
    prompt's query rows ``rows(p)`` ([start, end); default: the last token) puts on each span, and its
    chance baseline."""
    import sys

    from tqdm.auto import tqdm

    from .methods.base import batches, span_masses, stack_ids
    from .models import input_device

    device = input_device(lm.model)
    spans = [prompt_spans(lm.tokenizer, p) for p in prompts]
    names = union_names(spans)
    S, L, H = len(prompts), lm.num_layers, lm.num_heads
    mass = torch.zeros(S, L, H, len(names), device=lm.device)  # (S, L, H, M)
    base = torch.zeros(S, L, H, len(names), device=lm.device)  # (S, L, H, M)
    with tqdm(total=S, desc=desc, unit="sample", disable=bar_disabled(progress), file=sys.stderr, leave=False) as bar:
        for idx in batches(prompts, batch_size):
            ids = stack_ids([prompts[i] for i in idx], device)  # (B, N)
            masks = span_masks([spans[i] for i in idx], names, ids.shape[1], device)  # (B, M, N)
            positions, w = _row_weights([prompts[i] for i in idx], rows, device)
            m, b = span_masses(lm.model, ids, masks, positions)  # (B, L, H, S, M) each
            if w is None:  # the last token: its one row, as measured
                m, b = m[:, :, :, 0], b[:, :, :, 0]
            else:  # the mean over each prompt's own rows
                m = (m * w[:, None, None, :, None].to(m.device)).sum(3)  # (B, L, H, M)
                b = (b * w[:, None, None, :, None].to(b.device)).sum(3)  # (B, L, H, M)
            mass[idx], base[idx] = m.to(mass.device), b.to(base.device)
            bar.update(len(idx))
    return SpanMasses({n: mass[..., j] for j, n in enumerate(names)},
                      {n: base[..., j] for j, n in enumerate(names)}, spans)


def _row_weights(batch: Sequence[PromptSample], rows, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Query positions and (B, S) weights (1/len on each prompt's own rows) for :func:`probe_prompts`;
    (None, None) when every prompt's rows are its last token (the probe's default row)."""
    spans = [rows(p) if rows is not None else (len(p.input_ids) - 1, len(p.input_ids)) for p in batch]
    if all(span == (len(p.input_ids) - 1, len(p.input_ids)) for span, p in zip(spans, batch)):
        return None, None
    lo, hi = min(a for a, _ in spans), max(z for _, z in spans)
    w = torch.zeros(len(batch), hi - lo)  # (B, S)
    for i, (a, z) in enumerate(spans):
        w[i, a - lo : z - lo] = 1.0 / (z - a)
    return torch.arange(lo, hi, device=device), w


# --- from masses to a result -------------------------------------------------------------------------------------


@dataclass
class SpanScores:
    """One span kind's numbers for one experiment; tensors (S, L, H) float64 on the CPU."""

    span: str
    score: torch.Tensor  # per-sample score (the result's scores are its sum)
    baseline: torch.Tensor  # per-sample chance baseline of the target span
    target: torch.Tensor  # per-sample mass on the target span (lift numerator; = score but for fact)
    control: torch.Tensor  # per-sample mass on the control (fact: mean mass on the other facts)
    target_lift: torch.Tensor  # per-sample lift on the target span
    control_lift: torch.Tensor  # per-sample lift on the control (fact: mean over the other facts)
    tested: torch.Tensor  # (S,) bool: the sample has its spans and goes into the test

    @property
    def lift(self) -> torch.Tensor:
        """(L, H): sum of target masses over sum of baselines; 0 where the baseline is 0."""
        return torch.from_numpy(stats.lift(self.target.sum(0).numpy(), self.baseline.sum(0).numpy()))


def _fact_key(p: PromptSample) -> str | None:
    if not p.question_key or p.question_key not in QUESTIONS:
        return None
    return QUESTIONS.get(p.question_key).fact


def span_scores(sm: SpanMasses, prompts: Sequence[PromptSample], span: str) -> SpanScores:
    """The scores of span kind ``span`` from the masses of every named span (see the module docstring)."""
    L, H = next(iter(sm.mass.values())).shape[1:]
    S = len(prompts)
    z = lambda: torch.zeros(S, L, H, dtype=torch.float64)  # noqa: E731
    score, baseline, target, control, t_lift, c_lift, c_base = z(), z(), z(), z(), z(), z(), z()
    tested = torch.zeros(S, dtype=torch.bool)

    def get(name: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, b = sm.mass[name][i].double().cpu(), sm.baseline[name][i].double().cpu()
        return m, b

    def lift_of(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(stats.lift(m.numpy(), b.numpy()))

    for i, p in enumerate(prompts):
        sp = sm.spans[i]
        if span == "fact":
            key = _fact_key(p)
            if not p.fact_spans or key not in p.fact_spans:
                raise UserError("--span fact needs the synthetic samples, whose needles say where each fact is")
            others = [k for k in p.fact_spans if k != key]
            m, b = get(f"fact:{key}", i)
            om = [get(f"fact:{k}", i) for k in others]
            score[i] = m - torch.stack([x for x, _ in om]).mean(0)
            baseline[i], target[i], control[i] = b, m, torch.stack([x for x, _ in om]).mean(0)
            t_lift[i] = lift_of(m, b)
            c_lift[i] = torch.stack([lift_of(x, y) for x, y in om]).mean(0)
            c_base[i] = torch.stack([y for _, y in om]).min(0).values  # every other fact in sight
            tested[i] = True
            continue
        name = "needle" if span == "needle" else (f"fact:{_fact_key(p)}" if p.fact_spans else "answer")
        if sp.get(name) is None:  # the needle does not hold the answer: score 0, out of the test
            continue
        m, b = get(name, i)
        score[i], baseline[i], target[i], t_lift[i] = m, b, m, lift_of(m, b)
        if sp.get(f"control:{name}") is not None:
            cm, cb = get(f"control:{name}", i)
            control[i], c_lift[i], c_base[i] = cm, lift_of(cm, cb), cb
            tested[i] = True
    # A layer that cannot see the target or the control at all (sliding window) gives no evidence: a tie.
    blind = (baseline == 0) | (c_base == 0)  # (S, L, H)
    c_lift = torch.where(blind, t_lift, c_lift)
    return SpanScores(span, score, baseline, target, control, t_lift, c_lift, tested)


def chance_fields(ss: SpanScores, alpha: float = stats.DEFAULT_ALPHA, accuracy: Mapping | None = None) -> dict:
    """The fields a span-measuring method's result gains (JSON-ready; see docs/result-format.md)."""
    L, H = ss.score.shape[1:]
    lift = ss.lift.numpy()
    t = ss.tested
    sig = stats.significance(ss.target_lift[t].numpy(), ss.control_lift[t].numpy(), alpha)
    sig["samples_left_out"] = int((~t).sum())
    if sig["samples_left_out"]:
        sig["note"] = (sig["note"] + "; " if sig["note"] else "") + \
            f"{sig['samples_left_out']} sample(s) without a span or control span left out"
    k = int(np.argmax(lift.reshape(-1)))  # first of the highest: lowest (layer, head)
    top_head, top_lift = stats.head_label(k // H, k % H), float(lift.reshape(-1)[k])
    acc = accuracy or {}
    line = stats.verdict(len(sig["heads"]), alpha, int(t.sum()), top_lift, top_head, acc.get("n_correct"),
                         acc.get("n_answered"), too_few=sig["min_attainable_p"] > alpha)
    if not bool(t.any()):  # e.g. prompts too short to hold a control span as long as the needle
        line = f"no test: no sample has both the span and a control span; top lift {top_lift:.1f}x ({top_head})"
        if acc.get("n_answered"):
            line += f"; accuracy {acc.get('n_correct')}/{acc.get('n_answered')}"
    return {
        "span": ss.span,
        "baseline": [[round(float(x), 8) for x in row] for row in ss.baseline.sum(0)],
        "lift": [[round(float(x), 6) for x in row] for row in lift],
        "control_scores": [[round(float(x), 6) for x in row] for row in ss.control.sum(0)],
        "significance": sig,
        "verdict": line,
    }
