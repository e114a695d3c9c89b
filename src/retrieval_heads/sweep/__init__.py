"""Sweeps: a grid of models x questions x token lengths x needle depths, one result JSON per experiment,
resumable.

The work is cut into *units*: one model x one token length x one needle depth x all the grid's questions, the
filing questions sharing one context pass per sample (:mod:`retrieval_heads.prefill`), each long-context task
(:mod:`retrieval_heads.data.tasks`) with a context pass of its own. The pieces are separate so that any
engine (the local loop, or a Ray driver with one actor per model) can run them, one concern per module:

- :mod:`.grid`: :func:`make_grid` / :func:`load_grid_file`, the grid, validated without loading anything;
- :mod:`.plan`: :func:`plan` (pure), the units, in order (model by model, so each model is loaded once);
  :func:`unit_status`, which of a unit's experiments are done (a valid result file with the grid's
  settings), missing, or corrupt (to recompute);
- :mod:`.compute`: :func:`compute_unit`, a loaded model + a unit -> one
  :class:`~retrieval_heads.records.DetectResult` per experiment, by :func:`~retrieval_heads.records.score_unit`,
  the one path ``detect`` takes too; no file is touched; :func:`write`, the one
  writer, atomic (samples file first, result JSON last; see :func:`~retrieval_heads.experiments.write_result`);
- :mod:`.prepare`: :func:`prepare`, the setup both engines share: check the device and every model's config
  and tokenizer, lock the output dir, read each unit's status; and the lines printed per experiment;
- :mod:`.local`: :func:`run_sweep`, the local engine: load each model once and compute / write what is not
  done, under a progress bar;
- :mod:`.ray`: :func:`run_ray_sweep`, the same sweep, its units run by Ray actors.

A unit always scores all the grid's questions (the suffix passes are cheap next to the shared context pass)
and writes those not done, so a resumed sweep computes exactly what an uninterrupted one does and ends with
the same files, whichever of a unit's files a kill left behind.

Lock: the sweep holds :func:`retrieval_heads.lock.results_lock` on its output dir for the whole run (a
second sweep, a ``detect``, ``export``, ``ablate`` or ``report`` writing there stops at once with one line).
Once it holds the lock it removes the temp files that a writer killed between write and rename left: only
names of the writer's own pattern (:func:`retrieval_heads.io.temp_target`) whose target is one of this
sweep's result or samples files, in its own method folder.

Example::

    >>> from retrieval_heads.sweep import make_grid, plan
    >>> [(u.model, u.tokens) for u in plan(make_grid(models="smollm2", tokens=[512, 1024], samples=2))]
    [('smollm2', 512), ('smollm2', 1024)]
"""

from .compute import compute_unit, write
from .grid import (DEFAULT_MODELS, DEFAULT_SAMPLES, DEFAULT_TOKENS, EXPECTED, GRID_KEYS, Grid, GridSettings,
                   check_depths, check_types, load_grid_file, make_grid, model_key)
from .local import run_sweep
from .plan import Experiment, Status, Unit, decodes, experiment_path, own_files, plan, unit_status
from .prepare import (Prepared, SweepSummary, announce, outcome_line, preflight, prepare, result_line,
                      results_folders, sweep_lock)
from .ray import ModelWorker, Payload, run_ray_sweep

__all__ = [
    "DEFAULT_MODELS", "DEFAULT_SAMPLES", "DEFAULT_TOKENS", "EXPECTED", "GRID_KEYS", "Experiment", "Grid",
    "GridSettings", "ModelWorker", "Payload", "Prepared", "Status", "SweepSummary", "Unit", "announce", "check_depths",
    "check_types", "compute_unit", "decodes", "experiment_path", "load_grid_file", "make_grid", "model_key",
    "outcome_line", "own_files", "plan", "preflight", "prepare", "result_line", "results_folders", "run_ray_sweep",
    "run_sweep", "sweep_lock", "unit_status", "write",
]
