"""The grid of a sweep: models x questions x token lengths x needle depths, with one set of experiment settings.

- :func:`make_grid` / :func:`load_grid_file`: the grid, validated without loading anything;
- grid files are typed strictly (:class:`GridSettings`, pydantic): a value of the wrong type is one line
  naming the field; flags given on the command line override the file, both ways.

The keys, their types, defaults and bounds are the spec's (:mod:`retrieval_heads.spec`): :class:`Grid`,
:data:`GRID_KEYS`, :class:`GridSettings` and :data:`EXPECTED` are generated from it.
"""

from __future__ import annotations

import json
from dataclasses import field, make_dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from ..data.questions import QUESTIONS
from ..data.tasks import check_question
from ..errors import ParamError, UserError
from ..experiments import check_args
from ..models import DTYPES, MODELS, check_device, resolve
from ..registry import Registry
from ..spec import GRID_DEFAULTS, GRID_KEYS as SPEC_GRID_KEYS, GRID_SETTINGS, check, expected, grid_type, setting, \
    value_type

DEFAULT_MODELS = GRID_DEFAULTS["models"]  # as detect's; the original study's pair is --models instruct base
DEFAULT_TOKENS = GRID_DEFAULTS["tokens"]
DEFAULT_SAMPLES = GRID_DEFAULTS["samples"]  # per unit of a grid


class _GridViews:
    """What :class:`Grid` derives from its settings."""

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


def _grid_field(key: str) -> tuple:
    t, s = value_type(GRID_SETTINGS[key]), setting(GRID_SETTINGS[key])
    kind = str if s.several else tuple[t, ...] if s.many else t  # method, span: one comma-separated string
    return key, kind, field(default=GRID_DEFAULTS[key])


Grid = make_dataclass("Grid", [_grid_field(k) for k in SPEC_GRID_KEYS if k != "needle_position"], bases=(_GridViews,),
                      frozen=True)
Grid.__module__ = __name__  # pickled by name (a Ray worker receives the grid)
Grid.__doc__ = """What a sweep runs: every model x question x token length x needle depth (``needle_positions``,
each its own unit of work), with one set of experiment settings: a field per grid key of
:mod:`retrieval_heads.spec` but ``needle_position`` (the first of ``needle_positions``), defaults the spec's;
``method`` and ``span`` are comma-separated. A depth other than the default 0.5 files its results under names
of their own (:func:`~retrieval_heads.results.file_name`)."""

GRID_KEYS = Registry("grid setting")
for _k in SPEC_GRID_KEYS:
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
            raise ParamError(what, f": {value!r} is not a whole number") from None
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
            raise ParamError(what, f": {x!r} is not a number") from None

    if isinstance(value, str):
        return [one(x) for x in value.split(",") if x]
    if isinstance(value, (list, tuple)):
        return [y for v in value for y in (_floats(v, what) if isinstance(v, str) else [v])]
    return value


def check_depths(depths: Any, param: str = "needle_positions") -> tuple[float, ...]:
    """The needle depths of a grid, as floats in the order given: UserError for none, a depth outside [0, 1]
    (or not finite; the spec's bounds), or a depth given twice (``0.3`` and ``0.30`` are one depth); the
    errors name ``param``."""
    out: list[float] = []
    seen: set[float] = set()  # not ``in out``: 80,000 depths would take minutes
    for d in depths:
        check("needle_positions", d, param)
        if float(d) in seen:
            raise ParamError(param, f": depth {float(d):g} is given twice")
        seen.add(float(d))
        out.append(float(d))
    if not out:
        raise UserError("the grid names no needle_positions")
    return tuple(out)


# The types of a grid's settings, strictly: a bool is ``true``/``false`` (never the string "false"), a whole
# number is an int (not 2048.0, not a bool), a number may be an int, a list of names is a string or a list of
# strings. Every field may be left out. One field per grid key of the spec.
GridSettings = create_model("GridSettings", __config__=ConfigDict(strict=True, extra="forbid"),
                            **{k: (grid_type(k), None) for k in SPEC_GRID_KEYS})
EXPECTED = {k: expected(k) for k in SPEC_GRID_KEYS}  # a grid file's value of the wrong type: "expected ..."


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
    for k, v in given.items():  # text from the CLI, as the spec types the key
        kind, many = value_type(GRID_SETTINGS[k]), setting(GRID_SETTINGS[k]).many
        if kind is int:
            given[k] = _ints(v, k) if many else _int(v, k)
        elif kind is float and many:
            given[k] = _floats(v, k)
        elif kind is float and isinstance(v, str):
            try:
                given[k] = float(v)
            except ValueError:
                raise ParamError(k, f": {v!r} is not a number") from None
        elif many and isinstance(v, tuple):
            given[k] = list(v)
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
    for k in given.keys() - values.keys() - {"needle_position", "needle_positions"}:  # the rest as given
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
    for k in ("max_new_tokens", "save_attention"):
        check(GRID_SETTINGS[k], getattr(grid, k), k)
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
