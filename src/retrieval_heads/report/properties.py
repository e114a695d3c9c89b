"""The properties of retrieval heads (Wu et al. 2024), measured on any set of results: a report section.

- **Sparse**: per result, the share of heads that beat the control (its significance block) and, for
  ``retrieval_score`` results, the share with a retrieval score above 0.1.
- **Consistent**: rank agreement of the top heads between results of one model and base method that
  differ in exactly one of task (question), length, needle depth or span (the method's ``+span``): the
  Jaccard overlap of the top-10 heads and Spearman's correlation of all heads' scores, per pair and as the
  mean per dimension.
- **Dynamically activated**: per head, the share of samples on which its lift exceeds 2x (score over the
  sample's own chance baseline), from the ``.samples.jsonl`` beside a result; what a result lacks for it
  (no samples file, or rows without per-sample baselines) is said.
- **Causal**: each ablation curve (``*.ablation.json``) found among the files: per k, the top-k condition
  against the layer-matched and unmatched controls (median [min, max] over draws), the paired test and the
  conclusion.

>>> share(np.array([[0.0, 0.2], [0.15, 0.05]]), 0.1)
0.5
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import JSONError, check_name, parse_json, read_regular
from .collect import Collection, Experiment
from .document import Block, Bullets, Heading, Paragraph, Table
from .stability import ALL_PAIRS_UP_TO, compare

LIFT_ACTIVE = 2.0  # a head is active on a sample when its lift there exceeds this
RETRIEVAL_SCORE_MIN = 0.1
DIMENSIONS = ("question", "tokens", "depth", "span")


def share(grid: np.ndarray, above: float) -> float:
    """The share of heads whose value exceeds ``above``."""
    g = np.asarray(grid, dtype=np.float64)
    return float((g > above).sum() / g.size)


def base_method(e: Experiment) -> str:
    return e.method.split("+", 1)[0]


def span(e: Experiment) -> str:
    return e.method.split("+", 1)[1] if "+" in e.method else "needle"


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def sparse_rows(col: Collection) -> list[dict]:
    rows = []
    for e in col.experiments:
        L, H = e.shape
        sig = e.record.get("significance") if isinstance(e.record.get("significance"), dict) else None
        heads = sig.get("heads") if sig else None
        beating = len(heads) if isinstance(heads, list) else None
        rs = share(e.scores, RETRIEVAL_SCORE_MIN) if base_method(e) == "retrieval_score" else None
        rows.append({"method": e.method, "model": e.model, "question": e.question, "tokens": e.tokens,
                     "depth": e.depth, "heads": L * H, "beating_control": beating,
                     "beating_control_share": None if beating is None else _r(beating / (L * H)),
                     "retrieval_score_above_0.1_share": _r(rs)})
    return rows


def _identity(e: Experiment) -> dict:
    return {"question": e.question, "tokens": e.tokens, "depth": e.depth, "span": span(e)}


def differing_pairs(members: list[Experiment], bounded: list[str] | None = None) -> list[tuple[int, int, str]]:
    """``(i, j, dimension)`` for the pairs ``i < j`` of ``members`` that differ in exactly one dimension, in
    the order of ``combinations``. Results alike in all other dimensions form a set; a set of more than
    :data:`~.stability.ALL_PAIRS_UP_TO` (hundreds of lengths) pairs each result with the next one in order of
    that dimension only (noted in ``bounded``), as rank stability does: 529 pairs of 530 lengths, not 140,185.
    """
    ids = [_identity(e) for e in members]
    out = []
    for d in DIMENSIONS:
        sets: dict[tuple, list[int]] = defaultdict(list)
        for i, ident in enumerate(ids):
            sets[tuple(ident[x] for x in DIMENSIONS if x != d)].append(i)
        for key, idx in sets.items():
            if len(idx) <= ALL_PAIRS_UP_TO:
                chosen = list(combinations(idx, 2))
            else:
                ordered = sorted(idx, key=lambda i: (ids[i][d], i))
                chosen = [tuple(sorted(p)) for p in zip(ordered, ordered[1:])]
                if bounded is not None:
                    e = members[idx[0]]
                    bounded.append(f"consistency, {e.model} · {base_method(e)} · differing in {d} only: "
                                   f"{len(idx)} results, so only neighbouring ones are compared ({len(idx) - 1} "
                                   f"pairs of {len(idx) * (len(idx) - 1) // 2}; all pairs up to "
                                   f"{ALL_PAIRS_UP_TO})")
            out += [(i, j, d) for i, j in chosen if ids[i][d] != ids[j][d]]
    return sorted(out)


def consistency(col: Collection, bounded: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Pairs of results of one (model, base method, head grid) differing in exactly one dimension
    (:func:`differing_pairs`), and the mean agreement per dimension."""
    groups: dict[tuple, list[Experiment]] = defaultdict(list)
    for e in col.experiments:
        groups[(e.model, base_method(e), e.shape)].append(e)
    pairs = []
    for (model, method, _), members in groups.items():
        for i, j, d in differing_pairs(members, bounded):
            a, b = members[i], members[j]
            c = compare(a, b, (10,), kendall=False)
            pairs.append({"model": model, "method": method, "dimension": d, "a": a.rel, "b": b.rel,
                          "a_value": _identity(a)[d], "b_value": _identity(b)[d], "jaccard_10": _r(c["jaccard_10"]),
                          "spearman": _r(c["spearman"])})
    means = []
    for d in DIMENSIONS:
        mine = [p for p in pairs if p["dimension"] == d]
        if not mine:
            continue
        sp = [p["spearman"] for p in mine if p["spearman"] is not None]
        means.append({"dimension": d, "pairs": len(mine),
                      "jaccard_10_mean": _r(np.mean([p["jaccard_10"] for p in mine])),
                      "spearman_mean": _r(np.mean(sp)) if sp else None})
    return pairs, means


