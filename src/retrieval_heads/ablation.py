"""Do the heads matter? Remove a result's top-k heads, and k random others as a control, and measure.

Removing a head zeroes its output before the output projection (through the probe's ``ablate``), in every
forward pass: the head no longer contributes anything, as opposed to flattening its attention to uniform.
For each k the top-k heads of the result's ranking are removed, and, as the control, k heads drawn at
random from the heads *outside* that top-k set (one draw per seed, ``random.Random(f"{seed}:{k}")``, so a
draw never holds a top head and is the same on every run). Each condition measures, over the samples:

- ``accuracy``: the share of greedy answers that match the gold answer (:mod:`retrieval_heads.generation`);
- ``logprob``: the mean over samples of the mean log-probability of the gold answer's tokens, teacher-forced
  right after the prompt.

k = 0 removes nothing: its numbers are the unablated model's (and the random control equals them).

The conditions of a curve run as rows of one batch (``batch_size`` rows per forward pass): each row is one
(sample, condition) pair with its own removed heads (the probe's per-row ``ablate`` tensor), the greedy
answers are decoded with one KV cache per row and the gold log-probabilities teacher-forced in batches; the
unablated row is computed once, whatever k or draw shares it. ``batch_size=1`` is the slow reference:
one condition at a time (:func:`evaluate`), one forward pass per sample and condition. Both give the same
answers and log-probabilities (tested within 1e-5 in float32).

>>> from retrieval_heads import ablate
>>> res = ablate("results/retrieval_score/smollm2_hq_state_512.json", ks=(0, 5, 10),       # doctest: +SKIP
...              random_seeds=2, batch_size=8)
>>> [(r["k"], r["top_accuracy"], r["random_accuracy_mean"]) for r in res.summary]      # doctest: +SKIP
>>> res.write("hq_state.ablation.json")              # the JSON and the plot beside it   # doctest: +SKIP
"""

from __future__ import annotations

import io
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .console import bar_disabled, phase
from .capture import attention_probe
from .data.dataset import load_jsonl
from .data.prompt import PromptSample
from .data.questions import QUESTIONS, answer_matches
from .errors import UserError
from .experiments import check_args, experiment_prompts
from .generation import DEFAULT_MAX_NEW_TOKENS, Answer, accuracy, answer_prompts, gold_logprob, greedy_decode, stop_rule
from .io import atomic_write_bytes, atomic_write_files, json_bytes
from .models import MODELS, LoadedModel, input_device, load_model
from .results import load_result, parse_head, validate

DEFAULT_KS = (0, 5, 10, 20, 50)
DEFAULT_BATCH_SIZE = 8


def ranked_heads(record: dict) -> list[str]:
    """Every head of a result, best first."""
    return [r["head"] for r in record["head_rankings"]]


def top_heads(record: dict, k: int) -> list[str]:
    return ranked_heads(record)[:k]


def random_heads(record: dict, k: int, seed: int) -> list[str]:
    """k heads drawn uniformly, without replacement, from the heads outside the top k; reproducible."""
    outside = ranked_heads(record)[k:]
    if k > len(outside):
        raise UserError(f"--k {k}: only {len(outside)} heads lie outside the top {k} for the random control")
    return sorted(random.Random(f"{seed}:{k}").sample(outside, k), key=parse_head)


def ablate_map(heads: Sequence[str]) -> dict[int, list[int]]:
    """{layer: [head, ...]} for :func:`retrieval_heads.capture.attention_probe`."""
    out: dict[int, list[int]] = {}
    for name in heads:
        layer, head = parse_head(name)
        out.setdefault(layer, []).append(head)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def evaluate(lm, prompts: Sequence[PromptSample], heads: Sequence[str], max_new_tokens: int, batch_size: int = 1,
             progress: bool = False, desc: str = "ablation") -> dict:
    """Accuracy and gold log-probability over ``prompts`` with ``heads`` removed."""
    ablate = ablate_map(heads)
    answers = answer_prompts(lm, prompts, max_new_tokens, batch_size, ablate=ablate or None, progress=progress,
                             desc=desc)
    logps = [gold_logprob(lm.model, lm.tokenizer, p, ablate or None) for p in prompts]
    return condition(heads, answers, logps)


