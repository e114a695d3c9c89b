"""The grid of a sweep: models x questions x token lengths x needle depths, with one set of experiment settings.

- :func:`make_grid` / :func:`load_grid_file`: the grid, validated without loading anything;
- grid files are typed strictly (:class:`GridSettings`, pydantic): a value of the wrong type is one line
  naming the field; flags given on the command line override the file, both ways.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..data.questions import QUESTIONS
from ..data.tasks import check_question
from ..defaults import DEFAULT_MAX_NEW_TOKENS
from ..errors import UserError
from ..experiments import check_args
from ..models import DTYPES, MODELS, check_device, resolve
from ..registry import Registry

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
        from ..methods import METHODS

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
    from ..methods import METHODS

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
        from ..experiments import method_names

        values["method"] = ",".join(method_names(given["method"]))
    if "span" in given:
        from ..chance import span_names

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
        from ..chance import check_spans_for

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
    from ..chance import check_rank_by

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
    from ..io import JSONError, parse_json, read_regular

    path = Path(path)
    try:
        raw = read_regular(path)
    except OSError as e:
        raise UserError(f"cannot read grid file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not data
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
