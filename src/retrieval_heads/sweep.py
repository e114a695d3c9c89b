"""Sweeps: a grid of models x questions x token lengths, one result JSON per experiment, resumable.

The work is cut into *units*: one model x one token length x all the grid's questions, the questions
sharing one context pass per sample (:mod:`retrieval_heads.prefill`). The pieces are separate so that any
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

Lock: ``{output_dir}/.sweep.lock``, held with ``fcntl.flock`` for the whole sweep; a second sweep on the
same directory stops at once with one line naming the first one's pid. The kernel drops the lock when its
holder dies (even by SIGKILL), so it is never stale; the file itself stays. Whoever takes the lock removes
the temp files that a writer killed between write and rename left in the method folders.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .data.questions import QUESTIONS
from .errors import UserError
from .experiments import DEFAULT_SAMPLES, DetectResult, check_args, write_result
from .models import DTYPES, MODELS, LoadedModel, check_causal_lm, resolve
from .registry import Registry
from .results import load_result, result_path, samples_path

DEFAULT_MODELS = ("instruct", "base")
DEFAULT_TOKENS = (2048, 4096, 6144, 8192)
LOCK_NAME = ".sweep.lock"


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: every model x question x token length, with one set of experiment settings."""

    models: tuple[str, ...] = DEFAULT_MODELS
    questions: tuple[str, ...] = tuple(QUESTIONS)
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    samples: int = DEFAULT_SAMPLES
    needle_position: float = 0.5
    seed: int = 0
    method: str = "summed_attention"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 1
    save_samples: bool = False
    trust_remote_code: bool = False
    rank_by: str = "score"

    @property
    def size(self) -> int:
        return len(self.models) * len(self.questions) * len(self.tokens)


@dataclass(frozen=True)
class Unit:
    """One model x one token length x the grid's questions: one context pass per sample."""

    model: str
    tokens: int
    questions: tuple[str, ...]


@dataclass
class Status:
    """Per question of a unit: "done", "missing" or "corrupt" (with the reason)."""

    unit: Unit
    model_key: str
    state: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)

    @property
    def todo(self) -> list[str]:
        return [q for q in self.unit.questions if self.state[q] != "done"]


# --- the grid -------------------------------------------------------------------------------------------

GRID_KEYS = Registry("grid setting")
for _k in ("models", "questions", "tokens", "samples", "needle_position", "seed", "method", "dtype", "device",
           "batch_size", "save_samples", "trust_remote_code", "rank_by"):
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
        if not isinstance(v, str):
            raise UserError(f"{what}: expected names, got {v!r}")
        out.extend(x for x in v.split(",") if x)
    return _unique(out)


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{what}: {value!r} is not a whole number")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{what}: {value!r} is not a whole number") from None


def _ints(value, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, str)):
        value = [value]
    out = []
    for v in value:
        for x in str(v).split(","):
            if not x:
                continue
            try:
                out.append(int(x))
            except ValueError:
                raise UserError(f"{what}: {x!r} is not a whole number") from None
    return _unique(out)


def make_grid(**settings: Any) -> Grid:
    """A validated grid; settings left out (or None) take the defaults (the seed's grid). Raises UserError,
    before anything is loaded, for an empty list, an unknown model key, question or method, and for
    impossible numbers."""
    from .methods import METHODS

    given = {k: v for k, v in settings.items() if v is not None}
    for k in given:
        GRID_KEYS.get(k)
    values: dict[str, Any] = {}
    if "models" in given:
        values["models"] = _names(given["models"], "models")
    if "questions" in given:
        qs = _names(given["questions"], "questions")
        values["questions"] = tuple(QUESTIONS) if "all" in qs else qs
    if "tokens" in given:
        values["tokens"] = _ints(given["tokens"], "tokens")
    for k in ("samples", "seed", "batch_size"):
        if k in given:
            values[k] = _int(given[k], k)
    for k in ("method", "dtype", "device", "rank_by"):
        if k in given:
            values[k] = str(given[k])
    if "needle_position" in given:
        try:
            values["needle_position"] = float(given["needle_position"])
        except (TypeError, ValueError):
            raise UserError(f"needle_position: {given['needle_position']!r} is not a number") from None
    for k in ("save_samples", "trust_remote_code"):
        if k in given:
            values[k] = bool(given[k])
    grid = replace(Grid(), **values)
    for what in ("models", "questions", "tokens"):
        if not getattr(grid, what):
            raise UserError(f"the grid names no {what}")
    for q in grid.questions:
        QUESTIONS.get(q)
    for m in grid.models:
        model_key(m)
    METHODS.get(grid.method)
    from .chance import check_rank_by

    check_rank_by(grid.rank_by)
    if grid.dtype not in DTYPES:
        raise UserError(f"unknown dtype {grid.dtype!r}; choose from: {', '.join(DTYPES)}")
    for t in grid.tokens:
        check_args(None, t, grid.samples, grid.needle_position, grid.batch_size)
    return grid


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """The settings of a grid file: JSON (``.json``) or TOML (``.toml``), one object of grid settings, e.g.
    ``{"models": ["smollm2"], "questions": "all", "tokens": [1024, 2048], "samples": 4}``. A file that names
    none of models, questions and tokens is an error (a grid that names nothing)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read grid file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"grid file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"grid file {path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise UserError(f"grid file {path}: malformed TOML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"grid file {path}: expected an object of grid settings")
    for k in data:
        GRID_KEYS.get(k)
    if not any(data.get(k) for k in ("models", "questions", "tokens")):
        raise UserError(f"grid file {path} names nothing: give at least one of models, questions, tokens")
    return data


# --- the plan -------------------------------------------------------------------------------------------


def plan(grid: Grid) -> list[Unit]:
    """The units of ``grid``, model by model (each model is loaded once), lengths in the grid's order."""
    return [Unit(m, t, grid.questions) for m in grid.models for t in grid.tokens]


