"""One experiment end to end: samples -> model -> per-head scores -> result JSON. The CLI wraps :func:`detect`.

>>> from retrieval_heads import detect
>>> res = detect(model="smollm2", question="inc_state", tokens=1024, samples=4)   # doctest: +SKIP
>>> res.scores.shape, res.top(3)                                                  # doctest: +SKIP
(torch.Size([30, 9]), [('L..H..', ...), ...])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch

from .console import phase
from .data.dataset import load_jsonl
from .data.prompt import PromptFormat, PromptSample
from .data.questions import QUESTIONS
from .data.samples import dataset_samples
from .data.tasks import check_question, decode_budget, is_task, question_groups, question_text
from .defaults import DEFAULT_QUESTION, FILING, settings_for
from . import eager_rows
from . import spec
from .errors import ParamError
from .generation import DEFAULT_MAX_NEW_TOKENS
from .io import atomic_write_files, check_writable, json_bytes, jsonl_bytes
from .leftovers import remove_stale_temps
from .lock import holds_output_dir
from .methods import METHODS
from .models import LoadedModel, load_model
from .onepass import score_prompts  # noqa: F401  (part of this module's API)
from .records import DetectResult, experiment_record, score_unit  # noqa: F401  (this module's API)
from .results import check_result_folder, make_provenance, result_path, safe_key, sample_rows, samples_path

MAX_SAMPLES = spec.MAX_SAMPLES

# detect's defaults per question (retrieval_heads.defaults): with none given, the passkey task, where the
# embedded model answers and heads beat the control; a filing question keeps the seed's experiment
DEFAULT_TOKENS = FILING.tokens  # a filing question's (the seed's experiment)
DEFAULT_SAMPLES = FILING.samples


class AmbiguousResult(AttributeError):
    """A :class:`Detection` of several results was asked for the attribute of a single one."""


class Detection(Mapping[str, DetectResult]):
    """What :func:`detect` returns, always: {result name: :class:`DetectResult`}, in the order they were made
    (one per method, and per span kind of a method that ``measures_spans``).

    A Detection of one result also answers for it: ``det.scores``, ``det.top(5)``, ``det.record``, ... are
    those of ``det.result``. With several results these raise :class:`AmbiguousResult` naming them; pick one
    by name (``det["query_focused"]``).
    """

    _SINGLE = frozenset(f.name for f in fields(DetectResult)) | {"top", "top_rows"}

    def __init__(self, results: Mapping[str, DetectResult]):
        self._results = dict(results)

    def __getitem__(self, name: str) -> DetectResult:
        return self._results[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return f"Detection({list(self._results)})"

    @property
    def result(self) -> DetectResult:
        """The one result; :class:`AmbiguousResult` when there are several."""
        return self._single()

    def _single(self) -> DetectResult:
        if len(self._results) != 1:
            raise AmbiguousResult(f"this detection holds {len(self._results)} results ({', '.join(self._results)}); "
                                  f"pick one by name, e.g. det[{next(iter(self._results), '')!r}]")
        return next(iter(self._results.values()))

    def __getattr__(self, name: str):  # also reached when the property ``result`` raises AmbiguousResult
        if name == "result":
            return self._single()
        if name in Detection._SINGLE:
            return getattr(self._single(), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def check_args(question: str | None, tokens: int, samples: int, needle_position: float, batch_size: int = 1,
               seed: int | None = None) -> None:
    """The checks that need no model, the bounds the spec declares (:mod:`retrieval_heads.spec`): fail before
    spending time on loading one. A seed must be >= 0: Python's Random would use abs(seed), and -1 would
    repeat seed 1's samples."""
    from .results import depth_text

    if question is not None:
        check_question(question)
    for name, value in (("tokens", tokens), ("samples", samples), ("needle_position", needle_position)):
        spec.check(name, value)
    depth_text(needle_position)  # a depth the result's file name can hold (1e-300 cannot), before any work
    spec.check("seed", seed)
    spec.check("batch_size", batch_size)


def check_tokens(lm: LoadedModel, tokens: int) -> None:
    limit = lm.max_positions
    if limit is not None and tokens > limit:
        raise ParamError("tokens", f" {tokens} exceeds the {limit} positions of {lm.name}")


def build_prompts(
    lm: LoadedModel, questions: Sequence[str], tokens: int, samples: int, needle_position: float, seed: int
) -> list[dict[str, PromptSample]]:
    """Synthetic samples, each a {question: prompt} group: the filing questions share one context (a sweep
    scores every question of a context from one pass), each long-context task has its own
    (:func:`~retrieval_heads.data.tasks.question_groups`)."""
    check_tokens(lm, tokens)
    return question_groups(lm.tokenizer, questions, tokens, samples, needle_position, seed)


