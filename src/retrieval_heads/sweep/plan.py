"""The plan of a sweep: its units of work, in order, and which of a unit's experiments are done.

- :func:`plan` (pure): the units, in order (model by model, so each model is loaded once);
- :func:`unit_status`: which of a unit's experiments are done (a valid result file with the grid's
  settings), missing, or corrupt (to recompute);
- :func:`own_files`: every file a sweep may write (the lock removes only their killed writers' temp files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..attention import attention_path
from ..errors import UserError
from ..models import model_identity
from ..results import MisnamedResult, identity_of, load_result, result_path, samples_path, samples_problem
from .grid import Grid, model_key

@dataclass(frozen=True)
class Unit:
    """One model x one token length x one needle depth x the grid's questions: one context pass per sample."""

    model: str
    tokens: int
    questions: tuple[str, ...]
    depth: float = 0.5  # the needle's depth in the haystack


Experiment = tuple  # (result name, question): one result of a unit


@dataclass
class Status:
    """Per experiment (result name, question) of a unit: "done", "missing" or "corrupt" (with the reason)."""

    unit: Unit
    model_key: str
    state: dict[Experiment, str] = field(default_factory=dict)
    reason: dict[Experiment, str] = field(default_factory=dict)

    @property
    def todo(self) -> list[Experiment]:
        return [e for e, s in self.state.items() if s != "done"]


def plan(grid: Grid) -> list[Unit]:
    """The units of ``grid``, model by model (each model is loaded once), lengths and then depths in the grid's
    order."""
    return [Unit(m, t, grid.questions, d) for m in grid.models for t in grid.tokens for d in grid.needle_positions]


def experiment_path(output_dir: str | Path, grid: Grid, key: str, question: str, tokens: int,
                    depth: float = 0.5, method: str | None = None) -> Path:
    return result_path(output_dir, method or grid.results[0], key, question, tokens, depth)


def _settings_mismatch(record: dict, grid: Grid, depth: float | None = None) -> str | None:
    """How a result's settings differ from this sweep's (its needle_position from its unit's ``depth``)."""
    depth = grid.needle_position if depth is None else depth
    want = {"samples_processed": grid.samples, "needle_position": depth, "seed": grid.seed,
            "dtype": grid.dtype, "rank_by": grid.rank_by}
    for k, v in want.items():  # seed and dtype are in every result made with provenance: one without them
        if (k in record or k in ("seed", "dtype")) and record.get(k) != v:  # was edited, and passes for none
            return f"{k} {record.get(k, 'missing')!r} (this sweep: {v!r})"
    extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
    if decodes(grid) and "max_new_tokens" in extra:
        q = record.get("question")
        want_budget = answer_budget(grid, q) if isinstance(q, str) else grid.max_new_tokens
        if extra["max_new_tokens"] != want_budget:
            return f"max_new_tokens {extra['max_new_tokens']!r} (this sweep: {want_budget!r})"
    return None


def answer_budget(grid: Grid, question: str) -> int:
    """The longest greedy answer the sweep decodes (and records) for ``question``: a task's own budget
    (:func:`~retrieval_heads.data.tasks.decode_budget`) unless the grid sets one other than the default."""
    from ..data.tasks import decode_budget
    from ..defaults import DEFAULT_MAX_NEW_TOKENS

    return decode_budget(question) if grid.max_new_tokens == DEFAULT_MAX_NEW_TOKENS else grid.max_new_tokens


def decodes(grid: Grid) -> bool:
    """Whether the grid's results depend on the model's greedy answers (``answers``, or a method that reads
    them), and so on ``max_new_tokens``."""
    from ..methods import METHODS

    return grid.answers or any("answers" in METHODS.get(m).needs for m in grid.methods)


def _identity_mismatch(record: dict, identity: dict) -> str | None:
    """How a result's recorded identity differs from this sweep's model (no dataset), or None. A result
    without provenance (an older version's) cannot be matched."""
    if not isinstance(record.get("provenance"), dict):
        return "no recorded provenance (an older version's result)"
    got, want = identity_of(record), dict(identity, dataset_sha256=None)
    for k in ("source", "revision", "weights_sha256", "dataset_sha256"):
        if got.get(k) != want.get(k):
            what = "dataset sha256" if k == "dataset_sha256" else f"model {k}".replace("_", " ")
            return f"another {what}: {got.get(k)!r} (this sweep: {want.get(k)!r})"
    return None


def unit_status(output_dir: str | Path, grid: Grid, unit: Unit, key: str | None = None,
                identity: dict | None = None) -> Status:
    """Which of the unit's experiments are done. A result file that is valid but was made with other
    settings (samples, needle position, seed, dtype) or by another model (:func:`model_identity`: source and
    weights) is a UserError: it is neither trusted nor overwritten. With ``save_samples``, a result whose
    samples file does not belong to it (truncated, other rows) is recomputed."""
    key = key or model_key(unit.model)
    identity = identity or model_identity(unit.model)
    st = Status(unit, key)
    for m, q in ((m, q) for m in grid.results for q in unit.questions):
        exp = (m, q)
        path = experiment_path(output_dir, grid, key, q, unit.tokens, unit.depth, m)
        if not path.exists():
            st.state[exp] = "missing"
            continue
        try:
            record = load_result(path)
        except MisnamedResult as e:  # another experiment's result under this one's name: not trusted, not replaced
            raise UserError(f"{e}; use another --output-dir or move it away") from None
        except UserError as e:
            st.state[exp] = "corrupt"
            st.reason[exp] = str(e).removeprefix(f"{path}: ")
            continue
        other = _settings_mismatch(record, grid, unit.depth) or _identity_mismatch(record, identity)
        if other:
            raise UserError(f"{path} was made with {other}; use another --output-dir or move it away")
        if grid.answers and not (isinstance(record.get("extra"), dict) and "accuracy" in record["extra"]):
            st.state[exp] = "missing"  # made without answers; one made with them serves a sweep without
            st.reason[exp] = "no answers recorded"
            continue
        if grid.save_samples and not samples_path(path).exists():
            st.state[exp] = "missing"
            st.reason[exp] = "no samples file"
            continue
        bad = samples_problem(path, record) if grid.save_samples else None
        if bad:
            st.state[exp] = "corrupt"
            st.reason[exp] = bad
            continue
        if grid.save_attention and not attention_path(path).exists():
            st.state[exp] = "missing"
            st.reason[exp] = "no attention file"
            continue
        st.state[exp] = "done"
    return st



def own_files(output_dir: str | Path, grid: Grid, keys: dict[str, str] | None = None) -> list[Path]:
    """Every file the sweep of ``grid`` may write under ``output_dir``: its results and samples files."""
    keys = keys or {m: model_key(m) for m in grid.models}
    out = []
    for u in plan(grid):
        for m in grid.results:
            for q in u.questions:
                path = experiment_path(output_dir, grid, keys[u.model], q, u.tokens, u.depth, m)
                out += [path, samples_path(path)]
    return out
