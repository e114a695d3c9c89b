"""Sweeps: a grid of models x questions x token lengths x needle depths, one result JSON per experiment,
resumable.

The work is cut into *units*: one model x one token length x one needle depth x all the grid's questions, the
filing questions sharing one context pass per sample (:mod:`retrieval_heads.prefill`), each long-context task
(:mod:`retrieval_heads.data.tasks`) with a context pass of its own. The pieces are separate so that any
engine (this module's local loop, or a Ray driver with one actor per model) can run them:

- :func:`make_grid` / :func:`load_grid_file`: the grid, validated without loading anything;
- :func:`plan` (pure): the units, in order (model by model, so each model is loaded once);
- :func:`unit_status`: which of a unit's experiments are done (a valid result file with the grid's
  settings), missing, or corrupt (to recompute);
- :func:`compute_unit`: a loaded model + a unit -> one :class:`~retrieval_heads.experiments.DetectResult`
  per question; no file is touched;
- :func:`write`: the one writer, atomic (samples file first, result JSON last; see
  :func:`~retrieval_heads.experiments.write_result`);
- :func:`run_sweep`: the local engine: check every model's config and tokenizer, lock the output dir,
  then load each model once and compute / write what is not done, printing one line per experiment under a
  progress bar.

A unit always scores all the grid's questions (the suffix passes are cheap next to the shared context pass)
and writes those not done, so a resumed sweep computes exactly what an uninterrupted one does and ends with
the same files, whichever of a unit's files a kill left behind.

Lock: the sweep holds :func:`retrieval_heads.lock.results_lock` on its output dir for the whole run (a
second sweep, a ``detect``, ``export``, ``ablate`` or ``report`` writing there stops at once with one line).
Once it holds the lock it removes the temp files that a writer killed between write and rename left: only
names of the writer's own pattern (:func:`retrieval_heads.io.temp_target`) whose target is one of this
sweep's result or samples files, in its own method folder.

Grid files are typed strictly (:class:`GridSettings`, pydantic): a value of the wrong type is one line
naming the field; flags given on the command line override the file, both ways.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from . import eager_rows
from .attention import attention_path
from .console import bar_disabled, phase, plural
from .data.questions import QUESTIONS
from .data.tasks import check_question, context_families, decode_budget
from .defaults import DEFAULT_MAX_NEW_TOKENS
from .errors import UserError, first_line
from .experiments import DetectResult, check_args, write_result
from .hf import check_tokenizer
from .lock import results_lock
from .models import (DTYPES, MODELS, LoadedModel, check_causal_lm, check_device, hub_access, model_identity,
                     resolve)
from .registry import Registry
from .results import (MisnamedResult, depth_text, identity_of, load_result, result_path,
                      samples_path, samples_problem)

DEFAULT_MODELS = ("smollm2",)  # as detect's; the original study's pair is --models instruct base
DEFAULT_TOKENS = (2048, 4096, 6144, 8192)
DEFAULT_SAMPLES = 6  # per unit of a grid


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: every model x question x token length x needle depth, with one set of experiment
    settings. A depth other than the default 0.5 files its results under names of their own
    (:func:`~retrieval_heads.results.file_name`)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    questions: tuple[str, ...] = tuple(QUESTIONS)
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    samples: int = DEFAULT_SAMPLES
    needle_positions: tuple[float, ...] = (0.5,)  # the needle depths, each its own unit of work
    seed: int = 0
    method: str = "summed_attention"  # one method, or several comma-separated: all from one prefill per sample
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 1
    save_samples: bool = False
    trust_remote_code: bool = False
    eager_attentions: bool = False  # score families without the attention interface (eager_rows)
    save_attention: int = 0  # K: save the top-K heads' attention rows beside each result (0: off)
    rank_by: str = "score"
    answers: bool = False  # also decode the model's greedy answers: accuracy in each result's extra
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # longest greedy answer (answers, retrieval_score)
    span: str = "needle"  # span kinds of span-measuring methods, comma-separated (chance.SPANS), each its own result

    @property
    def methods(self) -> tuple[str, ...]:
        """The grid's methods (``method`` split at commas)."""
        return tuple(self.method.split(","))

    @property
    def results(self) -> tuple[str, ...]:
        """The result names of each experiment: every method, a method that measures spans once per span kind
        (``summed_attention``, ``summed_attention+answer``, ...; :meth:`~.methods.base.Method.result_names`)."""
        from .methods import METHODS

        spans = self.span.split(",")
        return tuple(r for m in self.methods for r in METHODS.get(m).result_names(spans))

    @property
    def size(self) -> int:
        return len(self.models) * len(self.questions) * len(self.tokens) * len(self.needle_positions) * \
            len(self.results)

    @property
    def needle_position(self) -> float:
        """The grid's first needle depth (its only one, unless ``needle_positions`` names several); a unit's
        own depth is :attr:`Unit.depth`."""
        return self.needle_positions[0]


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