def condition(heads: Sequence[str], answers: Sequence[Answer], logps: Sequence[float]) -> dict:
    """One condition's entry of the JSON: its heads, accuracy, mean gold log-prob, and per-sample rows."""
    return {
        "heads": list(heads),
        **accuracy(answers),
        "logprob": round(sum(logps) / len(logps), 6),
        "samples": [{"generated": a.text, "correct": a.correct, "logprob": round(lp, 6)}
                    for a, lp in zip(answers, logps)],
    }


def removal_mask(head_sets: Sequence[Sequence[str]], num_layers: int, num_heads: int) -> torch.Tensor:
    """(C, L, H) boolean: True where condition c removes head (l, h); the probe's per-row ``ablate``."""
    mask = torch.zeros(len(head_sets), num_layers, num_heads, dtype=torch.bool)  # (C, L, H)
    for c, heads in enumerate(head_sets):
        for name in heads:
            mask[(c, *parse_head(name))] = True
    return mask


def _row_batches(rows: Sequence[tuple[int, int]], key, batch_size: int) -> list[list[tuple[int, int]]]:
    """Rows grouped by ``key(row)`` (rows of one group have one shape) and cut into batches, first-seen order."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


def _removal(model, mask: torch.Tensor, device):
    """The probe removing each row's heads (mask (B, L, H)), or nothing at all where no row removes any."""
    return attention_probe(model, None, ablate=mask.to(device)) if bool(mask.any()) else nullcontext()


def evaluate_batched(lm, prompts: Sequence[PromptSample], head_sets: Sequence[Sequence[str]], max_new_tokens: int,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> list[dict]:
    """:func:`evaluate` for every head set at once: the (sample, head set) pairs run as rows of batches of
    ``batch_size``, each row with its own removed heads. Returns one dict per head set, as :func:`evaluate`."""
    answers, logps = measure_rows(lm, prompts, head_sets, max_new_tokens, batch_size, progress)
    return [condition(heads, a, lp) for heads, a, lp in zip(head_sets, answers, logps)]


def measure_rows(lm, prompts: Sequence[PromptSample], head_sets: Sequence[Sequence[str]], max_new_tokens: int,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                 ) -> tuple[list[list[Answer]], list[list[float]]]:
    """Greedy answers and gold log-probs (unrounded) of every sample under every head set, [set][sample], the
    (sample, set) pairs as rows of batches of ``batch_size``."""
    from tqdm.auto import tqdm

    model, tok = lm.model, lm.tokenizer
    device = input_device(model)
    mask = removal_mask(head_sets, lm.num_layers, lm.num_heads)  # (C, L, H)
    rows = [(i, c) for i in range(len(prompts)) for c in range(len(head_sets))]
    golds = [list(tok(p.answer, add_special_tokens=False)["input_ids"]) for p in prompts]
    stop = stop_rule(model, tok)
    answers: dict[tuple[int, int], Answer] = {}
    logps: dict[tuple[int, int], float] = {}
    with tqdm(total=2 * len(rows), desc="ablation", unit="row", disable=bar_disabled(progress), file=sys.stderr,
              leave=False) as bar, torch.no_grad():
        for chunk in _row_batches(rows, lambda r: len(prompts[r[0]].input_ids), batch_size):
            ids = torch.tensor([prompts[i].input_ids for i, _ in chunk], device=device)  # (B, N)
            got, _ = greedy_decode(model, ids, max_new_tokens, stop,
                                   ablate=mask[[c for _, c in chunk]].to(device))  # each row its own heads
            for (i, c), a in zip(chunk, got):
                text = tok.decode(a, skip_special_tokens=True).strip()
                answers[(i, c)] = Answer(text, a, answer_matches(text, prompts[i].answer))
            bar.update(len(chunk))
        # teacher-forced gold answers: prompt + gold[:-1], the last len(gold) logits; one shape per group
        for chunk in _row_batches(rows, lambda r: (len(prompts[r[0]].input_ids), len(golds[r[0]])), batch_size):
            T = len(golds[chunk[0][0]])
            ids = torch.tensor([prompts[i].input_ids + golds[i][:-1] for i, _ in chunk], device=device)  # (B, N+T-1)
            with _removal(model, mask[[c for _, c in chunk]], device) as state:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=T).logits  # (B, T, V)
                if state is not None:
                    state.end_pass(model)  # every layer reported (and was ablated) exactly once
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            target = torch.tensor([golds[i] for i, _ in chunk], device=logp.device)  # (B, T)
            per_row = logp.gather(-1, target[..., None])[..., 0].mean(-1)  # (B,)
            for row, lp in zip(chunk, per_row.tolist()):
                logps[row] = lp
            bar.update(len(chunk))
    return ([[answers[(i, c)] for i in range(len(prompts))] for c in range(len(head_sets))],
            [[logps[(i, c)] for i in range(len(prompts))] for c in range(len(head_sets))])


