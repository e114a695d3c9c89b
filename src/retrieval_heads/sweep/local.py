"""The local engine: :func:`run_sweep` loads each model once, in this process, and computes and writes what
is not done, printing one line per experiment under a progress bar.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .. import eager_rows
from ..console import bar_disabled, phase
from ..models import LoadedModel
from .compute import compute_unit, write
from .grid import Grid
from .prepare import SweepSummary, outcome_line, prepare

def run_sweep(
    grid: Grid,
    output_dir: str | Path,
    load: Callable[..., LoadedModel] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    check_models: bool = True,
) -> SweepSummary:
    """Run ``grid`` into ``output_dir``: skip valid results, recompute corrupt ones, write each experiment
    atomically. ``load(model, dtype=, device=, trust_remote_code=)`` loads a model (default
    :func:`~retrieval_heads.models.load_model`); ``echo`` prints a line (default: above the progress bar,
    on stdout)."""
    from tqdm.auto import tqdm

    from ..models import load_model

    load = load or load_model
    t0 = time.perf_counter()
    say = echo or (lambda s: tqdm.write(s, file=sys.stdout))
    with prepare(grid, output_dir, say, check_models) as p:
        units, statuses, summary = p.units, p.statuses, p.summary
        already = grid.size - p.todo
        bar = None  # drawn once the first model has loaded: a model that fails to load shows no bar
        lm: LoadedModel | None = None
        try:
            for unit, st in zip(units, statuses):
                todo = st.todo
                if not todo:
                    continue
                if lm is None or lm.key != st.model_key:
                    lm = None  # the previous model goes before the next one comes
                    _release_memory()
                    with phase(f"loading model {unit.model} ...", progress, bar):
                        lm = load(unit.model, dtype=grid.dtype, device=grid.device,
                                  trust_remote_code=grid.trust_remote_code)
                    if grid.eager_attentions:
                        eager_rows.enable(lm.model)
                if bar is None:
                    bar = tqdm(total=grid.size, initial=already, unit="exp", desc="sweep", file=sys.stderr,
                               disable=bar_disabled(progress), dynamic_ncols=True,
                               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} experiments "
                                          "[{elapsed}<{remaining}]")
                start, base = time.perf_counter(), bar.n
                results = compute_unit(lm, unit, grid, _advance(bar, base, len(todo)),
                                       lambda text, bar=bar: phase(text, progress, bar))
                seconds = time.perf_counter() - start
                for res in results:
                    e = (res.record["method"], res.record["question"])
                    if e not in todo:
                        continue
                    path = write(output_dir, res, grid.save_samples)
                    say(outcome_line(st, e, unit, grid, res.record, seconds))
                    (summary.recomputed if st.state[e] == "corrupt" else summary.done).append(path)
                bar.update(base + len(todo) - bar.n)
        finally:
            if bar is not None:
                bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _advance(bar, base: float, n: int) -> Callable[[float], None]:
    """Moves the bar to ``base + f * n`` when a unit of ``n`` experiments to write is ``f`` done."""
    return lambda f: bar.update(base + f * n - bar.n)


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
