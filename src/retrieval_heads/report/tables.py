"""The report's tables, as :class:`~retrieval_heads.report.document.Table` blocks.

The first is the original study's "Top Head per Configuration": a row per model x question, a column per length,
cells ``L16H1 (117.8)`` (top head, its score to 3 significant digits and at least one decimal), ``—`` where no result exists.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ..errors import UserError
from ..results import parse_head
from .collect import Experiment, question_order
from .document import Table

MISSING = "—"


def tokens_label(t: int | str) -> str:
    """2048 -> "2K" as in the original table; lengths that are not whole K stay as numbers."""
    t = int(t)
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def num(x: float | None, digits: int = 3) -> str:
    return MISSING if x is None else f"{x:.{digits}f}"


def score_text(x: float, digits: int = 3) -> str:
    """A score with the precision its size needs: ``digits`` significant digits, at least one decimal
    (117.84 -> "117.8" as in the original table, 3.254 -> "3.25", 0.6213 -> "0.621", 0.00123 -> "0.00123")."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return f"{x:.1f}"
    decimals = max(1, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def top_head_cell(e: Experiment) -> str:
    """``L16H1 (117.8)``, as in the original table; ``L16H1 (117.8, 8.1x)`` with the head's lift where the
    result has one."""
    top = e.record["head_rankings"][0]
    lift = e.lift
    if lift is None:
        return f"{top['head']} ({score_text(top['score'])})"
    layer, head = parse_head(top["head"])
    return f"{top['head']} ({score_text(top['score'])}, {lift[layer, head]:.1f}x)"


def top_head_table(exps: list[Experiment]) -> Table:
    """The "Top Head per Configuration" table for the experiments of one method."""
    lengths = sorted({e.tokens for e in exps})
    cells: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    order: dict[str, tuple] = {}
    for e in exps:  # a row per model x question x needle depth ("inc_state @0.25" away from the default 0.5)
        cells[(e.model, e.question_label)][e.tokens] = top_head_cell(e)
        order[e.question_label] = (question_order(e.question), e.depth)
    rows, last_model = [], None
    for model, question in sorted(cells, key=lambda k: (k[0], order[k[1]])):
        shown = f"**{model}**" if model != last_model else ""
        last_model = model
        rows.append([shown, question] + [cells[(model, question)].get(t, MISSING) for t in lengths])
    return Table(["Model", "Question"] + [tokens_label(t) for t in lengths], rows,
                 align=["l", "l"] + ["l"] * len(lengths))


def top1_table(entry: dict) -> Table:
    """How often each head is the top head, per length, for one method."""
    lengths = list(entry["experiments_by_tokens"])
    rows = [[r["head"]] + [f"{r['by_tokens'][t]}/{entry['experiments_by_tokens'][t]}" if r["by_tokens"][t]
                          else "" for t in lengths] + [f"{r['total']}/{entry['experiments']}"]
            for r in entry["heads"]]
    return Table(["Head"] + [tokens_label(t) for t in lengths] + ["all"], rows,
                 caption=f"{entry['method']}: experiments in which the head ranks first", inline=True)


def movement_table(group: dict) -> Table:
    """Rank of each length's top heads at every length of one (method, model, question); **bold** = in the top."""
    lengths = [str(t) for t in group["tokens"]]
    rows = []
    for r in group["heads"]:
        cells = []
        for t in lengths:
            rank = r["ranks"][t]
            cells.append(f"**{rank}**" if rank <= group["top"] else str(rank))
        rows.append([r["head"]] + cells)
    return Table(["Head"] + [tokens_label(t) for t in lengths], rows,
                 caption=f"{group['method']} · {group['model']} · {group.get('question_label', group['question'])}: "
                         f"rank at each length "
                         f"(bold: top {group['top']})", inline=True)


def pairs_table(rows: list[dict], group_names: list[str], a: str, b: str, label=str) -> Table:
    """Spearman, Kendall and top-k Jaccard for each compared pair."""
    body = [[str(g) for g in r["group"]] + [label(r["a"]), label(r["b"]), num(r["spearman"]), num(r["kendall"]),
                                            num(r["jaccard_10"]), num(r["jaccard_50"])] for r in rows]
    return Table(group_names + [a, b, "Spearman", "Kendall", "Jaccard@10", "Jaccard@50"], body,
                 align=["l"] * (len(group_names) + 2) + ["r"] * 4)


def bootstrap_table(exp: Experiment, rows: list[dict]) -> Table:
    lift = exp.lift
    body = [[str(r["rank"]), r["head"], score_text(r["score"]), f"{r['median']:g}", f"{r['lo']:g} – {r['hi']:g}",
             f"{r['share_first']:.1%}"] for r in rows]
    headers, align = ["Rank", "Head", "Score", "Median rank", "95% interval", "Ranked first"], ["r", "l", "r", "r", "r", "r"]
    if lift is not None:  # the lift goes next to the score
        for row, r in zip(body, rows):
            layer, head = parse_head(r["head"])
            row.insert(3, f"{lift[layer, head]:.2f}x")
        headers.insert(3, "Lift")
        align.insert(3, "r")
    return Table(headers, body, align=align,
                 caption=f"{exp.method} · {exp.title}, {exp.record['samples_processed']} samples", inline=True)


def retrieval_row(e: Experiment) -> dict:
    """What "Does the model retrieve?" shows of one result: accuracy, top lift, significant heads."""
    extra = e.record.get("extra") if isinstance(e.record.get("extra"), dict) else {}
    sig = e.record.get("significance") if isinstance(e.record.get("significance"), dict) else {}
    lift = e.lift
    row = {"method": e.method, "model": e.model, "question": e.question, "depth": e.depth, "tokens": e.tokens,
           "samples": e.record["samples_processed"], "n_correct": _count(e, extra, "n_correct"),
           "n_answered": _count(e, extra, "n_answered"), "top_lift": None, "top_lift_head": None,
           "significant": [], "alpha": sig.get("alpha"), "note": str(sig.get("note", "")),
           "tested": _sample_count(sig.get("samples")), "left_out": _sample_count(sig.get("samples_left_out")),
           "verdict": str(e.record.get("verdict", ""))}
    if lift is not None:
        k = int(np.argmax(lift.reshape(-1)))
        row["top_lift"], row["top_lift_head"] = round(float(lift.reshape(-1)[k]), 4), f"L{k // lift.shape[1]}H{k % lift.shape[1]}"
    heads = sig.get("heads")
    if isinstance(heads, list):
        row["significant"] = [_head(e, h.get("head")) for h in heads if isinstance(h, dict)]
    return row


def _count(e: Experiment, extra: dict, key: str) -> int | None:
    """``extra[key]`` (absent: None) if a whole number >= 0; UserError naming the file otherwise: it goes into
    report.md as it is, where text (HTML) would be rendered."""
    n = extra.get(key)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise UserError(f"{e.path}: extra.{key} is not a whole number >= 0 ({str(n)[:40]})")
    return n


def _head(e: Experiment, name) -> str:
    """A head name of ``significance`` if it names a head of the result's grid; UserError naming the file."""
    try:
        layer, head = parse_head(name) if isinstance(name, str) else (-1, -1)
    except (UserError, ValueError):
        layer, head = -1, -1
    if not (0 <= layer < e.shape[0] and 0 <= head < e.shape[1]):
        raise UserError(f"{e.path}: significance names {str(name)[:40]!r}, not a head of its "
                        f"{e.shape[0]}x{e.shape[1]} grid")
    return name


def _sample_count(x) -> int | None:
    """A sample count from a result's significance block (an int >= 0), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def no_heads_reason(r: dict) -> str:
    """Why no head beats the control, in the result's own terms (a row of :func:`retrieval_row`).

    >>> no_heads_reason({"tested": 0, "left_out": 8, "note": "too few samples: ...", "alpha": 0.05})
    'none (no test: no sample has both the span and a control span; 8 left out)'
    >>> no_heads_reason({"tested": 4, "left_out": 0, "note": "too few samples: ...", "alpha": 0.05})
    'none (too few samples: 4 tested, alpha 0.05 needs at least 5)'
    >>> no_heads_reason({"tested": 12, "left_out": 4, "note": "no head beats ...", "alpha": 0.05})
    'none (4 sample(s) without a span or control span left out)'
    """
    tested, left, note = r.get("tested"), r.get("left_out"), r.get("note", "")
    if tested == 0 and left:
        return f"none (no test: no sample has both the span and a control span; {left} left out)"
    if note.startswith("too few samples"):
        alpha = r.get("alpha")
        if tested is not None and isinstance(alpha, (int, float)) and 0 < alpha < 1:
            need = max(1, math.ceil(-math.log2(alpha)))
            return f"none (too few samples: {tested} tested, alpha {alpha:g} needs at least {need})"
        return "none (too few samples)"
    if left:
        return f"none ({left} sample(s) without a span or control span left out)"
    return "none"


def retrieval_table(rows: list[dict]) -> Table:
    """One row per experiment with chance fields: accuracy, top lift, the heads beating the control."""
    def acc(r):
        return f"{r['n_correct']}/{r['n_answered']}" if r["n_correct"] is not None and r["n_answered"] else MISSING

    def sig(r):
        if r["significant"]:
            shown = ", ".join(r["significant"][:5])
            more = f" (+{len(r['significant']) - 5} more)" if len(r["significant"]) > 5 else ""
            return f"{len(r['significant'])}: {shown}{more}"
        return no_heads_reason(r)

    body = [[r["method"], r["model"], r["question"] + ("" if r.get("depth", 0.5) == 0.5 else f" @{r['depth']:g}"),
             tokens_label(r["tokens"]), str(r["samples"]), acc(r),
             MISSING if r["top_lift"] is None else f"{r['top_lift']:.1f}x ({r['top_lift_head']})", sig(r)]
            for r in rows]
    return Table(["Method", "Model", "Question", "Length", "Samples", "Accuracy", "Top lift", "Heads beating the control"],
                 body, align=["l", "l", "l", "r", "r", "r", "l", "l"])
