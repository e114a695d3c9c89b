"""One path from samples to result records: :func:`score_unit` scores a *unit* (the questions of one model at
one length and needle depth, on the same samples) by every method and span kind, and builds each result's
record. ``detect`` (:func:`retrieval_heads.experiments.detect`) is a unit of one question, without the sweep
or its lock; the sweep (:func:`retrieval_heads.sweep.compute_unit`) calls it for each of its units. So the two
cannot drift: the same settings give the same records, byte for byte (``tests/test_one_path.py``).

- :class:`DetectResult`: one result (scores, prompts, record, answers, chance fields, attention file);
- :func:`score_unit`: a unit's results, in order method -> span kind -> question; no file is touched;
- :func:`experiment_record`: the one builder of a result record (:func:`~retrieval_heads.results.make_record`
  with the model's fields).

>>> from retrieval_heads.records import score_unit                                  # doctest: +SKIP
>>> groups = build_prompts(lm, ["inc_state", "hq_state"], 512, 4, 0.5, 0)         # doctest: +SKIP
>>> [r.record["method"] for r in score_unit(lm, groups, ["summed_attention"], tokens=512, needle_position=0.5,
...                                         seed=0)]                               # doctest: +SKIP
['summed_attention', 'summed_attention']
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .console import bar_disabled, phase, plural
from .data.prompt import PromptSample
from .data.tasks import context_families, question_text
from .defaults import DEFAULT_MAX_NEW_TOKENS
from .families import attention_layers
from .methods import METHODS
from .results import make_provenance, make_record, ranking

if TYPE_CHECKING:
    from .models import LoadedModel


@dataclass
class DetectResult:
    """Scores of one experiment. ``scores`` (L, H) is the sum over samples of ``sample_scores`` (S, L, H)."""

    scores: torch.Tensor
    sample_scores: torch.Tensor
    prompts: list[PromptSample]
    record: dict
    path: Path | None = None
    answers: list | None = None  # the model's greedy answers (generation.Answer), when they were asked for
    attention: bytes | None = None  # the saved attention file (attention.pack), with save_attention
    lift: torch.Tensor | None = None  # (L, H) score over chance baseline (a span-measuring method's results)
    rank_by: str = "score"
    spans: object | None = None  # chance.SpanScores: per-sample baselines, control masses, lifts

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The top k heads as (head, score), ordered by ``rank_by``."""
        return [(h, s) for h, s, _ in self.top_rows(k)]

    def top_rows(self, k: int = 10) -> list[tuple[str, float, float | None]]:
        """The top k heads as (head, score, lift or None), ordered by ``rank_by``."""
        from .results import parse_head

        order = ranking(self.lift if self.rank_by == "lift" and self.lift is not None else self.scores,
                        self.record.get("attention_layers"))[:k]
        out = []
        for h, _ in order:
            layer, head = parse_head(h)
            out.append((h, float(self.scores[layer, head]),
                        None if self.lift is None else float(self.lift[layer, head])))
        return out


