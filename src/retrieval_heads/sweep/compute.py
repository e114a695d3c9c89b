"""One unit of work: a loaded model + a unit -> one result per experiment, and the one writer of results.

- :func:`compute_unit`: one :class:`~retrieval_heads.experiments.DetectResult` per experiment; no file is
  touched;
- :func:`write`: the one writer, atomic (samples file first, result JSON last; see
  :func:`~retrieval_heads.experiments.write_result`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..console import plural
from ..data.tasks import context_families, decode_budget
from ..defaults import DEFAULT_MAX_NEW_TOKENS
from ..experiments import DetectResult, write_result
from ..models import LoadedModel
from .grid import Grid
from .plan import Unit

def compute_unit(
    lm: LoadedModel, unit: Unit, grid: Grid, on_progress: Callable[[float], None] | None = None,
    on_phase: Callable[[str], Any] | None = None,
) -> list[DetectResult]:
    """Score every method x question of ``unit`` on ``lm``: one :class:`DetectResult` per experiment, record
    included, as :func:`~retrieval_heads.experiments.detect` would make it (equal within float tolerance:
    here every method, question and the answers share one context pass per sample,
    :mod:`retrieval_heads.onepass`). Writes nothing. ``on_progress(f)`` gets the fraction of the unit done so
    far; ``on_phase(text)``, a context manager, wraps a long phase that moves no bar (saving attention rows;
    :func:`~retrieval_heads.console.phase`)."""
    import torch

    from ..chance import chance_fields, span_result_name, span_scores
    from ..experiments import build_prompts, synthetic_record
    from ..generation import accuracy
    from ..methods import METHODS
    from ..onepass import score_groups

    progress = on_progress or (lambda f: None)
    groups = build_prompts(lm, unit.questions, unit.tokens, grid.samples, unit.depth, grid.seed)
    families = context_families(unit.questions)  # the filing questions share a context; a task has its own

    def budget(q: str) -> int:  # the grid's; a task's own unless the grid sets one other than the default
        return decode_budget(q) if grid.max_new_tokens == DEFAULT_MAX_NEW_TOKENS else grid.max_new_tokens
    done = 0

    def on_batch(k: int) -> None:
        nonlocal done
        done += k
        progress(done / (len(groups) * len(families)))

    scored = {}
    for fam in families:
        scored.update(score_groups(lm, groups, fam, grid.methods, grid.answers, budget(fam[0]),
                                   grid.batch_size, on_batch))
    out = []
    spans = grid.span.split(",")
    for m in grid.methods:
        for sp, q in ((sp, q) for sp in METHODS.get(m).result_spans(spans) for q in unit.questions):
            prompts, sc = [g[q] for g in groups], scored[q]
            got = sc.answers
            answered = None if got is None else dict(accuracy(got), max_new_tokens=budget(q))
            if METHODS.get(m).measures_spans:  # every span kind from the same masses
                ss = span_scores(sc.span_masses[m], prompts, sp)
                scores = ss.score.to(lm.device, torch.float32)  # (S, L, H): the probe's float32 masses
                record = synthetic_record(lm, span_result_name(m, sp), q, unit.tokens, unit.depth, grid.seed,
                                          scores, added=chance_fields(ss, accuracy=answered),
                                          rank_by=grid.rank_by, answered=answered)
                out.append(DetectResult(scores.sum(0).cpu(), scores.cpu(), prompts, record, lift=ss.lift.float(),
                                        rank_by=grid.rank_by, spans=ss, answers=got))
                continue
            scores = sc.scores[m].to(lm.device, torch.float32)  # (S, L, H)
            record = synthetic_record(lm, m, q, unit.tokens, unit.depth, grid.seed, scores, answered=answered)
            out.append(DetectResult(scores.sum(0).cpu(), scores.cpu(), prompts, record, answers=got))
    if grid.save_attention:  # rankings final: one more probed pass per question and sample, for every result
        from ..attention_capture import for_unit

        text = (f"saving the top {grid.save_attention} heads' attention rows of {plural(len(out), 'result')} "
                f"({plural(len(groups), 'sample')}) ...")
        with on_phase(text) if on_phase is not None else nullcontext():
            for_unit(lm, out, grid.save_attention, grid.batch_size)
    return out


def write(output_dir: str | Path, result: DetectResult, save_samples: bool = False) -> Path:
    """The one writer of sweep results: atomic, the same files and format as ``detect``."""
    result.path = write_result(output_dir, result.record, result.prompts, result.sample_scores, save_samples,
                               result.answers, attention=result.attention, spans=result.spans)
    return result.path
