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
"""

from __future__ import annotations

import io
import random
from typing import Sequence

from .data.prompt import PromptSample
from .errors import UserError
from .generation import accuracy, answer_prompts, gold_logprob
from .io import atomic_write_bytes
from .results import parse_head


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
    return {
        "heads": list(heads),
        **accuracy(answers),
        "logprob": round(sum(logps) / len(logps), 6),
        "samples": [{"generated": a.text, "correct": a.correct, "logprob": round(lp, 6)}
                    for a, lp in zip(answers, logps)],
    }


def check_ks(ks: Sequence[int], num_heads: int) -> list[int]:
    if not ks:
        raise UserError("--k: give at least one number of heads")
    for k in ks:
        if k < 0 or k > num_heads:
            raise UserError(f"--k {k} is outside 0..{num_heads} (the model's heads)")
    return sorted(set(ks))


def run_ablation(lm, record: dict, prompts: Sequence[PromptSample], ks: Sequence[int], random_seeds: int = 3,
                 max_new_tokens: int = 12, batch_size: int = 1, progress: bool = False,
                 tokens: int | None = None, seed: int | None = None) -> dict:
    """Every condition of the curve, as the JSON written by ``retrieval-heads ablate``."""
    total = record["num_layers"] * record["num_heads"]
    ks = check_ks(ks, total)
    if random_seeds < 0:
        raise UserError(f"--random-seeds must be >= 0, got {random_seeds}")
    for k in ks:
        if random_seeds:
            random_heads(record, k, 0)  # fail before any work if a control cannot be drawn
    base = evaluate(lm, prompts, [], max_new_tokens, batch_size, progress, "k=0")
    top, rand = [], []
    for k in ks:
        top.append({"k": k, **(base if k == 0 else evaluate(lm, prompts, top_heads(record, k), max_new_tokens,
                                                             batch_size, progress, f"top {k}"))})
        for seed in range(random_seeds):
            heads = random_heads(record, k, seed)
            rand.append({"k": k, "seed": seed, **(base if k == 0 else evaluate(
                lm, prompts, heads, max_new_tokens, batch_size, progress, f"random {k} #{seed}"))})
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