def experiment_path(output_dir: str | Path, grid: Grid, key: str, question: str, tokens: int) -> Path:
    return result_path(output_dir, grid.method, key, question, tokens)


def _settings_mismatch(record: dict, grid: Grid) -> str | None:
    want = {"samples_processed": grid.samples, "needle_position": grid.needle_position, "seed": grid.seed,
            "dtype": grid.dtype, "rank_by": grid.rank_by}
    for k, v in want.items():
        if k in record and record[k] != v:
            return f"{k} {record[k]!r} (this sweep: {v!r})"
    return None


def unit_status(output_dir: str | Path, grid: Grid, unit: Unit, key: str | None = None) -> Status:
    """Which of the unit's experiments are done. A result file that is valid but was made with other
    settings (samples, needle position, seed, dtype) is a UserError: it is neither trusted nor overwritten."""
    key = key or model_key(unit.model)
    st = Status(unit, key)
    for q in unit.questions:
        path = experiment_path(output_dir, grid, key, q, unit.tokens)
        if not path.exists():
            st.state[q] = "missing"
            continue
        try:
            record = load_result(path)
        except UserError as e:
            st.state[q] = "corrupt"
            st.reason[q] = str(e).removeprefix(f"{path}: ")
            continue
        other = _settings_mismatch(record, grid)
        if other:
            raise UserError(f"{path} was made with {other}; use another --output-dir or move it away")
        if grid.save_samples and not samples_path(path).exists():
            st.state[q] = "missing"
            st.reason[q] = "no samples file"
            continue
        st.state[q] = "done"
    return st


# --- one unit of work -----------------------------------------------------------------------------------


def compute_unit(
    lm: LoadedModel, unit: Unit, grid: Grid, on_progress: Callable[[float], None] | None = None
) -> list[DetectResult]:
    """Score every question of ``unit`` on ``lm``: one :class:`DetectResult` per question, record included,
    exactly as :func:`~retrieval_heads.experiments.detect` would make it. Writes nothing. For
    summed_attention the questions share one context pass per sample; other methods run ``detect`` per
    question. ``on_progress(f)`` gets the fraction of the unit done so far."""
    from .experiments import build_prompts, detect, synthetic_record

    progress = on_progress or (lambda f: None)
    if grid.method != "summed_attention":
        out = []
        for i, q in enumerate(unit.questions):
            out.append(detect(lm, question=q, tokens=unit.tokens, samples=grid.samples,
                              needle_position=grid.needle_position, seed=grid.seed, method=grid.method,
                              batch_size=grid.batch_size))
            progress((i + 1) / len(unit.questions))
        return out

    import torch

    from .chance import chance_fields, probe_shared, span_scores

    groups = build_prompts(lm, unit.questions, unit.tokens, grid.samples, grid.needle_position, grid.seed)
    done = 0

    def on_batch(k: int) -> None:
        nonlocal done
        done += k
        progress(done / len(groups))

    # the shared prefill measures the needle, its control span and the facts in the same passes
    masses = probe_shared(lm.model, lm.tokenizer, groups, unit.questions, grid.batch_size, on_batch)
    out = []
    for q in unit.questions:
        prompts = [g[q] for g in groups]
        ss = span_scores(masses[q], prompts, "needle")
        scores = ss.score.to(lm.device, torch.float32)  # (S, L, H): the probe's float32 needle masses
        record = synthetic_record(lm, grid.method, q, unit.tokens, grid.needle_position, grid.seed, scores,
                                  added=chance_fields(ss), rank_by=grid.rank_by)
        out.append(DetectResult(scores.sum(0).cpu(), scores.cpu(), prompts, record, lift=ss.lift.float(),
                                rank_by=grid.rank_by, spans=ss))
    return out


def write(output_dir: str | Path, result: DetectResult, save_samples: bool = False) -> Path:
    """The one writer of sweep results: atomic, the same files and format as ``detect``."""
    result.path = write_result(output_dir, result.record, result.prompts, result.sample_scores, save_samples,
                               result.answers, result.spans)
    return result.path


# --- the lock -------------------------------------------------------------------------------------------


