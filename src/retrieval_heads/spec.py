"""Every setting of an experiment, and of the commands that run one, declared once.

:class:`Spec` (pydantic) holds each setting's name, type, default, bounds and one-line description; the
:class:`Setting` beside each field says which commands take it as a flag, where its flag sits in their
``--help``, its allowed values, and its key in a sweep's grid. Generated from it:

- the flags of ``detect``, ``sweep`` and ``ablate`` and their help, defaults shown from here
  (:func:`add_options`, in :mod:`retrieval_heads.commands`);
- the grid's keys, defaults and strict file types (:data:`GRID_KEYS`, :data:`GRID_DEFAULTS`,
  :func:`expected`; :mod:`retrieval_heads.sweep.grid`);
- the range checks (:func:`check`), whose errors name the parameter as the Python API calls it
  (:class:`~retrieval_heads.errors.ParamError`), and the one map from a parameter to its flag
  (:func:`flag_of`, :func:`cli_message`), which the CLI applies to every error it prints.

Importable without torch: every ``--help`` is built from it.

>>> check("tokens", 0)
Traceback (most recent call last):
...
retrieval_heads.errors.ParamError: tokens must be positive, got 0
>>> flag_of("tokens"), flag_of("random_seeds"), GRID_DEFAULTS["tokens"]
('--tokens', '--draws', (2048, 4096, 6144, 8192))
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import annotated_types
from pydantic import BaseModel, Field

from .data.questions import QUESTIONS
from .defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_QUESTION, FILING, TASK
from .errors import ParamError

GROUPS = ("experiment", "methods", "output", "engine")  # the sections of a command's --help, in order
SPAN_KINDS = ("needle", "answer", "fact")  # what a span-measuring method can score, each its own result
RANK_BY = ("score", "lift")
ENGINES = ("local", "ray")
CONTROLS = ("matched", "random")  # ablate's controls: layer-matched random heads, and random heads of any layer
MAX_SAMPLES = 100_000  # prompts are built in memory first; far above any experiment's needs
MAX_RANDOM_SEEDS = 1000  # ablate's random draws per k; each is a forward pass per sample


@dataclass(frozen=True)
class Setting:
    """Where a setting of :class:`Spec` appears besides the Python API.

    ``commands``: the commands that take it as a flag: ``--NAME`` (or ``flag``) in detect and ablate; in sweep,
    a setting with a ``grid`` key is ``--KEY``. ``grid``: its key in a sweep's grid (grid files, ``make_grid``);
    ``many``: the key takes one value or a list (and so does the sweep's flag); ``several``: detect's flag
    takes several values too. ``grid_default``: the grid's default, where it differs from one experiment's.
    ``defaults``/``default_text``/``help``: per command, the flag's default, the default in words (where it
    depends on other settings) and the help where it differs from the description. ``allowed``: a tuple, or
    ``"module:NAME"`` (a tuple, a registry or a function giving one) read only when the help is shown.
    ``must``: the range error's wording, where the bounds' own would say less."""

    group: str = "experiment"
    commands: tuple[str, ...] = ("detect",)
    grid: str | None = None
    many: bool = False
    several: bool = False
    grid_default: Any = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    allowed: tuple | str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    default_text: dict[str, str] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    must: str | None = None


ALL = ("detect", "sweep", "ablate")
PER_QUESTION = "for a task, {} for a filing question or --dataset"
THE_RESULTS = "the result's"


class Spec(BaseModel):
    """The settings, each with its type, default (one experiment's, as :func:`retrieval_heads.detect` takes
    it; None where it depends on the question), bounds and description."""

    # experiment
    model: Annotated[Optional[str], Setting(
        commands=ALL, grid="models", many=True, grid_default=("smollm2",), defaults={"ablate": None},
        default_text={"ablate": "the result's model_key",
                      "sweep": "smollm2, as detect; the original study's Llama-3-8B pair: instruct base"},
        help={"sweep": "Model keys, local paths or hub ids."})] = Field(
        "smollm2", description="smollm2 (embedded), instruct, base, a local path or a hub id.")
    question: Annotated[str, Setting(
        commands=("detect", "sweep"), grid="questions", many=True, grid_default=tuple(QUESTIONS),
        allowed="retrieval_heads.data.tasks:QUESTION_KEYS", default_text={"sweep": "the four filing questions"},
        help={"sweep": "Question keys (filing questions or long-context tasks, docs/tasks.md), or 'all' for the "
                       "four filing questions."})] = Field(
        DEFAULT_QUESTION, description="A filing question (the original experiment) or a long-context task "
                                      "(docs/tasks.md).")
    tokens: Annotated[Optional[int], Setting(
        commands=ALL, grid="tokens", many=True, grid_default=(2048, 4096, 6144, 8192),
        default_text={"detect": f"{TASK.tokens} {PER_QUESTION.format(FILING.tokens)}", "ablate": THE_RESULTS},
        help={"sweep": "Prompt lengths in tokens."})] = Field(
        None, gt=0, description="Prompt length in tokens, template and question included.")
    samples: Annotated[Optional[int], Setting(
        commands=ALL, grid="samples", grid_default=6,
        default_text={"detect": f"{TASK.samples} {PER_QUESTION.format(FILING.samples)}",
                      "ablate": "the result's count"},
        help={"sweep": "Samples per experiment.", "ablate": "Samples to evaluate on."})] = Field(
        None, gt=0, le=MAX_SAMPLES, description="Number of samples (synthetic, or the first records of --dataset).")
    needle_position: Annotated[float, Setting(
        commands=("detect", "sweep"), grid="needle_position", metavar="DEPTH")] = Field(
        0.5, ge=0, le=1, description="Depth of the needle in the haystack, 0 (start) to 1 (end).")
    needle_positions: Annotated[Optional[tuple[float, ...]], Setting(
        commands=("sweep",), grid="needle_positions", many=True, grid_default=(0.5,), metavar="DEPTH")] = Field(
        None, ge=0, le=1, description="Several needle depths, each swept like a length (0.5 keeps the plain file "
                                      "names; others add _dDEPTH).")
    dataset: Annotated[Optional[str], Setting(
        commands=("detect", "ablate"),
        help={"ablate": "JSONL samples (needed when the result came from a dataset)."})] = Field(
        None, description="JSONL file of your own samples (see docs/data.md).")
    seed: Annotated[Optional[int], Setting(
        commands=ALL, grid="seed", defaults={"ablate": None},
        default_text={"ablate": "the result's, i.e. the samples the heads were found on"})] = Field(
        0, ge=0, description="Seed of the synthetic samples.")
    config: Annotated[Optional[str], Setting(commands=("sweep",))] = Field(
        None, description="Grid file (.json or .toml) of these settings; flags win.")
    k: Annotated[tuple[int, ...], Setting(commands=("ablate",), several=True)] = Field(
        (0, 5, 10, 20, 50), description="Numbers of heads to remove: --k 0 5 10, --k 0,5,10 or repeated --k.")
    random_seeds: Annotated[int, Setting(commands=("ablate",), flag="--draws", aliases=("--random-seeds",),
                                         metavar="N")] = Field(
        5, ge=0, le=MAX_RANDOM_SEEDS, description="Random draws per k of each control.")
    controls: Annotated[str, Setting(commands=("ablate",), default_text={"ablate": "both"})] = Field(
        ",".join(CONTROLS), description="Controls, comma-separated: 'matched' (layer-matched: each top head "
        "replaced by a random head of its own layer, outside the top k; borrowed from the nearest layer where "
        "its own has too few) and 'random' (k heads from any layer outside the top k). The paired test "
        "compares top-k with the mean of the matched draws.")
    # methods
    method: Annotated[tuple[str, ...], Setting(
        group="methods", commands=("detect", "sweep"), grid="method", many=True, several=True,
        grid_default="summed_attention", allowed="retrieval_heads.results:method_names")] = Field(
        ("summed_attention",), description="Scoring method(s), space- or comma-separated or repeated, all "
                                           "scored from one prefill per sample.")
    span: Annotated[Optional[tuple[str, ...]], Setting(
        group="methods", commands=("detect", "sweep"), grid="span", many=True, several=True, grid_default="needle",
        allowed=SPAN_KINDS, default_text={"detect": f"{TASK.span} {PER_QUESTION.format(FILING.span)}"})] = Field(
        None, description="Span kind(s) scored by a span-measuring method (the default one), each written as its "
                          "own result (summed_attention+answer, ...).")
    rank_by: Annotated[str, Setting(group="methods", commands=("detect", "sweep"), grid="rank_by",
                                    allowed=RANK_BY)] = Field(
        "score", description="Rank those results' heads by score (summed mass, the original ranking) or lift.")
    alpha: Annotated[float, Setting(group="methods")] = Field(
        0.05, gt=0, lt=1, description="Level of the test against the control span (Benjamini-Hochberg).")
    success_only: Annotated[bool, Setting(group="methods")] = Field(
        False, description="Count only correctly answered samples (written as METHOD_success).")
    answers: Annotated[Optional[bool], Setting(
        group="methods", commands=("detect", "sweep"), grid="answers", grid_default=False,
        default_text={"detect": "on for a task; off for a filing question or --dataset; automatic with a method "
                                "that reads them, or --success-only"})] = Field(
        None, description="Also decode and record the model's greedy answers and accuracy.")
    max_new_tokens: Annotated[Optional[int], Setting(
        group="methods", commands=ALL, grid="max_new_tokens", grid_default=DEFAULT_MAX_NEW_TOKENS,
        defaults={"ablate": DEFAULT_MAX_NEW_TOKENS},
        default_text={"detect": f"the task's own (docs/tasks.md); {DEFAULT_MAX_NEW_TOKENS} for a filing question "
                                "or --dataset"})] = Field(
        None, gt=0, description="Longest greedy answer, in tokens.")
    # output
    output_dir: Annotated[str, Setting(group="output", commands=("detect", "sweep"))] = Field(
        "results", description="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json (_dDEPTH before "
                               ".json at a depth other than 0.5).")
    save_samples: Annotated[bool, Setting(group="output", commands=("detect", "sweep"), grid="save_samples")] = Field(
        False, description="Also write the per-sample audit file (.samples.jsonl).")
    save_attention: Annotated[int, Setting(group="output", commands=("detect", "sweep"), grid="save_attention",
                                           metavar="K", must="must be 0 (off) or a number of heads")] = Field(
        0, ge=0, description="Also save, per sample, the last token's attention rows of the top K heads "
                             "(.attention.npz, for the report's explorer); 0: off.")
    top: Annotated[int, Setting(group="output")] = Field(10, ge=0, description="Rows of the printed top-heads table.")
    progress: Annotated[bool, Setting(group="output", commands=("sweep",))] = Field(
        True, description="Show the progress bar (stderr).")
    # engine
    engine: Annotated[str, Setting(group="engine", commands=("sweep",), allowed=ENGINES)] = Field(
        "local", description="local (this process) or ray (actors on a Ray cluster).")
    dtype: Annotated[str, Setting(group="engine", commands=ALL, grid="dtype",
                                  allowed="retrieval_heads.models:DTYPES")] = Field(
        "float32", description="Weights' dtype (the probe's softmax is float32).")
    device: Annotated[str, Setting(group="engine", commands=ALL, grid="device")] = Field(
        "cpu", description="cpu, cuda, cuda:1, mps ...")
    batch_size: Annotated[int, Setting(
        group="engine", commands=ALL, grid="batch_size", defaults={"ablate": 8},
        help={"ablate": "Rows per forward pass, each row one sample under one condition (its own removed "
                        "heads); 1 runs one condition at a time."})] = Field(
        1, gt=0, description="Samples per forward pass.")
    trust_remote_code: Annotated[bool, Setting(group="engine", commands=ALL, grid="trust_remote_code")] = Field(
        False, description="Allow the model's own Python code to run.")
    eager_attentions: Annotated[bool, Setting(group="engine", commands=("detect", "sweep"),
                                              grid="eager_attentions")] = Field(
        False, description="Score a model whose family has no attention interface (bloom, gpt_neo, mpt, ...) "
                           "from its full attention matrices: exact, but one layer's batch x heads x tokens^2 "
                           "floats at a time (16 heads at 8K tokens: 4 GiB per sample in float32); ignored by "
                           "other models.")
    address: Annotated[Optional[str], Setting(group="engine", commands=("sweep",),
                                              default_text={"sweep": "a private local instance"})] = Field(
        None, description="Ray cluster to join (e.g. HEAD_IP:6379 or 'auto').")
    gpus_per_worker: Annotated[float, Setting(group="engine", commands=("sweep",))] = Field(
        0, ge=0, description="GPUs per Ray worker (one worker per model); 0: CPU only.")
    cpus_per_worker: Annotated[int, Setting(group="engine", commands=("sweep",))] = Field(
        1, ge=1, description="CPUs (torch threads) per Ray worker.")
    device_map: Annotated[Optional[str], Setting(group="engine", commands=("sweep",),
                                                 default_text={"sweep": "whole on --device"})] = Field(
        None, description="Shard each model over the GPUs it has, e.g. 'auto' (accelerate).")


FIELDS = Spec.model_fields


def setting(name: str) -> Setting:
    """The :class:`Setting` of field ``name``."""
    return next(m for m in FIELDS[name].metadata if isinstance(m, Setting))


def value_type(name: str) -> type:
    """The type of one value of setting ``name``: ``int`` for ``tokens``, ``str`` for ``method``."""
    t = FIELDS[name].annotation
    while inner := [a for a in typing.get_args(t) if a not in (type(None), Ellipsis)]:  # Optional, tuple
        t = inner[0]
    return t


def default(name: str, command: str = "detect") -> Any:
    """The default of setting ``name`` in ``command`` (the grid's for ``"grid"``)."""
    s = setting(name)
    if command == "grid":
        return FIELDS[name].default if s.grid_default is None else s.grid_default
    return s.defaults.get(command, FIELDS[name].default)


def option(name: str, command: str) -> tuple[str, str]:
    """(dest, flag) of setting ``name`` in ``command``: in ``sweep`` a grid setting is its grid key
    (``models``, ``--models``), elsewhere the setting's name (``--draws`` for ablate's ``random_seeds``)."""
    s = setting(name)
    if command == "sweep" and s.grid is not None:
        return s.grid, "--" + s.grid.replace("_", "-")
    return name, s.flag or "--" + name.replace("_", "-")


def bounds(name: str) -> dict[str, float]:
    """``{"gt": 0}``, ``{"ge": 0, "le": 1}``, ...: the bounds of a numeric setting (empty for none)."""
    out = {}
    for m in FIELDS[name].metadata:
        for key in ("gt", "ge", "lt", "le"):
            if isinstance(m, getattr(annotated_types, key.capitalize())):
                out[key] = getattr(m, key)
    return out


# --- the grid ------------------------------------------------------------------------------------------------

GRID_SETTINGS = {setting(n).grid: n for n in FIELDS if setting(n).grid}  # grid key -> setting
GRID_KEYS = tuple(GRID_SETTINGS)
GRID_DEFAULTS = {k: default(n, "grid") for k, n in GRID_SETTINGS.items()}
_NOUNS = {bool: "true or false", int: "a whole number", float: "a number", str: "a name"}


def expected(key: str) -> str:
    """What a grid file's ``key`` takes, in words: ``a whole number or a list of whole numbers``."""
    name = GRID_SETTINGS[key]
    s = setting(name)
    if isinstance(s.allowed, tuple) and len(s.allowed) == 2:  # rank_by: score or lift
        return " or ".join(s.allowed)
    one = _NOUNS[value_type(name)]
    return f"{one} or a list of {one.removeprefix('a ')}s" if s.many else one


def grid_type(key: str) -> Any:
    """The strict type of a grid file's ``key`` (None: left out)."""
    t = value_type(GRID_SETTINGS[key])
    return Optional[typing.Union[t, list[t]]] if setting(GRID_SETTINGS[key]).many else Optional[t]


# --- checks and the CLI's names ------------------------------------------------------------------------------


def check(name: str, value: Any, param: str | None = None) -> Any:
    """``value`` (or each value of a list) within the bounds of setting ``name``, else a
    :class:`~retrieval_heads.errors.ParamError` naming ``param`` (default: ``name``): ``tokens must be
    positive, got 0``. None passes (left to its default). Returns ``value``."""
    if value is None:
        return value
    param = param or name
    b = bounds(name)
    for v in value if isinstance(value, (list, tuple)) else [value]:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not b:
            continue
        must = _violated(b, v) if number else _interval(b) or "must be a number"
        if must:
            raise ParamError(param, f" {setting(name).must or must}, got {v}")
    return value


def _interval(b: dict) -> str | None:
    if "ge" in b and "le" in b:
        return f"must lie in [{b['ge']}, {b['le']}]"
    if "gt" in b and "lt" in b:
        return f"must lie in ({b['gt']}, {b['lt']})"
    return None


def _violated(b: dict, v: float) -> str | None:
    """What ``v`` breaks of bounds ``b``, in words, or None."""
    inside = all((k != "gt" or v > x) and (k != "ge" or v >= x) and (k != "lt" or v < x) and (k != "le" or v <= x)
                 for k, x in b.items())
    if inside:
        return None
    if _interval(b):
        return _interval(b)
    if "gt" in b and v <= b["gt"]:
        return "must be positive" if b["gt"] == 0 else f"must be > {b['gt']}"
    if "ge" in b and v < b["ge"]:
        return f"must be >= {b['ge']}"
    return f"must be at most {b['le']}" if "le" in b else f"must be < {b['lt']}"


def flag_of(param: str) -> str:
    """The flag that gives parameter ``param``: a setting's own flag (``random_seeds``: ``--draws``), else
    ``--`` and the name with dashes (``max_new_tokens``: ``--max-new-tokens``; a grid key, ``needle_positions``:
    ``--needle-positions``)."""
    if param in FIELDS and setting(param).flag:
        return setting(param).flag
    return "--" + param.replace("_", "-")


def cli_message(e: BaseException) -> str:
    """An error's message as the CLI prints it: a parameter named by its flag
    (:class:`~retrieval_heads.errors.ParamError`), anything else as it is."""
    return e.named(flag_of(e.param)) if isinstance(e, ParamError) else str(e)


__all__ = ["ALL", "CONTROLS", "ENGINES", "FIELDS", "GRID_DEFAULTS", "GRID_KEYS", "GRID_SETTINGS", "GROUPS",
           "MAX_RANDOM_SEEDS", "MAX_SAMPLES", "RANK_BY", "SPAN_KINDS", "Setting", "Spec", "bounds",
           "check", "cli_message", "default", "expected", "flag_of", "grid_type", "option", "setting", "value_type"]
