"""The controls of an ablation curve and what is concluded from them: head draws, the per-k summary over draws,
the paired test of top-k against the layer-matched control, and the one-line conclusion. No model runs here.

Two controls, each ``draws`` random head sets per k, reproducible by seed, never holding a top-k head:

- ``matched`` (layer-matched): for each top head, one head drawn from the *same layer* outside the top k
  (``random.Random(f"matched:{seed}:{k}")``). A layer with fewer free heads than top heads borrows the rest
  from the nearest layers (the lower one first on a tie); each draw counts its borrowed heads in
  ``from_other_layers``. Removing heads of the same depths is the fair comparison: late layers may matter
  more than early ones whatever the heads.
- ``random`` (unmatched): k heads drawn uniformly from every head outside the top k
  (``random.Random(f"{seed}:{k}")``, the draw of earlier releases).

The test, per k > 0 and per metric (gold log-prob, and log-prob after the lead-in): a one-sided Wilcoxon
signed-rank test, paired over samples, that the top-k condition's per-sample value is *lower* than the mean
of the control's draws on that sample (:func:`retrieval_heads.stats.signed_rank_greater`, zero differences
dropped), Holm-adjusted over the ks of one (control, metric).

>>> rec = {"head_rankings": [{"head": h} for h in ["L1H0", "L1H1", "L0H0", "L0H1", "L1H2", "L0H2"]]}
>>> matched_heads(rec, 2, seed=0)[1]      # both top heads sit in layer 1, which has one free head left
1
>>> p = paired_lower([[-2.0, -3.0], [-1.0, -2.0], [-3.0, -1.0]], [-5.0, -6.0, -7.0])   # 3 samples, 2 draws
>>> round(p["p"], 4), p["n_lower"]
(0.125, 3)
"""

from __future__ import annotations

import random
import statistics
from typing import Sequence

import numpy as np

from . import spec
from .errors import ParamError
from .results import parse_head
from .stats import holm, signed_rank_greater

CONTROLS = spec.CONTROLS
CONTROL_NAMES = {"matched": "layer-matched random heads", "random": "unmatched random heads"}
METRICS = ("accuracy", "logprob", "leadin_logprob")
METRIC_NAMES = {"accuracy": "accuracy", "logprob": "gold log-prob",
                "leadin_logprob": "gold log-prob after the lead-in"}
TESTED = ("logprob", "leadin_logprob")  # accuracy per sample is 0/1: reported, not tested
DEFAULT_DRAWS = spec.default("random_seeds", "ablate")
ALPHA = 0.05
TEST = ("Wilcoxon signed-rank, one-sided (top-k lower than the mean of the control's draws), paired over "
        "samples; Holm over k")


def ranked_heads(record: dict) -> list[str]:
    """Every head of a result, best first."""
    return [r["head"] for r in record["head_rankings"]]


def top_heads(record: dict, k: int) -> list[str]:
    return ranked_heads(record)[:k]


def random_heads(record: dict, k: int, seed: int) -> list[str]:
    """k heads drawn uniformly, without replacement, from the heads outside the top k; reproducible."""
    outside = ranked_heads(record)[k:]
    if k > len(outside):
        raise ParamError("k", f" {k}: only {len(outside)} heads lie outside the top {k} for the random control")
    return sorted(random.Random(f"{seed}:{k}").sample(outside, k), key=parse_head)


def matched_heads(record: dict, k: int, seed: int) -> tuple[list[str], int]:
    """(k heads drawn layer by layer, how many came from another layer than the top head they replace).

    For each layer holding m top-k heads, m heads drawn without replacement from that layer's heads outside
    the top k; a shortfall is drawn from the nearest layers with free heads (lower layer first on a tie)."""
    ranked = ranked_heads(record)
    top = ranked[:k]
    if k > len(ranked) - k:
        raise ParamError("k", f" {k}: only {len(ranked) - k} heads lie outside the top {k} for the random control")
    free: dict[int, list[str]] = {}
    for name in sorted(ranked[k:], key=parse_head):
        free.setdefault(parse_head(name)[0], []).append(name)
    need: dict[int, int] = {}
    for name in top:
        layer = parse_head(name)[0]
        need[layer] = need.get(layer, 0) + 1
    rng = random.Random(f"matched:{seed}:{k}")
    drawn: list[str] = []
    short: list[int] = []  # one entry per head still to draw elsewhere, its top head's layer
    for layer in sorted(need):
        pool = free.get(layer, [])
        got = rng.sample(pool, min(need[layer], len(pool)))
        drawn += got
        free[layer] = [h for h in pool if h not in got]
        short += [layer] * (need[layer] - len(got))
    for layer in short:
        near = sorted((lay for lay, pool in free.items() if pool), key=lambda lay: (abs(lay - layer), lay))[0]
        pick = rng.choice(free[near])
        drawn.append(pick)
        free[near].remove(pick)
    return sorted(drawn, key=parse_head), len(short)