def check_ks(ks: Sequence[int], num_heads: int) -> list[int]:
    if not ks:
        raise UserError("--k: give at least one number of heads")
    for k in ks:
        if k < 0 or k > num_heads:
            raise UserError(f"--k {k} is outside 0..{num_heads} (the model's heads)")
    return sorted(set(ks))


def run_ablation(lm, record: dict, prompts: Sequence[PromptSample], ks: Sequence[int], random_seeds: int = 3,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = False, tokens: int | None = None, seed: int | None = None) -> dict:
    """Every condition of the curve, as the JSON written by ``retrieval-heads ablate``. ``batch_size`` rows
    (sample x condition) per forward pass; 1 runs one condition at a time (the reference)."""
    total = len(record["head_rankings"])  # a hybrid's: its attention layers' heads
    ks = check_ks(ks, total)
    if random_seeds < 0:
        raise UserError(f"--random-seeds must be >= 0, got {random_seeds}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    for k in ks:
        if random_seeds:
            random_heads(record, k, 0)  # fail before any work if a control cannot be drawn
    conditions = [("top", k, None, top_heads(record, k)) for k in ks]
    conditions += [("random", k, s, random_heads(record, k, s)) for k in ks for s in range(random_seeds)]
    if batch_size == 1:
        base = evaluate(lm, prompts, [], max_new_tokens, 1, progress, "k=0")
        measured = [base if not heads else evaluate(lm, prompts, heads, max_new_tokens, 1, progress,
                                                   f"top {k}" if kind == "top" else f"random {k} #{s}")
                    for kind, k, s, heads in conditions]
    else:
        sets = list(dict.fromkeys([()] + [tuple(heads) for *_, heads in conditions]))  # unablated row first, once
        got = dict(zip(sets, evaluate_batched(lm, prompts, sets, max_new_tokens, batch_size, progress)))
        base = got[()]
        measured = [got[tuple(heads)] for *_, heads in conditions]
    top = [{"k": k, **m} for (kind, k, _, _), m in zip(conditions, measured) if kind == "top"]
    rand = [{"k": k, "seed": s, **m} for (kind, k, s, _), m in zip(conditions, measured) if kind == "random"]
    return {
        "result_method": record["method"], "model_key": record["model_key"], "model_name": record["model_name"],
        "question": record["question"], "total_tokens": record["total_tokens"] if tokens is None else tokens,
        "needle_position": record["needle_position"], "seed": record.get("seed") if seed is None else seed,
        "samples": len(prompts), "max_new_tokens": max_new_tokens,
        "ks": ks, "random_seeds": random_seeds,
        "removal": "head output zeroed before the output projection",
        "baseline": {k: base[k] for k in ("accuracy", "n_correct", "n_answered", "logprob")},
        "top": top, "random": rand, "summary": summary(ks, top, rand),
    }


def summary(ks: Sequence[int], top: list[dict], rand: list[dict]) -> list[dict]:
    """Per k: the top condition's numbers and the random control's mean, min and max over seeds."""
    out = []
    for k, t in zip(ks, top):
        row = {"k": k, "top_accuracy": t["accuracy"], "top_logprob": t["logprob"]}
        rs = [r for r in rand if r["k"] == k]
        for what in ("accuracy", "logprob"):
            vals = [r[what] for r in rs]
            if vals:
                row.update({f"random_{what}_mean": round(sum(vals) / len(vals), 6),
                            f"random_{what}_min": min(vals), f"random_{what}_max": max(vals)})
        out.append(row)
    return out


def plot(report: dict, path) -> None:
    """Accuracy and gold log-probability vs k: top heads as a line, the random control as its mean with a
    min..max band over seeds. Written atomically as PNG."""
    atomic_write_bytes(path, plot_png(report))


def plot_png(report: dict) -> bytes:
    """The figure of :func:`plot` as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what, label in ((axes[0], "accuracy", "needle-question accuracy"),
                            (axes[1], "logprob", "mean log-prob of gold answer tokens")):
        ax.plot(ks, [r[f"top_{what}"] for r in rows], "o-", color="tab:red", label="top-k heads removed")
        if report["random_seeds"]:
            ax.plot(ks, [r[f"random_{what}_mean"] for r in rows], "s--", color="tab:blue",
                    label=f"k random heads removed (mean of {report['random_seeds']}, min..max band)")
            ax.fill_between(ks, [r[f"random_{what}_min"] for r in rows], [r[f"random_{what}_max"] for r in rows],
                            color="tab:blue", alpha=0.2)
        ax.set_xlabel("heads removed (k)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
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


MAX_RANDOM_SEEDS = 1000  # random controls per k; each is a forward pass per sample


def ablate(
    result: str | Path | dict,
    model=None,
    ks: Sequence[int] = DEFAULT_KS,
    random_seeds: int = 3,
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
) -> AblationResult:
    """Remove a result's top-k heads, and k random others per seed, and measure accuracy and gold log-prob.

    ``result`` is a result JSON written by ``detect`` (path) or its record (dict); ``model`` a name, a path or
    a :class:`~retrieval_heads.models.LoadedModel` (default: the result's ``model_key``). The samples are the
    result's own (question, length, depth and seed) unless ``samples``, ``tokens`` or ``seed`` say otherwise;
    a result made from a dataset needs ``dataset`` again. Everything that needs no model is checked before
    one is loaded. ``batch_size`` rows (sample x condition, each with its own removed heads) run per forward
    pass; 1 is the one-condition-at-a-time reference, with the same numbers.

    >>> res = ablate("results/summed_attention/smollm2_hq_state_512.json", ks=(0, 5, 10))   # doctest: +SKIP
    >>> res.summary[1]["top_accuracy"], res.summary[1]["random_accuracy_mean"]               # doctest: +SKIP
    >>> res.write("curve.json")                                                              # doctest: +SKIP
    """
    source = None if isinstance(result, dict) else Path(result)
    record = validate(result) if source is None else load_result(source)
    ks = check_ks(ks, len(record["head_rankings"]))
    for k in ks if random_seeds > 0 else []:
        random_heads(record, k, 0)  # a control that cannot be drawn fails before the model loads
    n = record["samples_processed"] if samples is None else samples
    t = record["total_tokens"] if tokens is None else tokens
    s = record.get("seed", 0) if seed is None else seed
    synthetic = dataset is None
    if synthetic and record["question"] not in QUESTIONS:
        raise UserError(f"{source or 'the result'} was made from a dataset ({record['question']}); "
                        "pass it with --dataset")
    check_args(record["question"] if synthetic else None, t, n, record["needle_position"], batch_size, s)
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not 0 <= random_seeds <= MAX_RANDOM_SEEDS:
        raise UserError(f"--random-seeds must lie in [0, {MAX_RANDOM_SEEDS}], got {random_seeds}")
    if model is None and record["model_key"] not in MODELS:  # a file's field never names a folder to load
        raise UserError(f"{source or 'the result'} was made with model {str(record['model_name'])[:80]!r}, not a "
                        f"built-in key; pass the model with --model")
    records = None if synthetic else load_jsonl(dataset)[:n]
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
    report = run_ablation(lm, record, prompts, ks, random_seeds, max_new_tokens, batch_size, progress=progress,
                          tokens=t, seed=s if synthetic else None)
    if source is not None:
        report["result"] = str(source)
    return AblationResult(report, list(prompts))