def experiment_prompts(
    lm: LoadedModel, question: str | None, tokens: int, samples: int, needle_position: float, seed: int,
    records: Sequence[dict] | None = None,
) -> list[PromptSample]:
    """The prompts of one experiment from its settings: ``samples`` synthetic filings of ``question`` from
    ``seed`` (the groups of :func:`build_prompts`, this question's prompt of each), or, with ``records`` (a
    dataset's records, :func:`~retrieval_heads.data.dataset.load_jsonl`, already cut to ``samples``), one
    prompt per record. ``tokens`` long, the needle at ``needle_position``; what ``detect``, the sweep and
    ``ablate`` score."""
    if records is not None:
        check_tokens(lm, tokens)
        return dataset_samples(PromptFormat(lm.tokenizer), records, tokens, needle_position)
    return [g[question] for g in build_prompts(lm, [question], tokens, samples, needle_position, seed)]


def write_result(
    output_dir: str | Path, record: dict, prompts: Sequence[PromptSample], sample_scores: torch.Tensor,
    save_samples: bool, answers: Sequence | None = None, attention: bytes | None = None, spans=None,
) -> Path:
    """Samples and attention files first, result JSON last (its presence marks the experiment done), as one
    atomic write: all are written to temp files before any is renamed, so a failure (a full disk) leaves none,
    and an earlier set of the same name stays as it was."""
    path = result_path(output_dir, record["method"], record["model_key"], record["question"], record["total_tokens"],
                       record["needle_position"])
    check_result_folder(path.parent)
    files = [(path, json_bytes(record))]
    if save_samples:
        files.insert(0, (samples_path(path), jsonl_bytes(sample_rows(prompts, sample_scores, answers, spans))))
    if attention is not None:
        from .attention import attention_path

        files.insert(0, (attention_path(path), attention))
    remove_stale_temps([p for p, _ in files])  # of these files only, left by a killed writer (detect's too)
    atomic_write_files(files)
    return path


DATASET_SUFFIX = "+dataset"


def dataset_key(dataset: str | Path) -> str:
    """The question key of a ``--dataset`` experiment: the file's stem, with ``+dataset`` appended when the
    stem is a built-in question (``inc_state.jsonl`` must not replace the synthetic ``inc_state`` result)."""
    stem = safe_key(Path(dataset).stem)  # a file name may hold any character; a result's name may not
    return stem + DATASET_SUFFIX if stem in QUESTIONS or is_task(stem) else stem


def method_names(method: str | Sequence[str]) -> list[str]:
    """Method names from ``"a,b"`` or a list (each item may itself hold commas); checked against the registry,
    duplicates dropped, order kept."""
    items = [method] if isinstance(method, str) else list(method)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise ParamError("method", ": no method given")
    for n in names:
        METHODS.get(n)
    return list(dict.fromkeys(names))


def result_name(method: str, success_only: bool) -> str:
    """The name a method's result is written under (:meth:`~retrieval_heads.methods.base.Method.result_name`)."""
    return METHODS.get(method).result_name(success_only)