def spread(values: Sequence[float]) -> dict:
    """min, median, max and mean of a control's per-draw values."""
    v = list(values)
    return {"min": min(v), "median": round(statistics.median(v), 6), "max": max(v),
            "mean": round(sum(v) / len(v), 6)}


def paired_lower(control: Sequence[Sequence[float]], top: Sequence[float]) -> dict:
    """The one-sided paired test that ``top`` (S,) is lower than the per-sample mean of ``control`` (S, D)
    draws. Returns p, the number of non-zero differences, of samples where top is lower, and of samples."""
    c = np.asarray(control, dtype=np.float64).mean(axis=1)  # (S,)
    t = np.asarray(top, dtype=np.float64)  # (S,)
    p, used = signed_rank_greater(c[:, None], t[:, None])  # control > top
    return {"p": float(p[0]), "n_nonzero": int(used[0]), "n_lower": int((t < c).sum()), "n": int(t.size),
            "top_mean": round(float(t.mean()), 6), "control_mean": round(float(c.mean()), 6)}


def per_sample(cond: dict, metric: str) -> list[float]:
    return [float(s[metric]) for s in cond["samples"]]


def summary(ks: Sequence[int], top: list[dict], controls: dict[str, list[dict]]) -> list[dict]:
    """Per k: the top condition's numbers, and each control's min / median / max / mean over its draws
    (``matched_logprob_median`` ...) and, for the matched control, its heads borrowed from other layers."""
    out = []
    for k, t in zip(ks, top):
        row: dict = {"k": k, **{f"top_{m}": t[m] for m in METRICS}}
        for name, conds in controls.items():
            rs = [r for r in conds if r["k"] == k]
            if not rs:
                continue
            for m in METRICS:
                row.update({f"{name}_{m}_{s}": v for s, v in spread([r[m] for r in rs]).items()})
            if name == "matched":
                row["matched_from_other_layers"] = sum(r.get("from_other_layers", 0) for r in rs)
        out.append(row)
    return out


def paired_tests(ks: Sequence[int], top: list[dict], controls: dict[str, list[dict]]) -> list[dict]:
    """The paired test per (control, metric, k > 0), with Holm-adjusted p over the ks of each (control, metric)."""
    out = []
    for name, conds in controls.items():
        for metric in TESTED:
            rows = []
            for k, t in zip(ks, top):
                draws = [r for r in conds if r["k"] == k]
                if k == 0 or not draws:
                    continue
                matrix = list(zip(*(per_sample(r, metric) for r in draws)))  # (S, D)
                rows.append({"k": k, "control": name, "metric": metric, "draws": len(draws),
                             **paired_lower(matrix, per_sample(t, metric))})
            adjusted = holm(np.array([r["p"] for r in rows])) if rows else []
            for r, q in zip(rows, adjusted):
                r["p"] = float(f"{r['p']:.6g}")
                r["p_holm"] = float(f"{float(q):.6g}")
            out += rows
    return out