def _sample_rows(path: Path) -> list[dict]:
    rows = []
    for line in read_regular(path).decode("utf-8").splitlines():
        if line.strip():
            row = parse_json(line)
            if not isinstance(row, dict):
                raise JSONError("a row is not an object")
            rows.append(row)
    return rows


def _adds_up(per_sample: np.ndarray, total) -> bool:
    """Whether per-sample rows (S, L, H) sum or average to the result's grid ``total`` (as the writer made
    them; a success-only result averages), within rounding. True where the result records no such grid."""
    if total is None:
        return True
    try:
        total = np.asarray(total, dtype=np.float64)  # (L, H)
    except (TypeError, ValueError):
        return False
    if total.shape != per_sample.shape[1:] or not np.isfinite(total).all():
        return False
    atol = 1e-5 * max(1.0, float(np.abs(total).max()))
    return any(np.allclose(agg, total, rtol=1e-5, atol=atol) for agg in (per_sample.sum(0), per_sample.mean(0)))


def activation(e: Experiment, top: int = 5) -> tuple[dict | None, str]:
    """Per head the share of samples with lift > 2x, from the samples file; (None, why) where it cannot be
    computed."""
    path = e.samples_path
    if not path.exists():
        return None, f"`{e.rel}`: no samples file (run with --save-samples)"
    try:
        rows = _sample_rows(path)
        scores = np.array([r["scores"] for r in rows], dtype=np.float64)  # (S, L, H)
        if any("baseline" not in r for r in rows):
            return None, (f"`{e.rel}`: its samples file has no per-sample chance baselines (summed_attention "
                          "results of this version carry them), so no per-sample lift")
        base = np.array([r["baseline"] for r in rows], dtype=np.float64)  # (S, L, H)
    except (OSError, UnicodeDecodeError, JSONError, KeyError, TypeError, ValueError) as err:
        return None, f"`{e.rel}`: samples file unreadable ({type(err).__name__})"
    if scores.ndim != 3 or scores.shape[1:] != e.shape or base.shape != scores.shape or len(scores) == 0:
        return None, f"`{e.rel}`: samples file does not match the result's head grid"
    if not (np.isfinite(scores).all() and np.isfinite(base).all() and (base >= 0).all() and (base <= 1).all()
            and _adds_up(scores, e.scores) and _adds_up(base, e.record.get("baseline"))):
        return None, (f"`{e.rel}`: its samples file does not add up to the result's scores and chance baselines "
                      "(another run's, or edited), so no per-sample lift")
    lift = np.divide(scores, base, out=np.zeros_like(scores), where=base > 0)  # (S, L, H)
    active = (lift > LIFT_ACTIVE).mean(axis=0)  # (L, H)
    H = e.shape[1]
    order = np.argsort(-active.ravel(), kind="stable")
    ranked = e.ranked[:top]
    return {"file": e.rel, "samples": int(len(scores)),
            "heads_active_on_any": int((active > 0).sum()), "heads_active_on_half": int((active >= 0.5).sum()),
            "heads": e.shape[0] * H,
            "top_heads": [{"head": h, "share": _r(active[int(h[1:].split("H")[0]), int(h.split("H")[1])])}
                          for h in ranked],
            "most_active": [{"head": f"L{int(k) // H}H{int(k) % H}", "share": _r(active.ravel()[k])}
                            for k in order[:top]]}, ""