@holds_output_dir("detect")  # no sweep or other detect writes into output_dir meanwhile
def detect(
    model: str | LoadedModel = "smollm2",
    question: str = DEFAULT_QUESTION,
    tokens: int | None = None,
    samples: int | None = None,
    needle_position: float = 0.5,
    dataset: str | Path | None = None,
    seed: int = 0,
    method: str | Sequence[str] = "summed_attention",
    dtype: str = "float32",
    device: str = "cpu",
    batch_size: int = 1,
    output_dir: str | Path | None = None,
    save_samples: bool = False,
    progress: bool = False,
    trust_remote_code: bool = False,
    success_only: bool = False,
    answers: bool | None = None,
    max_new_tokens: int | None = None,
    save_attention: int = 0,
    span: str | Sequence[str] | None = None,
    rank_by: str = "score",
    alpha: float = 0.05,
    one_prefill: bool = True,
    eager_attentions: bool = False,
) -> Detection:
    """Score every (layer, head) of ``model`` by one or several methods on the same samples.

    ``tokens``, ``samples``, ``span`` and ``answers`` left out (None) take the defaults of ``question``
    (:mod:`retrieval_heads.defaults`): with no question given, the ``passkey`` task on the ``answer`` span with
    answers; a filing question (``"inc_state"``, ...) or a dataset, the seed's 512 tokens, 16 samples,
    ``needle`` span. ``question`` is a filing question or a long-context task (:mod:`retrieval_heads.data.tasks`).

    ``method`` is a registered method's name (``METHODS``; see :mod:`retrieval_heads.methods`), a
    comma-separated list or a list of names. With ``dataset`` (a JSONL file, see
    :mod:`retrieval_heads.data.dataset`) its records are the samples (``samples`` caps how many are used)
    and the experiment is named after the file; otherwise ``samples`` synthetic filings are generated from
    ``seed``. With ``output_dir`` each method's
    result JSON (and, with ``save_samples``, its per-sample audit file) is written to
    ``output_dir/{name}/``.

    The model's greedy answers (at most ``max_new_tokens``; None: the task's own budget,
    :func:`~retrieval_heads.data.tasks.decode_budget`, 12 for a filing question or a dataset) are decoded once per sample when a method needs
    them, with ``success_only`` (each method then counts only correctly answered samples and is written as
    ``{method}_success``), or with ``answers=True``; accuracy then goes in each result's ``extra``.

    The results of a method that ``measures_spans`` (the default method) also get each head's chance
    baseline, lift, control-span mass and a significance test against the control
    (:mod:`retrieval_heads.chance`), for each span kind in ``span`` (``needle``, ``answer``, ``fact``; each
    written under :func:`~retrieval_heads.chance.span_result_name`),
    all from the same probed passes; ``rank_by="lift"`` ranks them by lift; ``alpha`` is the test's level.

    When more than one pass per sample would be run (several methods, or answers), every method, span and
    the answers come from one context pass per sample (:mod:`retrieval_heads.onepass`; equal to separate
    passes within float tolerance); ``one_prefill=False`` runs each method's own passes instead.

    ``eager_attentions=True`` scores a model whose family does not use transformers' attention interface
    (bloom, gpt_neo, mpt, ...) from its own full attention matrices, one layer at a time
    (:mod:`retrieval_heads.eager_rows`: exact, but B x H x N x N floats per layer); other models ignore it.

    With ``save_attention`` K > 0, each result also gets the last prompt token's attention rows of its top-K
    heads on every sample (:mod:`retrieval_heads.attention`; one extra probed pass per sample for all
    methods), written beside it as ``.attention.npz`` and kept in ``DetectResult.attention``.

    The scores and records come from :func:`~retrieval_heads.records.score_unit`, with the prompts as a unit of
    one question: the sweep's own path, so a one-unit sweep of the same settings writes the same files.

    Returns a :class:`Detection`, {result name: :class:`DetectResult`}, whatever the number of results; one of
    a single result also answers ``.scores``, ``.top()``, ``.record``, ... for it (:class:`AmbiguousResult`
    when it holds several).
    """
    from . import chance

    check_args(None if dataset else question, 1 if tokens is None else tokens, 1 if samples is None else samples,
               needle_position, batch_size, seed)
    given = settings_for(question, dataset is not None)  # what a setting left out (None) takes
    tokens = given.tokens if tokens is None else tokens
    samples = given.samples if samples is None else samples
    span = given.span if span is None else span
    answers = given.answers if answers is None else answers
    names = method_names(method)
    spans = chance.span_names(span)
    chance.check_rank_by(rank_by)
    chance.check_spans_for(spans, dataset is not None, question)
    spec.check("alpha", alpha)
    if max_new_tokens is None:  # the task's own (a UUID is long), else the seed's 12
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if dataset else decode_budget(question)
    spec.check("max_new_tokens", max_new_tokens)
    spec.check("save_attention", save_attention)
    records = load_jsonl(dataset)[:samples] if dataset else None
    if output_dir is not None:
        check_writable(output_dir)  # before any work
        for n in names:  # no method folder is a link to elsewhere (checked again when writing)
            for rname in METHODS.get(n).result_names(spans, success_only):
                check_result_folder(Path(output_dir) / rname)
    if isinstance(model, LoadedModel):
        lm = model
    else:
        with phase(f"loading model {model} ...", progress):
            lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if eager_attentions:
        eager_rows.enable(lm.model)
    prompts = experiment_prompts(lm, question, tokens, samples, needle_position, seed, records)
    if records is not None:
        qkey = dataset_key(dataset)
        qs = {p.question for p in prompts}
        qprompt = qs.pop() if len(qs) == 1 else "(per record)"
    else:
        qkey, qprompt = question, question_text(question)
    # a unit of one question (the sweep's path, without its lock): every method, span and the answers
    results = score_unit(lm, [{qkey: p} for p in prompts], names, spans, tokens=tokens,
                         needle_position=needle_position, seed=seed, answers=bool(answers),
                         max_new_tokens=max_new_tokens, success_only=success_only, alpha=alpha, rank_by=rank_by,
                         batch_size=batch_size, one_prefill=one_prefill, save_attention=save_attention,
                         question_prompts={qkey: qprompt}, provenance=make_provenance(lm.identity, dataset),
                         progress=progress)
    for r in results if output_dir else ():  # written once every result (and its attention) is complete
        r.path = write_result(output_dir, r.record, r.prompts, r.sample_scores, save_samples, r.answers,
                              attention=r.attention, spans=r.spans)
    return Detection({r.record["method"]: r for r in results})