# --- the grid -------------------------------------------------------------------------------------------

GRID_KEYS = Registry("grid setting")
for _k in ("models", "questions", "tokens", "samples", "needle_position", "needle_positions", "seed", "method",
           "dtype", "device", "batch_size", "save_samples", "trust_remote_code", "save_attention", "rank_by", "answers",
           "span", "eager_attentions", "max_new_tokens"):
    GRID_KEYS.register(_k, _k)


def model_key(model: str) -> str:
    """The key a model's results are filed under, without loading it (raises UserError for an unknown key or
    a missing path)."""
    return MODELS.get(model).key if model in MODELS else resolve(model)[0]


def _unique(items) -> tuple:
    return tuple(dict.fromkeys(items))


def _names(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    out = []
    for v in value:
        out.extend(x for x in v.split(",") if x)
    return _unique(out)


def _int(value: Any, what: str) -> Any:
    """A CLI string of a whole number as an int; anything else unchanged (the schema checks its type)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{what}: {value!r} is not a whole number") from None
    return value


def _ints(value: Any, what: str) -> Any:
    """``"1024,2048"``, ``["1024", 2048]`` -> ``[1024, 2048]``; anything else unchanged (checked by the schema)."""
    if isinstance(value, str):
        return [_int(x, what) for x in value.split(",") if x]
    if isinstance(value, (list, tuple)):
        return [y for v in value for y in (_ints(v, what) if isinstance(v, str) else [v])]
    return value


def _floats(value: Any, what: str) -> Any:
    """``"0.1,0.3"``, ``["0.1", 0.3]`` -> ``[0.1, 0.3]``; anything else unchanged (checked by the schema)."""
    def one(x: str) -> float:
        try:
            return float(x)
        except ValueError:
            raise UserError(f"{what}: {x!r} is not a number") from None

    if isinstance(value, str):
        return [one(x) for x in value.split(",") if x]
    if isinstance(value, (list, tuple)):
        return [y for v in value for y in (_floats(v, what) if isinstance(v, str) else [v])]
    return value


def check_depths(depths: Any, option: str = "--needle-positions") -> tuple[float, ...]:
    """The needle depths of a grid, as floats in the order given: UserError for none, a depth outside [0, 1]
    (or not finite), or a depth given twice (``0.3`` and ``0.30`` are one depth)."""
    out: list[float] = []
    seen: set[float] = set()  # not ``in out``: 80,000 depths would take minutes
    for d in depths:
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and 0 <= d <= 1):
            raise UserError(f"{option} must lie in [0, 1], got {d}")
        if float(d) in seen:
            raise UserError(f"{option}: depth {float(d):g} is given twice")
        seen.add(float(d))
        out.append(float(d))
    if not out:
        raise UserError("the grid names no needle_positions")
    return tuple(out)


class GridSettings(BaseModel):
    """The types of a grid's settings, strictly: a bool is ``true``/``false`` (never the string "false"), a
    whole number is an int (not 2048.0, not a bool), a list of names is a string or a list of strings.
    Every field may be left out."""

    model_config = ConfigDict(strict=True, extra="forbid")

    models: Optional[Union[str, list[str]]] = None
    questions: Optional[Union[str, list[str]]] = None
    tokens: Optional[Union[int, list[int]]] = None
    samples: Optional[int] = None
    needle_position: Optional[float] = None  # an int (0, 1) is a number too; a bool is not
    needle_positions: Optional[Union[float, list[float]]] = None
    seed: Optional[int] = None
    method: Optional[Union[str, list[str]]] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    batch_size: Optional[int] = None
    save_samples: Optional[bool] = None
    trust_remote_code: Optional[bool] = None
    eager_attentions: Optional[bool] = None
    save_attention: Optional[int] = None
    rank_by: Optional[str] = None
    answers: Optional[bool] = None
    span: Optional[Union[str, list[str]]] = None
    max_new_tokens: Optional[int] = None


EXPECTED = {"models": "a name or a list of names", "questions": "a name or a list of names",
            "tokens": "a whole number or a list of whole numbers", "samples": "a whole number",
            "needle_position": "a number", "needle_positions": "a number or a list of numbers",
            "seed": "a whole number", "method": "a name or a list of names", "dtype": "a name",
            "device": "a name", "batch_size": "a whole number", "save_samples": "true or false",
            "trust_remote_code": "true or false", "eager_attentions": "true or false", "save_attention": "a whole number",
            "rank_by": "score or lift", "answers": "true or false", "span": "a name or a list of names",
            "max_new_tokens": "a whole number"}


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # e.g. a TOML date
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_types(settings: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``settings`` checked against :class:`GridSettings`; UserError naming the first field of the wrong
    type (and ``where``, e.g. ``grid file G: ``), e.g. ``trust_remote_code: expected true or false, got
    "false"``. Unknown keys are an error with the closest key as a hint."""
    for k in settings:
        try:
            GRID_KEYS.get(k)
        except UserError as e:
            raise UserError(f"{where}{e}") from None
    try:
        GridSettings.model_validate(settings)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the deepest: the list item, not the whole list
        field_ = str(err["loc"][0])
        raise UserError(f"{where}{field_}: expected {EXPECTED[field_]}, got {_shown(err['input'])}") from None
    return settings


def make_grid(**settings: Any) -> Grid:
    """A validated grid; settings left out (or None) take the defaults (the original study's grid). Raises UserError,
    before anything is loaded, for a value of the wrong type (:class:`GridSettings`; booleans must be real
    booleans), an empty list, an unknown model key, question or method, and for impossible numbers. For the
    CLI's sake, lists and numbers may be given as text (``tokens="1024,2048"``, ``samples="3"``)."""
    from .methods import METHODS

    given = {k: v for k, v in settings.items() if v is not None}
    for k in given:
        GRID_KEYS.get(k)
    if "tokens" in given:
        given["tokens"] = _ints(given["tokens"], "tokens")
    for k in ("samples", "seed", "batch_size", "save_attention", "max_new_tokens"):
        if k in given:
            given[k] = _int(given[k], k)
    if "needle_positions" in given:
        given["needle_positions"] = _floats(given["needle_positions"], "needle_positions")
    if isinstance(given.get("needle_position"), str):
        try:
            given["needle_position"] = float(given["needle_position"])
        except ValueError:
            raise UserError(f"needle_position: {given['needle_position']!r} is not a number") from None
    for k in ("models", "questions", "tokens", "needle_positions", "method", "span"):
        if isinstance(given.get(k), tuple):
            given[k] = list(given[k])
    check_types(given)
    values: dict[str, Any] = {}
    if "models" in given:
        values["models"] = _names(given["models"], "models")
    if "questions" in given:
        qs = _names(given["questions"], "questions")
        values["questions"] = _unique(x for q in qs for x in (tuple(QUESTIONS) if q == "all" else (q,)))
    if "tokens" in given:
        values["tokens"] = _unique([given["tokens"]] if isinstance(given["tokens"], int) else given["tokens"])
    if "method" in given:
        from .experiments import method_names

        values["method"] = ",".join(method_names(given["method"]))
    if "span" in given:
        from .chance import span_names

        values["span"] = ",".join(span_names(given["span"]))
    for k in ("samples", "seed", "batch_size", "dtype", "device", "save_samples", "trust_remote_code", "eager_attentions",
              "save_attention", "rank_by", "answers", "max_new_tokens"):
        if k in given:
            values[k] = given[k]
    if "needle_position" in given and "needle_positions" in given:
        raise UserError("give needle_position (one depth) or needle_positions (several), not both")
    if "needle_position" in given:
        check_args(None, 1, 1, given["needle_position"])
        values["needle_positions"] = (float(given["needle_position"]),)
    if "needle_positions" in given:
        ds = given["needle_positions"]
        values["needle_positions"] = check_depths([ds] if isinstance(ds, (int, float)) else ds)
    grid = replace(Grid(), **values)
    for what in ("models", "questions", "tokens"):
        if not getattr(grid, what):
            raise UserError(f"the grid names no {what}")
    for q in grid.questions:
        check_question(q)
    if "fact" in grid.span.split(","):
        from .chance import check_spans_for

        for q in grid.questions:
            check_spans_for(["fact"], False, q)
    filed: dict[str, str] = {}
    for m in grid.models:
        k = model_key(m)
        if k in filed:
            raise UserError(f"models {filed[k]!r} and {m!r} would both be filed as {k!r}; sweep them into "
                            f"separate --output-dir folders")
        filed[k] = m
    for m in grid.methods:
        METHODS.get(m)
    from .chance import check_rank_by

    check_rank_by(grid.rank_by)
    if grid.dtype not in DTYPES:
        raise UserError(f"unknown dtype {grid.dtype!r}; choose from: {', '.join(DTYPES)}")
    check_device(grid.device, available=False)
    for t in grid.tokens:
        for d in grid.needle_positions:
            check_args(None, t, grid.samples, d, grid.batch_size, grid.seed)
    if grid.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {grid.max_new_tokens}")
    if grid.save_attention < 0:
        raise UserError(f"--save-attention must be 0 (off) or a number of heads, got {grid.save_attention}")
    return grid


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """The settings of a grid file: JSON (``.json``) or TOML (``.toml``), one object of grid settings, e.g.
    ``{"models": ["smollm2"], "questions": "all", "tokens": [1024, 2048], "samples": 4}``, typed strictly
    (:class:`GridSettings`: ``"save_samples": "no"`` or ``"tokens": 2048.0`` is an error naming the field).
    A file that names none of models, questions and tokens is an error (a grid that names nothing)."""
    from .io import JSONError, parse_json, read_regular

    path = Path(path)
    try:
        raw = read_regular(path)
    except OSError as e:
        raise UserError(f"cannot read grid file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"grid file {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except (ValueError, RecursionError) as e:  # tomllib.TOMLDecodeError; an int beyond the digit limit
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(";")[0]
            raise UserError(f"grid file {path}: malformed TOML ({first})") from None
    else:
        try:
            data = parse_json(text, unique_keys=True)  # as TOML refuses a key given twice
        except JSONError as e:
            raise UserError(f"grid file {path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"grid file {path}: expected an object of grid settings")
    check_types(data, f"grid file {path}: ")
    if not any(data.get(k) for k in ("models", "questions", "tokens")):
        raise UserError(f"grid file {path} names nothing: give at least one of models, questions, tokens")
    return data


# --- the plan -------------------------------------------------------------------------------------------


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
    for k, v in want.items():
        if k in record and record[k] != v:
            return f"{k} {record[k]!r} (this sweep: {v!r})"
    extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
    if decodes(grid) and "max_new_tokens" in extra and extra["max_new_tokens"] != grid.max_new_tokens:
        return f"max_new_tokens {extra['max_new_tokens']!r} (this sweep: {grid.max_new_tokens!r})"
    return None


def decodes(grid: Grid) -> bool:
    """Whether the grid's results depend on the model's greedy answers (``answers``, or a method that reads
    them), and so on ``max_new_tokens``."""
    from .methods import METHODS

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


# --- one unit of work -----------------------------------------------------------------------------------


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

    from .chance import chance_fields, span_result_name, span_scores
    from .experiments import build_prompts, synthetic_record
    from .generation import accuracy
    from .methods import METHODS
    from .onepass import score_groups

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
        from .attention_capture import for_unit

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


# --- the lock -------------------------------------------------------------------------------------------


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


def sweep_lock(output_dir: str | Path, own: list[Path] | None = None):
    """The results-dir lock (:func:`retrieval_heads.lock.results_lock`) held by a sweep."""
    return results_lock(output_dir, "sweep", own)


# --- checks that need configs and tokenizers, not weights -------------------------------------------------


def preflight(grid: Grid) -> None:
    """For each model: its config loads, the longest length fits its positions, and the shortest length
    holds template + needle + question. Loads configs and tokenizers only; UserError on the first problem."""
    from transformers import AutoConfig, AutoTokenizer

    from .data.tasks import question_groups

    for m in grid.models:
        _, name, path = resolve(m)
        hub, offline_why = hub_access(path)  # the hub only if it answers within HUB_PROBE_S: no minutes of retries
        hint = " (the original study's Llama-3-8B models are gated on the hub: log in with `hf auth login`, or " \
               "try --models smollm2)" if m in ("instruct", "base") else ""
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=grid.trust_remote_code, **hub)
            check_causal_lm(m, config)
            text = config.get_text_config()
            limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
            if limit is not None and max(grid.tokens) > limit:
                raise UserError(f"--tokens {max(grid.tokens)} exceeds the {limit} positions of {name}")
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=grid.trust_remote_code, **hub)
        except (OSError, ValueError) as e:
            if offline_why and isinstance(e, OSError):
                raise UserError(f"cannot load model {m!r}: it is not in the local hub cache and {offline_why}"
                                f"{hint}") from None
            raise UserError(f"cannot load model {m!r}: {first_line(e)}{hint}") from None
        check_tokenizer(m, tokenizer)
        for depth in grid.needle_positions:
            question_groups(tokenizer, grid.questions, min(grid.tokens), 1, depth, grid.seed)


# --- the local engine -----------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    done: list[Path] = field(default_factory=list)  # computed now
    recomputed: list[Path] = field(default_factory=list)  # computed now, replacing a corrupt file
    skipped: list[Path] = field(default_factory=list)  # valid already
    seconds: float = 0.0


def result_line(state: str, key: str, q: str, tokens: int, record: dict, timing: str, method: bool = False) -> str:
    """One line per experiment; ``method``: name the result's method too (a sweep of several)."""
    top = record["head_rankings"][0]
    lift = f", lift {top['lift']:.2f}x" if "lift" in top else ""
    depth = record["needle_position"]
    tokens = f"{tokens:>6}" if depth == 0.5 else f"{tokens:>6} d{depth_text(depth)}"
    name = f"{record['method']:<17} " if method else ""
    return f"{state:<10} {name}{key} {q:<14} {tokens}  top {top['head']:<7} ({top['score']:.4f}{lift})  {timing}"


def results_folders(grid: Grid, output_dir: str | Path) -> str:
    """Where the grid's results go: OUTPUT_DIR/METHOD, or the folders of each method."""
    folders = [str(Path(output_dir) / m) for m in grid.results]
    return folders[0] if len(folders) == 1 else "{" + ", ".join(folders) + "}"


def announce(grid: Grid, output_dir: str | Path, units: list[Unit], statuses: list[Status], summary: SweepSummary,
             say: Callable[[str], None], where: str = "") -> int:
    """Print the sweep's headline and one line per valid result kept (added to ``summary.skipped``); returns
    the number of experiments left to compute."""
    todo = sum(len(st.todo) for st in statuses)
    depths = f" x {len(grid.needle_positions)} depth(s)" if len(grid.needle_positions) > 1 else ""
    methods = f" x {len(grid.results)} results" if len(grid.results) > 1 else ""
    say(f"sweep: {len(grid.models)} model(s) x {len(grid.questions)} question(s) x {len(grid.tokens)} "
        f"length(s){depths}{methods} = {grid.size} experiments, {grid.samples} samples each; {todo} to compute"
        f"{where} -> {results_folders(grid, output_dir)}")
    for unit, st in zip(units, statuses):
        for (m, q), state in st.state.items():
            if state == "done":
                path = experiment_path(output_dir, grid, st.model_key, q, unit.tokens, unit.depth, m)
                say(result_line("skipped", st.model_key, q, unit.tokens, load_result(path), "(valid result)",
                                len(grid.results) > 1))
                summary.skipped.append(path)
    return todo


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

    from .models import load_model

    load = load or load_model
    t0 = time.perf_counter()
    units = plan(grid)
    keys = {m: model_key(m) for m in grid.models}
    summary = SweepSummary()
    check_device(grid.device)  # before the lock, like every check below: bad input leaves nothing behind
    if check_models:
        preflight(grid)  # before the lock: bad input leaves no output dir behind
    idents = {m: model_identity(m) for m in grid.models}
    with sweep_lock(output_dir, own_files(output_dir, grid, keys)):
        statuses = [unit_status(output_dir, grid, u, keys[u.model], idents[u.model]) for u in units]
        say = echo or (lambda s: tqdm.write(s, file=sys.stdout))
        already = grid.size - announce(grid, output_dir, units, statuses, summary, say)
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


def outcome_line(st: Status, e: Experiment, unit: Unit, grid: Grid, record: dict, seconds: float) -> str:
    """The line printed for experiment ``e`` of ``unit`` once written (done, or recomputed with the reason)."""
    what = plural(len(unit.questions), "question") + (f" x {len(grid.results)} results" if len(grid.results) > 1 else "")
    timing = f"{seconds:.1f} s (unit of {what}, one prefill per sample)"
    if st.state[e] == "corrupt":
        return result_line("recomputed", st.model_key, e[1], unit.tokens, record, f"{timing}  (was: {st.reason[e]})",
                           len(grid.results) > 1)
    return result_line("done", st.model_key, e[1], unit.tokens, record, timing, len(grid.results) > 1)


def _advance(bar, base: float, n: int) -> Callable[[float], None]:
    """Moves the bar to ``base + f * n`` when a unit of ``n`` experiments to write is ``f`` done."""
    return lambda f: bar.update(base + f * n - bar.n)


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
