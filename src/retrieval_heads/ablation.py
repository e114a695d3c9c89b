"""Do the heads matter? Remove a result's top-k heads, and as controls random heads of the same layers and
random heads of any layer, and measure what the model loses.

Removing a head zeroes its output before the output projection (through the probe's ``ablate``), in every
forward pass: the head no longer contributes anything, as opposed to flattening its attention to uniform.
For each k the top-k heads of the result's ranking are removed and, as controls, ``random_seeds`` draws
(5 by default) of each of two kinds (:mod:`retrieval_heads.ablation_stats`): ``matched``, each top head
replaced by a random head of its own layer outside the top k, and ``random``, k heads from anywhere outside
the top k. Each condition measures, over the samples (:mod:`retrieval_heads.ablation_measure`):

- ``accuracy``: the share of greedy answers that match the gold answer (:mod:`retrieval_heads.generation`);
- ``logprob``: the mean over samples of the mean log-probability of the gold answer's tokens, teacher-forced
  right after the prompt;
- ``leadin_logprob``: the same after the model's own lead-in (the words its unablated answer says before the
  answer, "The company is incorporated in"), which is what the model would actually say.

Per k the summary gives the top condition's numbers and each control's min / median / max over its draws;
a one-sided paired Wilcoxon test over samples (top-k against the mean of the matched draws, Holm over k)
and a one-line ``conclusion`` say whether the top heads matter more than heads of the same layers.

k = 0 removes nothing: its numbers are the unablated model's (and the controls equal them).

``batch_size`` > 1 runs the fast path (:func:`~retrieval_heads.ablation_measure.measure_shared`: the layers
below the lowest removed head computed once per sample, one prefill per row for answer and log-probs,
``batch_size`` conditions of a sample per forward pass); ``batch_size=1`` is the slow reference, one
condition and one sample at a time. Both give the same answers and log-probabilities (tested within 1e-5
in float32).

>>> from retrieval_heads import ablate
>>> res = ablate("results/retrieval_score/smollm2_hq_state_512.json", ks=(0, 5, 10))             # doctest: +SKIP
>>> [(r["k"], r["top_accuracy"], r["matched_accuracy_median"]) for r in res.summary]         # doctest: +SKIP
>>> res.record["conclusion"]                                                                  # doctest: +SKIP
>>> res.write("hq_state.ablation.json")              # the JSON and the plot beside it   # doctest: +SKIP
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .ablation_measure import (LEADIN_RULE, Measured, ablate_map, can_share, leadins,  # noqa: F401
                               measure_sequential, measure_shared, removal_mask)
from .ablation_stats import (CONTROL_NAMES, CONTROLS, DEFAULT_DRAWS, METRICS, TEST, conclusion,  # noqa: F401
                             matched_heads, paired_tests, random_heads, ranked_heads, summary, top_heads)
from .console import phase
from .data.dataset import load_jsonl
from .data.prompt import PromptSample
from .data.questions import QUESTIONS
from .data.tasks import is_task
from . import spec
from .errors import ParamError, UserError
from .experiments import check_args, experiment_prompts
from .generation import DEFAULT_MAX_NEW_TOKENS, Answer, accuracy, answer_prompts
from .io import atomic_write_bytes, atomic_write_files, json_bytes
from .models import MODELS, LoadedModel, load_model, model_identity
from .results import identity_of, load_result, validate

DEFAULT_KS = spec.default("k", "ablate")
DEFAULT_BATCH_SIZE = spec.default("batch_size", "ablate")


def condition(heads: Sequence[str], answers: Sequence[Answer], logps: Sequence[float],
              leadin_logps: Sequence[float]) -> dict:
    """One condition's entry of the JSON: its heads, accuracy, mean log-probs, and per-sample rows."""
    return {
        "heads": list(heads),
        **accuracy(answers),
        "logprob": round(sum(logps) / len(logps), 6),
        "leadin_logprob": round(sum(leadin_logps) / len(leadin_logps), 6),
        "samples": [{"generated": a.text, "correct": a.correct, "logprob": round(lp, 6),
                     "leadin_logprob": round(llp, 6)} for a, lp, llp in zip(answers, logps, leadin_logps)],
    }