def _is_ablation(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("summary"), list) and isinstance(obj.get("ks"), list) \
        and "top" in obj


def ablations(col: Collection) -> tuple[list[dict], list[str]]:
    """The ablation curves among the files the collection skipped (not results)."""
    out, notes = [], []
    for rel in col.skipped:
        try:
            obj = parse_json(read_regular(col.root / rel).decode("utf-8"))
        except (OSError, UnicodeDecodeError, JSONError):
            continue
        if not _is_ablation(obj):
            continue
        try:
            out.append(_curve(rel, obj))
        except (KeyError, TypeError, ValueError, UserError):
            notes.append(f"`{rel}`: an ablation curve of an unexpected shape, not shown")
    return out, notes


def _num(x, lo: float = -math.inf, hi: float = math.inf) -> float:
    """x as a float if it is a real JSON number (not a bool, not a string) in [lo, hi]; else ValueError."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(x)
    return float(x)


def _whole(x, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(x)
    return x


def _text(x, name: str) -> str:
    """A name field: a string that can name a file (no markup, no newline) -- it goes into report.md as is."""
    if not isinstance(x, str):
        raise ValueError(x)
    if x:
        check_name(x, name)
    return x


def _curve(rel: str, obj: dict) -> dict:
    """The curve's rows, each field type- and range-checked (an accuracy in [0, 1], a log-prob <= 0, a p in
    [0, 1], k a whole number >= 0); anything else raises ValueError (or KeyError, TypeError, UserError)."""
    controls = obj.get("controls", ["random"] if obj.get("random") else [])
    if not isinstance(controls, list):
        raise ValueError(controls)
    controls = [c for c in controls if c in ("matched", "random")]
    tests = {}
    for t in obj.get("tests", []):
        if isinstance(t, dict):
            tests[(t["control"], t["metric"], _whole(t["k"]))] = _num(t["p_holm"], 0, 1)
    rows = []
    for s in obj["summary"]:
        row = {"k": _whole(s["k"]), "top_accuracy": _num(s["top_accuracy"], 0, 1),
               "top_logprob": _num(s["top_logprob"], hi=0)}
        for c in controls:
            for m, lo, hi in (("accuracy", 0, 1), ("logprob", -math.inf, 0)):
                mid = s.get(f"{c}_{m}_median", s.get(f"{c}_{m}_mean"))
                if mid is not None:
                    row[f"{c}_{m}"] = [_num(s[f"{c}_{m}_min"], lo, hi), _num(mid, lo, hi),
                                       _num(s[f"{c}_{m}_max"], lo, hi)]
            p = tests.get((c, "logprob", row["k"]))
            if p is not None:
                row[f"{c}_p_holm"] = p
        rows.append(row)
    tokens, samples = obj.get("total_tokens"), obj.get("samples")
    conclusion = obj.get("conclusion", "")
    if not isinstance(conclusion, str) or any(ch in conclusion for ch in "<>\n\r`|"):
        raise ValueError(conclusion)  # the conclusions ablate writes are one line of plain words and numbers
    return {"file": rel, "model": _text(obj.get("model_key", ""), "model_key"),
            "question": _text(obj.get("question", ""), "question"),
            "tokens": None if tokens is None else _whole(tokens, 1),
            "samples": None if samples is None else _whole(samples, 1), "controls": controls,
            "rows": rows, "conclusion": conclusion}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _band(v) -> str:
    return "—" if v is None else f"{v[1]:.3g} [{v[0]:.3g}, {v[2]:.3g}]"


def section(col: Collection, notes: list[str] | None = None) -> tuple[list[Block], dict]:
    """The report section and its numbers; with ``notes``, what was bounded is appended to it."""
    blocks: list[Block] = [Heading("Properties of retrieval heads"), Paragraph(
        "Wu et al. (2024) describe retrieval heads as sparse (few heads), consistent (the same heads across "
        "tasks and lengths), dynamically activated (a head retrieves on some contexts, not all) and causal "
        "(removing them breaks retrieval, removing others does not). Each is measured here on these results.")]
    sparse = sparse_rows(col)
    blocks += [Heading("Sparse", 3), Table(
        ["Method", "Model", "Question", "Length", "Depth", "Heads", "Beating the control",
         "Retrieval score > 0.1"],
        [[r["method"], r["model"], r["question"], str(r["tokens"]), f"{r['depth']:g}", str(r["heads"]),
          "—" if r["beating_control"] is None else f"{r['beating_control']} ({_pct(r['beating_control_share'])})",
          _pct(r["retrieval_score_above_0.1_share"])] for r in sparse],
        align=["l", "l", "l", "r", "r", "r", "r", "r"])]
    bounded: list[str] = []
    pairs, means = consistency(col, bounded)
    if notes is not None:
        notes += bounded
    blocks.append(Heading("Consistent", 3))
    if means:
        blocks.append(Paragraph("Pairs of results of one model and method that differ in exactly one of task, "
                                "length, needle depth or span: overlap of their top-10 heads (Jaccard) and "
                                "Spearman correlation of all heads' scores."
                                + (f" Above {ALL_PAIRS_UP_TO} results alike in all else, neighbouring ones only "
                                   "(see Notes)." if bounded else "")))
        blocks.append(Table(["Differs in", "Pairs", "Top-10 Jaccard, mean", "Spearman, mean"],
                            [[m["dimension"], str(m["pairs"]), f"{m['jaccard_10_mean']:.2f}",
                              "—" if m["spearman_mean"] is None else f"{m['spearman_mean']:.2f}"] for m in means],
                            align=["l", "r", "r", "r"]))
    else:
        blocks.append(Paragraph("No two results of one model and method differ in exactly one of task, length, "
                                "depth or span."))
    acts, missing = [], []
    for e in col.experiments:
        a, why = activation(e)
        (acts.append(a) if a else missing.append(why))
    blocks.append(Heading("Dynamically activated", 3))
    if acts:
        blocks.append(Paragraph(f"Per head, the share of samples on which its lift exceeds {LIFT_ACTIVE:g}x; for "
                                "the result's top 5 heads and the 5 most often active."))
        blocks.append(Table(["Result", "Samples", "Active on any sample", "On at least half", "Top 5 heads",
                             "Most often active"],
                            [[f"`{a['file']}`", str(a["samples"]), f"{a['heads_active_on_any']}/{a['heads']}",
                              f"{a['heads_active_on_half']}/{a['heads']}",
                              ", ".join(f"{h['head']} {_pct(h['share'])}" for h in a["top_heads"]),
                              ", ".join(f"{h['head']} {_pct(h['share'])}" for h in a["most_active"])]
                             for a in acts], align=["l", "r", "r", "r", "l", "l"]))
    else:
        blocks.append(Paragraph("No result here has per-sample scores with per-sample chance baselines."))
    if missing:
        blocks.append(Bullets(missing))
    curves, notes = ablations(col)
    blocks.append(Heading("Causal", 3))
    if not curves:
        blocks.append(Paragraph("No ablation curve (`retrieval-heads ablate RESULT`, written as "
                                "`RESULT.ablation.json`) lies among these files."))
    for c in curves:
        heads = ["k", "Accuracy, top-k removed", "Gold log-prob, top-k removed"]
        for ctl in c["controls"]:
            name = "layer-matched" if ctl == "matched" else "unmatched random"
            heads += [f"Accuracy, {name}: median [min, max]", f"Gold log-prob, {name}: median [min, max]",
                      f"p (Holm), top-k < {name}"]
        body = []
        for r in c["rows"]:
            row = [str(r["k"]), f"{r['top_accuracy']:.3g}", f"{r['top_logprob']:.3g}"]
            for ctl in c["controls"]:
                p = r.get(f"{ctl}_p_holm")
                row += [_band(r.get(f"{ctl}_accuracy")), _band(r.get(f"{ctl}_logprob")),
                        "—" if p is None else f"{p:.2g}"]
            body.append(row)
        blocks.append(Table(heads, body, caption=f"`{c['file']}`: {c['model']} · {c['question']} · {c['tokens']} "
                                                 f"tokens, {c['samples']} samples", inline=True))
        if c["conclusion"]:
            blocks.append(Paragraph(f"Conclusion: {c['conclusion']}"))
    if notes:
        blocks.append(Bullets(notes))
    data = {"sparse": sparse, "consistent": {"pairs": pairs, "by_dimension": means},
            "dynamic": {"results": acts, "missing": missing}, "causal": curves}
    return blocks, data