def score_unit(
    lm: LoadedModel, groups: Sequence[Mapping[str, PromptSample]], methods: Sequence[str],
    spans: Sequence[str] = ("needle",), *, tokens: int, needle_position: float, seed: int,
    answers: bool = False, max_new_tokens: int | Mapping[str, int] = DEFAULT_MAX_NEW_TOKENS, success_only: bool = False,
    alpha: float = 0.05, rank_by: str = "score", batch_size: int = 1, one_prefill: bool = True,
    save_attention: int = 0, question_prompts: Mapping[str, str] | None = None, provenance: dict | None = None,
    progress: bool = False, on_progress: Callable[[float], None] | None = None,
    on_phase: Callable[[str], AbstractContextManager] | None = None,
) -> list[DetectResult]:
    """Score every method x span kind x question of a unit and build each result's record, as ``detect``
    writes it; writes nothing. The order is method -> span kind -> question.

    ``groups``: per sample, {question key: prompt} (:func:`~retrieval_heads.experiments.build_prompts`; a
    dataset's prompts as ``[{key: p} for p in prompts]``); the keys are the records' ``question`` and
    ``question_prompts`` (default: the question's text) their ``question_prompt``. ``tokens``,
    ``needle_position`` and ``seed`` are recorded as given. ``spans``: the span kinds of a method that
    ``measures_spans`` (each a result of its own); other methods give one result each.

    The model's greedy answers (at most ``max_new_tokens``, or ``max_new_tokens[key]`` per question) are
    decoded when ``answers`` is set, with ``success_only`` (only correctly answered samples count; results
    named ``{method}_success``) or when a method needs them; their accuracy and budget go in ``extra``.
    ``alpha``: the level of a span result's test against its control; ``rank_by``: its ranking (score or
    lift).

    One context pass per sample serves every method, span, question and the answers
    (:func:`~retrieval_heads.onepass.score_groups`; the questions that share a context,
    :func:`~retrieval_heads.data.tasks.context_families`, share it) whenever more than one pass per sample
    would run; a span-measuring method alone on one question without answers, and every method with
    ``one_prefill=False``, runs its own passes (equal within float tolerance).

    ``save_attention`` K > 0: each result also gets its top-K heads' attention rows (one more probed pass per
    question and sample, :func:`~retrieval_heads.attention_capture.for_unit`), in ``DetectResult.attention``.
    ``provenance``: the records' (default: the model's identity, no dataset).

    Progress: ``on_progress(f)`` gets the fraction of the scoring done; without it, ``progress`` draws bars
    (on a terminal). ``on_phase(text)``, a context manager, wraps the silent attention pass (default:
    :func:`~retrieval_heads.console.phase` with ``progress``).
    """
    from .chance import chance_fields, span_result_name, span_scores
    from .generation import accuracy

    keys = list(groups[0]) if groups else []
    ms = [METHODS.get(n) for n in methods]
    track = any("answers" in m.needs for m in ms)
    want = answers or success_only or track
    budget = (lambda q: max_new_tokens) if isinstance(max_new_tokens, int) else max_new_tokens.__getitem__
    shared = one_prefill and (want or len(ms) > 1 or len(keys) > 1 or not ms[0].measures_spans)
    scored = _scored(lm, groups, keys, ms, want, track, budget, batch_size, shared, progress, on_progress)
    provenance = make_provenance(lm.identity) if provenance is None else provenance
    question_prompts = question_prompts or {q: question_text(q) for q in keys}
    out = []
    for m in ms:
        rname = m.result_name(success_only)
        success = rname != m.name or m.success_only  # recorded: only correctly answered samples count
        for sp, q in ((sp, q) for sp in m.result_spans(spans) for q in keys):
            prompts, got = [g[q] for g in groups], scored[q].answers
            extra = {"num_key_value_heads": lm.num_kv_heads,
                     **({} if got is None else dict(accuracy(got), max_new_tokens=budget(q))), "success_only": success}
            keep = torch.tensor([a.correct for a in got], dtype=torch.bool) if rname != m.name else None  # (S,)
            ident = dict(question=q, question_prompt=question_prompts[q], tokens=tokens,
                         needle_position=needle_position, seed=seed, extra=extra, provenance=provenance)
            if m.measures_spans:  # every span kind from the same masses
                ss = span_scores(scored[q].span_masses[m.name], prompts, sp)
                if keep is not None:  # wrong answers count 0 and stay out of the test
                    for f in ("score", "baseline", "target", "control"):
                        setattr(ss, f, getattr(ss, f) * keep[:, None, None])
                    ss.tested = ss.tested & keep
                scores = ss.score.to(lm.device, torch.float32)  # (S, L, H): the probe's float32 masses
                added = chance_fields(ss, alpha, extra if got is not None else None)
                record = experiment_record(lm, span_result_name(rname, sp), sample_scores=scores, added=added,
                                           rank_by=rank_by, **ident)
                out.append(DetectResult(scores.sum(0).cpu(), scores.cpu(), prompts, record, answers=got,
                                        lift=ss.lift.float(), rank_by=rank_by, spans=ss))
                continue
            scores = scored[q].scores[m.name].to(lm.device, torch.float32)  # (S, L, H)
            if keep is not None:
                scores = scores * keep.to(scores.device, scores.dtype)[:, None, None]  # wrong answers count 0
            record = experiment_record(lm, rname, sample_scores=scores, **ident)
            out.append(DetectResult(scores.sum(0).cpu(), scores.cpu(), prompts, record, answers=got))
    if save_attention:  # rankings final: one more probed pass per question and sample, for every result
        from .attention_capture import for_unit

        text = (f"saving the top {save_attention} heads' attention rows of {plural(len(out), 'result')} "
                f"({plural(len(groups), 'sample')}) ...")
        with on_phase(text) if on_phase is not None else phase(text, progress):
            for_unit(lm, out, save_attention, batch_size)
    return out