@contextmanager
def sweep_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold ``{output_dir}/.sweep.lock`` (``fcntl.flock``, exclusive) for the block; UserError at once if
    another process holds it. Creates ``output_dir``."""
    import fcntl

    out = Path(output_dir)
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise UserError(f"another sweep (pid {holder}) is running on {out}; wait for it to finish or use "
                            f"another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for stale in out.glob("*/.*.tmp"):  # temp files of a writer killed before its rename
            stale.unlink(missing_ok=True)
        yield path
    finally:
        os.close(fd)  # releases the lock


# --- checks that need configs and tokenizers, not weights -------------------------------------------------


def preflight(grid: Grid) -> None:
    """For each model: its config loads, the longest length fits its positions, and the shortest length
    holds template + needle + question. Loads configs and tokenizers only; UserError on the first problem."""
    from transformers import AutoConfig, AutoTokenizer

    from .data.prompt import PromptFormat
    from .data.samples import synthetic_samples

    for m in grid.models:
        _, name, path = resolve(m)
        hint = " (the default grid is the seed's Llama-3-8B pair; try --models smollm2)" \
            if m in DEFAULT_MODELS else ""
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=grid.trust_remote_code)
            check_causal_lm(m, config)
            text = config.get_text_config()
            limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
            if limit is not None and max(grid.tokens) > limit:
                raise UserError(f"--tokens {max(grid.tokens)} exceeds the {limit} positions of {name}")
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=grid.trust_remote_code)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load model {m!r}: {first}{hint}") from None
        synthetic_samples(PromptFormat(tokenizer), grid.questions, min(grid.tokens), 1, grid.needle_position,
                          grid.seed)


# --- the local engine -----------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    done: list[Path] = field(default_factory=list)  # computed now
    recomputed: list[Path] = field(default_factory=list)  # computed now, replacing a corrupt file
    skipped: list[Path] = field(default_factory=list)  # valid already
    seconds: float = 0.0


def _line(state: str, key: str, q: str, tokens: int, record: dict, timing: str) -> str:
    top = record["head_rankings"][0]
    lift = f", lift {top['lift']:.2f}x" if "lift" in top else ""
    return f"{state:<10} {key} {q:<14} {tokens:>6}  top {top['head']:<7} ({top['score']:.4f}{lift})  {timing}"


def announce(grid: Grid, output_dir: str | Path, units: list[Unit], statuses: list[Status], summary: SweepSummary,
             say: Callable[[str], None], where: str = "") -> int:
    """Print the sweep's headline and one line per valid result kept (added to ``summary.skipped``); returns
    the number of experiments left to compute."""
    todo = sum(len(st.todo) for st in statuses)
    say(f"sweep: {len(grid.models)} model(s) x {len(grid.questions)} question(s) x {len(grid.tokens)} "
        f"length(s) = {grid.size} experiments, {grid.samples} samples each; {todo} to compute{where} -> "
        f"{Path(output_dir) / grid.method}")
    for unit, st in zip(units, statuses):
        for q in unit.questions:
            if st.state[q] == "done":
                path = experiment_path(output_dir, grid, st.model_key, q, unit.tokens)
                say(_line("skipped", st.model_key, q, unit.tokens, load_result(path), "(valid result)"))
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
    if check_models:
        preflight(grid)  # before the lock: bad input leaves no output dir behind
    with sweep_lock(output_dir):
        statuses = [unit_status(output_dir, grid, u, keys[u.model]) for u in units]
        say = echo or (lambda s: tqdm.write(s, file=sys.stdout))
        already = grid.size - announce(grid, output_dir, units, statuses, summary, say)
        bar = tqdm(total=grid.size, initial=already, unit="exp", desc="sweep", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} experiments "
                              "[{elapsed}<{remaining}]")
        lm: LoadedModel | None = None
        try:
            for unit, st in zip(units, statuses):
                todo = st.todo
                if not todo:
                    continue
                if lm is None or lm.key != st.model_key:
                    lm = None  # the previous model goes before the next one comes
                    _release_memory()
                    lm = load(unit.model, dtype=grid.dtype, device=grid.device,
                              trust_remote_code=grid.trust_remote_code)
                start, base = time.perf_counter(), bar.n
                results = compute_unit(lm, unit, grid, _advance(bar, base, len(todo)))
                seconds = time.perf_counter() - start
                for res in results:
                    q = res.record["question"]
                    if q not in todo:
                        continue
                    path = write(output_dir, res, grid.save_samples)
                    timing = f"{seconds:.1f} s (unit of {len(unit.questions)} questions, one prefill per sample)"
                    if st.state[q] == "corrupt":
                        say(_line("recomputed", st.model_key, q, unit.tokens, res.record,
                                  f"{timing}  (was: {st.reason[q]})"))
                        summary.recomputed.append(path)
                    else:
                        say(_line("done", st.model_key, q, unit.tokens, res.record, timing))
                        summary.done.append(path)
                bar.update(base + len(todo) - bar.n)
        finally:
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
