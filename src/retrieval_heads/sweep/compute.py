"""One unit of work: a loaded model + a unit -> one result per experiment, and the one writer of results.

- :func:`compute_unit`: one :class:`~retrieval_heads.records.DetectResult` per experiment, from the grid's
  settings by :func:`~retrieval_heads.records.score_unit` (the path ``detect`` takes); no file is touched;
- :func:`write`: the one writer, atomic (samples file first, result JSON last; see
  :func:`~retrieval_heads.experiments.write_result`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..experiments import build_prompts, write_result
from ..models import LoadedModel
from ..records import DetectResult, score_unit
from .grid import Grid
from .plan import Unit, answer_budget


def compute_unit(
    lm: LoadedModel, unit: Unit, grid: Grid, on_progress: Callable[[float], None] | None = None,
    on_phase: Callable[[str], Any] | None = None,
) -> list[DetectResult]:
    """Score every method x question of ``unit`` on ``lm``: one :class:`DetectResult` per experiment, record
    included, by the one path that :func:`~retrieval_heads.experiments.detect` takes too
    (:func:`~retrieval_heads.records.score_unit`): a unit of one question gives ``detect``'s very records.
    The grid's settings that ``detect`` has and the sweep does not (``alpha``, ``success_only``) take
    ``detect``'s defaults. Writes nothing. ``on_progress(f)`` gets the fraction of the unit done so far;
    ``on_phase(text)``, a context manager, wraps a long phase that moves no bar (saving attention rows;
    :func:`~retrieval_heads.console.phase`)."""
    groups = build_prompts(lm, unit.questions, unit.tokens, grid.samples, unit.depth, grid.seed)
    budget = {q: answer_budget(grid, q) for q in unit.questions}  # a task's own, unless the grid sets one
    return score_unit(lm, groups, grid.methods, grid.span.split(","), tokens=unit.tokens,
                      needle_position=unit.depth, seed=grid.seed, answers=grid.answers, max_new_tokens=budget,
                      rank_by=grid.rank_by, batch_size=grid.batch_size, save_attention=grid.save_attention,
                      on_progress=on_progress or (lambda f: None), on_phase=on_phase)


def write(output_dir: str | Path, result: DetectResult, save_samples: bool = False) -> Path:
    """The one writer of sweep results: atomic, the same files and format as ``detect``."""
    result.path = write_result(output_dir, result.record, result.prompts, result.sample_scores, save_samples,
                               result.answers, attention=result.attention, spans=result.spans)
    return result.path