def _scored(lm, groups, keys, ms, want, track, budget, batch_size, shared, progress, on_progress) -> dict:
    """{question: :class:`~retrieval_heads.onepass.Scored`}: from one context pass per sample (``shared``),
    else from each method's own passes (and the answers' own decoding)."""
    from .generation import answer_prompts
    from .onepass import Scored, measure_spans, score_groups, score_prompts

    names = [m.name for m in ms]
    if not shared:
        out = {}
        for q in keys:
            prompts = [g[q] for g in groups]
            got = answer_prompts(lm, prompts, budget(q), batch_size, track_argmax=track, progress=progress) \
                if want else None
            masses = {m.name: measure_spans(lm, m, prompts, batch_size, progress, desc=m.name)
                      for m in ms if m.measures_spans}
            scores = {m.name: score_prompts(lm, m.name, prompts, batch_size, progress, desc=m.name, answers=got)
                      for m in ms if not m.measures_spans}
            out[q] = Scored(masses, scores, got)
        if on_progress is not None:
            on_progress(1.0)
        return out
    from tqdm.auto import tqdm

    families = context_families(keys)  # the filing questions share a context; a task has its own
    total = len(groups) * len(families)
    done = 0
    with tqdm(total=total, desc="samples", unit="sample", disable=on_progress is not None or bar_disabled(progress),
              file=sys.stderr, leave=False) as bar:
        def on_batch(k: int) -> None:
            nonlocal done
            done += k
            bar.update(k)
            if on_progress is not None:
                on_progress(done / total)

        out = {}
        for fam in families:
            out.update(score_groups(lm, groups, fam, names, want, budget(fam[0]), batch_size, on_batch))
    return out


def experiment_record(
    lm: LoadedModel, method: str, question: str, question_prompt: str, tokens: int, needle_position: float,
    seed: int, sample_scores: torch.Tensor, extra: dict, provenance: dict, added: dict | None = None,
    rank_by: str = "score",
) -> dict:
    """The one builder of an experiment's result record (:func:`score_unit`'s):
    ``method`` is the result's name, ``question`` its key; the scores are the sum of the per-sample scores
    (S, L, H) over samples; the dtype is the model's. ``extra``, ``provenance``, ``added`` and ``rank_by``
    as in :func:`~retrieval_heads.results.make_record`."""
    return make_record(
        method=method, model_key=lm.key, model_name=lm.name, question=question, question_prompt=question_prompt,
        total_tokens=tokens, needle_position=needle_position, scores=sample_scores.sum(0),
        samples_processed=sample_scores.shape[0], seed=seed,
        dtype=str(next(lm.model.parameters()).dtype).removeprefix("torch."), extra=extra, added=added,
        rank_by=rank_by, provenance=provenance, attention_layers=attention_layers(lm.model.config),
    )