def measure(lm, prompts: Sequence[PromptSample], head_sets: Sequence[Sequence[str]], max_new_tokens: int,
            batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> tuple[list[dict], list]:
    """Every head set's condition dict (as :func:`condition`), and the samples' lead-ins: the unablated answers
    first (they give the lead-ins), then every set, by the fast path (batch_size > 1) or the reference (1)."""
    base = answer_prompts(lm, prompts, max_new_tokens, 1)  # one sample at a time on both paths: same lead-ins
    leads = leadins(lm.tokenizer, prompts, base)
    fast = batch_size > 1 and can_share(lm.model)  # hybrids (recurrent layers) take the reference path
    how = measure_shared if fast else measure_sequential
    kw = {"batch_size": batch_size} if fast else {}
    got: Measured = how(lm, prompts, head_sets, max_new_tokens, leads, progress=progress, **kw)
    return ([condition(h, a, lp, llp) for h, a, lp, llp in zip(head_sets, got.answers, got.logprob,
                                                               got.leadin_logprob)], leads)


def evaluate(lm, prompts: Sequence[PromptSample], heads: Sequence[str], max_new_tokens: int, batch_size: int = 1,
             progress: bool = False) -> dict:
    """One condition: accuracy, gold log-prob and lead-in log-prob over ``prompts`` with ``heads`` removed."""
    return measure(lm, prompts, [heads], max_new_tokens, batch_size, progress)[0][0]


def check_controls(controls: Sequence[str]) -> list[str]:
    out = []
    for c in controls:
        if c not in CONTROLS:
            raise ParamError("controls", f": unknown control {c!r} (choose from {', '.join(CONTROLS)})")
        if c not in out:
            out.append(c)
    return out


def check_ks(ks: Sequence[int], num_heads: int) -> list[int]:
    if not ks:
        raise ParamError("k", ": give at least one number of heads")
    for k in ks:
        if k < 0 or k > num_heads:
            raise ParamError("k", f" {k} is outside 0..{num_heads} (the model's heads)")
    return sorted(set(ks))


def draw(record: dict, kind: str, k: int, seed: int) -> tuple[list[str], int]:
    """(heads, heads borrowed from other layers) of one control draw."""
    return matched_heads(record, k, seed) if kind == "matched" else (random_heads(record, k, seed), 0)


def run_ablation(lm, record: dict, prompts: Sequence[PromptSample], ks: Sequence[int],
                 random_seeds: int = DEFAULT_DRAWS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, tokens: int | None = None,
                 seed: int | None = None, controls: Sequence[str] = CONTROLS) -> dict:
    """Every condition of the curve, as the JSON written by ``retrieval-heads ablate``: the top-k conditions,
    ``random_seeds`` draws of each control per k, the summary per k, the paired tests and the conclusion.
    ``batch_size`` conditions of a sample per forward pass; 1 runs one condition at a time (the reference)."""
    total = len(record["head_rankings"])  # a hybrid's: its attention layers' heads
    ks = check_ks(ks, total)
    controls = check_controls(controls)
    spec.check("random_seeds", random_seeds)
    spec.check("batch_size", batch_size)
    kinds = controls if random_seeds else []
    for k in ks:
        for kind in kinds:
            draw(record, kind, k, 0)  # fail before any work if a control cannot be drawn
    conditions = [("top", k, None, top_heads(record, k), 0) for k in ks]
    conditions += [(kind, k, s, *draw(record, kind, k, s)) for kind in kinds for k in ks
                   for s in range(random_seeds)]
    sets = list(dict.fromkeys([()] + [tuple(c[3]) for c in conditions]))  # unablated first, each set once
    measured, leads = measure(lm, prompts, sets, max_new_tokens, batch_size, progress)
    got = dict(zip(sets, measured))
    base = got[()]
    top = [{"k": k, **got[tuple(h)]} for kind, k, _, h, _ in conditions if kind == "top"]
    drawn = {kind: [{"k": k, "seed": s, **({"from_other_layers": b} if kind == "matched" else {}), **got[tuple(h)]}
                    for kd, k, s, h, b in conditions if kd == kind] for kind in kinds}
    report = {
        "result_method": record["method"], "model_key": record["model_key"], "model_name": record["model_name"],
        "question": record["question"], "total_tokens": record["total_tokens"] if tokens is None else tokens,
        "needle_position": record["needle_position"], "seed": record.get("seed") if seed is None else seed,
        "samples": len(prompts), "max_new_tokens": max_new_tokens,
        "ks": ks, "controls": list(kinds), "draws": random_seeds, "random_seeds": random_seeds,
        "removal": "head output zeroed before the output projection",
        "leadin": {"rule": LEADIN_RULE, "samples": [{"text": le.text, "source": le.source} for le in leads]},
        "baseline": {k: base[k] for k in ("accuracy", "n_correct", "n_answered", "logprob", "leadin_logprob")},
        "top": top, **{kind: drawn.get(kind, []) for kind in CONTROLS},
        "summary": summary(ks, top, drawn), "test": TEST, "tests": paired_tests(ks, top, drawn),
    }
    report["conclusion"] = conclusion(report)
    return report


def plot(report: dict, path) -> None:
    """Accuracy and gold log-probability vs k: top heads as a line, the random control as its mean with a
    min..max band over seeds. Written atomically as PNG."""
    atomic_write_bytes(path, plot_png(report))


def plot_png(report: dict) -> bytes:
    """The figure of :func:`plot` as PNG bytes: accuracy, gold log-prob and lead-in log-prob vs k, the top-k
    heads as a line, each control as its median over draws with a min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    ks = [r["k"] for r in rows]
    metrics = [m for m in METRICS if f"top_{m}" in rows[0]] if rows else []
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    labels = {"accuracy": "needle-question accuracy", "logprob": "gold log-prob (after the prompt)",
              "leadin_logprob": "gold log-prob after the model's lead-in"}
    for ax, what in zip(axes[0], metrics):
        ax.plot(ks, [r[f"top_{what}"] for r in rows], "o-", color="tab:red", label="top-k heads removed")
        for kind, colour, style in (("matched", "tab:blue", "s--"), ("random", "tab:green", "^:")):
            if kind not in report.get("controls", []) or f"{kind}_{what}_median" not in rows[0]:
                continue
            ax.plot(ks, [r[f"{kind}_{what}_median"] for r in rows], style, color=colour,
                    label=f"{CONTROL_NAMES[kind]} (median of {report['draws']}, min..max band)")
            ax.fill_between(ks, [r[f"{kind}_{what}_min"] for r in rows], [r[f"{kind}_{what}_max"] for r in rows],
                            color=colour, alpha=0.15)
        ax.set_xlabel("heads removed (k)")
        ax.set_ylabel(labels[what])
        ax.grid(alpha=0.3)
    if metrics:
        axes[0][0].set_ylim(-0.05, 1.05)
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['model_key']} {report['question']} {report['total_tokens']} tokens, "
                 f"{report['samples']} samples, heads from {report['result_method']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class AblationResult:
    """An ablation curve: ``record`` is the JSON ``retrieval-heads ablate`` writes (every condition, per-sample
    answers, ``summary`` per k); ``prompts`` are the samples it was measured on."""

    record: dict
    prompts: list[PromptSample] = field(default_factory=list)

    @property
    def summary(self) -> list[dict]:
        return self.record["summary"]

    def plot(self, path: str | Path) -> Path:
        """Accuracy and gold log-probability vs k as a PNG (see :func:`plot`)."""
        plot(self.record, path)
        return Path(path)

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """The JSON at ``path`` and its plot beside it (``.png``), as one write: both go to temp files before
        either is renamed (the plot first, the JSON last), so a failure (a full disk) leaves neither."""
        path = Path(path)
        png = path.with_suffix(".png")
        atomic_write_files([(png, plot_png(self.record)), (path, json_bytes(self.record))])
        return path, png


MAX_RANDOM_SEEDS = spec.MAX_RANDOM_SEEDS  # random controls per k; each is a forward pass per sample


def ablate(
    result: str | Path | dict,
    model=None,
    ks: Sequence[int] = DEFAULT_KS,
    random_seeds: int = DEFAULT_DRAWS,
    samples: int | None = None,
    tokens: int | None = None,
    seed: int | None = None,
    dataset: str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: bool = False,
    controls: Sequence[str] = CONTROLS,
) -> AblationResult:
    """Remove a result's top-k heads, and ``random_seeds`` draws per k of each control (``matched``: random
    heads of the top heads' layers; ``random``: random heads of any layer), and measure accuracy, gold log-prob
    and gold log-prob after the model's lead-in.

    ``result`` is a result JSON written by ``detect`` (path) or its record (dict); ``model`` a name, a path or
    a :class:`~retrieval_heads.models.LoadedModel` (default: the result's ``model_key``). The samples are the
    result's own (question, length, depth and seed) unless ``samples``, ``tokens`` or ``seed`` say otherwise;
    a result made from a dataset needs ``dataset`` again. Everything that needs no model is checked before
    one is loaded. ``batch_size`` conditions of one sample (each row with its own removed heads) run per
    forward pass; 1 is the one-condition-at-a-time reference, with the same numbers.

    >>> res = ablate("results/summed_attention/smollm2_hq_state_512.json", ks=(0, 5, 10))   # doctest: +SKIP
    >>> res.summary[1]["top_accuracy"], res.summary[1]["matched_accuracy_median"]            # doctest: +SKIP
    >>> res.record["conclusion"]                                                             # doctest: +SKIP
    >>> res.write("curve.json")                                                              # doctest: +SKIP
    """
    source = None if isinstance(result, dict) else Path(result)
    record = validate(result) if source is None else load_result(source)
    ks = check_ks(ks, len(record["head_rankings"]))
    controls = check_controls(controls)
    for k in ks if random_seeds > 0 else []:
        for kind in controls:
            draw(record, kind, k, 0)  # a control that cannot be drawn fails before the model loads
    n = record["samples_processed"] if samples is None else samples
    t = record["total_tokens"] if tokens is None else tokens
    s = record.get("seed", 0) if seed is None else seed
    synthetic = dataset is None
    if synthetic and record["question"] not in QUESTIONS and not is_task(record["question"]):
        raise UserError(f"{source or 'the result'} was made from a dataset ({record['question']}); "
                        "pass it with --dataset")
    check_args(record["question"] if synthetic else None, t, n, record["needle_position"], batch_size, s)
    spec.check("max_new_tokens", max_new_tokens)
    spec.check("random_seeds", random_seeds)
    if model is None and record["model_key"] not in MODELS:  # a file's field never names a folder to load
        raise UserError(f"{source or 'the result'} was made with model {str(record['model_name'])[:80]!r}, not a "
                        f"built-in key; pass the model with --model")
    records = None if synthetic else load_jsonl(dataset)[:n]
    if not isinstance(model, LoadedModel):
        name = record["model_key"] if model is None else model
        why = other_model(record, model_identity(name)) if name else None
        if why:  # the heads of one model removed from another, and the curve filed under the first one's name
            raise UserError(f"{source or 'the result'} was made by another model than {name}: {why}; pass the "
                            "model that made it with --model")
    if isinstance(model, LoadedModel):
        lm = model
    else:
        name = record["model_key"] if model is None else model  # an empty name is refused, not the result's
        with phase(f"loading model {name} ...", progress):
            lm = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if (lm.num_layers, lm.num_heads) != (record["num_layers"], record["num_heads"]):
        raise UserError(f"{lm.name} has {lm.num_layers}x{lm.num_heads} heads, the result {record['num_layers']}x"
                        f"{record['num_heads']}")
    prompts = experiment_prompts(lm, record["question"], t, n, record["needle_position"], s, records)
    check_room(lm, prompts, max_new_tokens)
    report = run_ablation(lm, record, prompts, ks, random_seeds, max_new_tokens, batch_size, progress=progress,
                          tokens=t, seed=s if synthetic else None, controls=controls)
    if not synthetic:  # the samples came from this file, whatever the result was made from: say which
        from .results import make_provenance

        report["dataset"] = make_provenance(None, dataset)["dataset"]  # {file, sha256}
    if source is not None:
        report["result"] = str(source)
    return AblationResult(report, list(prompts))


def other_model(record: dict, identity: dict) -> str | None:
    """How the model ``identity`` (:func:`~retrieval_heads.models.model_identity`) differs from the one that
    made ``record`` (its ``provenance``), or None. The weights' SHA-256 decides where both are known (a copy of
    the folder elsewhere is the same model); else the source and the hub revision, where both are known."""
    got = identity_of(record)
    if got["weights_sha256"] and identity.get("weights_sha256"):
        a, b = got["weights_sha256"], identity["weights_sha256"]
        return None if a == b else f"weights sha256 {a[:12]}... (the result) vs {b[:12]}..."
    for k in ("source", "revision"):
        a, b = got[k], identity.get(k)
        if a is not None and b is not None and a != b:
            return f"{k} {str(a)[:80]!r} (the result) vs {str(b)[:80]!r}"
    return None


def check_room(lm: LoadedModel, prompts: Sequence[PromptSample], max_new_tokens: int) -> None:
    """UserError unless every prompt leaves room for what ablation puts after it within the model's positions:
    up to ``max_new_tokens`` answer tokens, then (teacher-forced after a lead-in of at most as many) the gold
    answer. A model with absolute position embeddings (GPT-2) has none beyond its last position."""
    from .ablation_measure import gold_ids

    limit = lm.max_positions
    if not limit:
        return
    need = max(len(p.input_ids) + max_new_tokens + len(gold_ids(lm.tokenizer, p.answer)) for p in prompts)
    if need > limit:
        raise UserError(f"a {max(len(p.input_ids) for p in prompts)}-token prompt leaves no room for the answers "
                        f"({max_new_tokens} tokens with --max-new-tokens) and the gold answer within the "
                        f"{limit} positions of {lm.name}; use a smaller --tokens or --max-new-tokens")