def conclusion(report: dict, alpha: float = ALPHA) -> str:
    """One line: at which k removing the top heads lowers the gold log-prob more than the control does."""
    rows = report.get("tests", [])
    control = "matched" if any(r["control"] == "matched" for r in rows) else "random"
    rows = [r for r in rows if r["control"] == control and r["metric"] == "logprob"]
    if not rows:
        why = "no control was drawn" if not report.get("draws") or not report.get("controls") else "only k = 0"
        return f"no test: {why}, so nothing tells the top heads from random ones"
    n = rows[0]["n"]
    name = CONTROL_NAMES[control]
    won = [r for r in rows if r["p_holm"] <= alpha]
    lost = [r for r in rows if r["p_holm"] > alpha]

    def ks(rs):
        return ", ".join(f"{r['k']} (p {r['p_holm']:.2g}, {r['n_lower']}/{r['n']} samples lower)" for r in rs)

    if not won:
        floor = 0.5 ** n
        note = f"; with {n} samples the smallest attainable p is {floor:.2g}" if floor > alpha else ""
        return (f"not shown: removing the top-k heads does not lower the gold log-prob significantly more than "
                f"removing {name} at any k (Holm-adjusted one-sided Wilcoxon, alpha {alpha:g}, {n} samples){note}")
    tail = f"; not at k = {ks(lost)}" if lost else ""
    return (f"causal at k = {ks(won)}: removing the top-k heads lowers the gold log-prob more than removing "
            f"{name} (Holm-adjusted one-sided Wilcoxon, alpha {alpha:g}){tail}")


def summary_lines(report: dict) -> list[str]:
    """The terminal summary of an ablation: per metric a table of k, the top-k condition and each control's
    median [min, max] over draws, every number under a named column; then the paired tests and the conclusion.

    >>> rep = {"controls": ["matched"], "draws": 2, "samples": 4, "tests": [], "conclusion": "no test: only k = 0",
    ...        "summary": [{"k": 0, "top_accuracy": 0.5, "matched_accuracy_median": 0.5, "matched_accuracy_min": 0.5,
    ...                     "matched_accuracy_max": 0.5}]}
    >>> print("\\n".join(summary_lines(rep)[:3]))
    accuracy (share of greedy answers right; controls: median [min, max] over 2 draws):
        k  top-k removed           layer-matched random heads removed
        0  0.50                    0.50 [0.50, 0.50]
    """
    controls = [c for c in report.get("controls", []) if c in CONTROL_NAMES]
    explain = {"accuracy": "share of greedy answers right",
               "logprob": "mean log-prob of the gold answer's tokens, right after the prompt",
               "leadin_logprob": "the same after the model's own lead-in"}
    fmt = {"accuracy": "{:.2f}", "logprob": "{:.3f}", "leadin_logprob": "{:.3f}"}
    rows = report["summary"]
    out = []
    for m in METRICS:
        if not rows or f"top_{m}" not in rows[0]:
            continue
        f = fmt[m].format
        heads = ["top-k removed"] + [f"{CONTROL_NAMES[c]} removed" for c in controls]
        out.append(f"{METRIC_NAMES[m]} ({explain[m]}"
                   + (f"; controls: median [min, max] over {report['draws']} draws" if controls else "") + "):")
        width = [max(len(h), 22) for h in heads]
        out.append("    k  " + "  ".join(h.ljust(w) for h, w in zip(heads, width)).rstrip())
        for r in rows:
            cells = [f(r[f"top_{m}"])] + [
                f"{f(r[f'{c}_{m}_median'])} [{f(r[f'{c}_{m}_min'])}, {f(r[f'{c}_{m}_max'])}]"
                if f"{c}_{m}_median" in r else "-" for c in controls]
            out.append(f"  {r['k']:>3}  " + "  ".join(c.ljust(w) for c, w in zip(cells, width)).rstrip())
    borrowed = sum(r.get("matched_from_other_layers", 0) for r in rows)
    if "matched" in controls and borrowed:
        out.append(f"layer-matched draws: {borrowed} head(s) drawn from a neighbouring layer (too few free heads "
                   "in the top heads' own layer)")
    for c in controls:
        ts = [t for t in report.get("tests", []) if t["control"] == c]
        if not ts:
            continue
        out.append(f"paired test, top-k lower than the mean of the {CONTROL_NAMES[c]} draws (one-sided Wilcoxon "
                   f"over {ts[0]['n']} samples, p Holm-adjusted over k):")
        for k in dict.fromkeys(t["k"] for t in ts):
            parts = [f"{METRIC_NAMES[t['metric']]} p {t['p_holm']:.2g} ({t['n_lower']}/{t['n']} samples lower)"
                     for t in ts if t["k"] == k]
            out.append(f"  k={k:<3} " + "; ".join(parts))
    if report.get("conclusion"):
        out.append(f"conclusion: {report['conclusion']}")
    return out
