"""The report's needle-in-a-haystack view: for each method, model and question, a needle depth x length grid
of the model's accuracy and, beside it, of the top head's lift over chance (the head named in each cell),
and whether the head rankings stay the same across depths.

Only methods whose results carry chance baselines (``lift``: ``summed_attention`` and its spans) are drawn.
Accuracy comes from a result's ``extra.accuracy`` (there when answers were decoded, ``detect --answers``);
where no cell of a grid has one, the grid says so instead of drawing a blank. The rank agreement across
depths is :func:`~retrieval_heads.report.stability.depth_pairs` (the same measures as across lengths).
"""

from __future__ import annotations

import math
from collections import defaultdict

from ..errors import UserError
from ..results import parse_head
from . import figures, stability
from .collect import Collection, Experiment, question_order
from .document import Block, Figure, Heading, Paragraph, Table
from .tables import MISSING, num, tokens_label

NO_ANSWERS = "no answers recorded"


def accuracy_of(e: Experiment) -> tuple[float, int | None, int | None] | None:
    """(accuracy, n_correct, n_answered) of a result that recorded answers, else None. UserError naming the
    file for an accuracy that is not a number in [0, 1] (a hostile or damaged file)."""
    extra = e.record.get("extra")
    if not isinstance(extra, dict) or "accuracy" not in extra:
        return None
    acc = extra["accuracy"]
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc) or not 0 <= acc <= 1:
        raise UserError(f"{e.path}: extra.accuracy is not a number in [0, 1] ({str(acc)[:40]})")
    counts = [extra.get(k) if isinstance(extra.get(k), int) and not isinstance(extra.get(k), bool) else None
              for k in ("n_correct", "n_answered")]
    return float(acc), counts[0], counts[1]


def grids(col: Collection) -> list[dict]:
    """One entry per (method, model, question) of the results with a lift grid: ``depths`` (ascending) x
    ``tokens`` (ascending) grids of ``accuracy`` (None where no answers or no result), ``n_correct``,
    ``n_answered``, ``top_head`` (the result's first-ranked head), ``top_lift`` and ``top_score`` (None where
    no result); ``answers_recorded``; ``same_top_head`` per length (whether every depth there has the same top
    head; None with fewer than two depths); and ``depth_pairs`` (rank agreement between depths)."""
    groups: dict[tuple, list[Experiment]] = defaultdict(list)
    for e in col.experiments:
        if e.lift is not None:
            groups[(e.method, e.model, e.question)].append(e)
    pairs = stability.depth_pairs([e for members in groups.values() for e in members])
    out = []
    for (method, model, question), members in sorted(groups.items(),
                                                     key=lambda kv: (kv[0][0], kv[0][1], question_order(kv[0][2]))):
        depths = sorted({e.depth for e in members})
        lengths = sorted({e.tokens for e in members})
        at = {(e.depth, e.tokens): e for e in members}

        def cell(fn):
            return [[fn(at[(d, t)]) if (d, t) in at else None for t in lengths] for d in depths]

        accs = cell(accuracy_of)
        top = cell(lambda e: e.record["head_rankings"][0])

        def lift_of(e: Experiment) -> float:
            layer, head = parse_head(e.record["head_rankings"][0]["head"])
            return round(float(e.lift[layer, head]), 4)

        same = {}
        for j, t in enumerate(lengths):
            heads = [row[j]["head"] for row in top if row[j] is not None]
            same[str(t)] = (len(set(heads)) == 1) if len(heads) >= 2 else None
        out.append({
            "method": method, "model": model, "question": question, "depths": depths, "tokens": lengths,
            "answers_recorded": any(a is not None for row in accs for a in row),
            "accuracy": [[None if a is None else a[0] for a in row] for row in accs],
            "n_correct": [[None if a is None else a[1] for a in row] for row in accs],
            "n_answered": [[None if a is None else a[2] for a in row] for row in accs],
            "top_head": [[None if x is None else x["head"] for x in row] for row in top],
            "top_score": [[None if x is None else x["score"] for x in row] for row in top],
            "top_lift": cell(lift_of),
            "same_top_head": same,
            "depth_pairs": [p for p in pairs if p["group"][:3] == [method, model, question]],
        })
    return out


def _accuracy_table(g: dict) -> Table:
    def text(i: int, j: int) -> str:
        acc, n, of = g["accuracy"][i][j], g["n_correct"][i][j], g["n_answered"][i][j]
        if acc is None:
            return MISSING
        return f"{acc:.2f} ({n}/{of})" if n is not None and of else f"{acc:.2f}"

    rows = [[f"{d:g}"] + [text(i, j) for j in range(len(g["tokens"]))] for i, d in enumerate(g["depths"])]
    return Table(["Depth"] + [tokens_label(t) for t in g["tokens"]], rows, inline=True,
                 caption=f"{g['method']} · {g['model']} · {g['question']}: accuracy")


def _lift_table(g: dict) -> Table:
    def text(i: int, j: int) -> str:
        head, lift = g["top_head"][i][j], g["top_lift"][i][j]
        return MISSING if head is None else f"{head} {lift:.1f}x"

    rows = [[f"{d:g}"] + [text(i, j) for j in range(len(g["tokens"]))] for i, d in enumerate(g["depths"])]
    return Table(["Depth"] + [tokens_label(t) for t in g["tokens"]], rows, inline=True,
                 caption=f"{g['method']} · {g['model']} · {g['question']}: top head and its lift over chance")


def figure_path(g: dict) -> str:
    """``figures/depth/METHOD/MODEL_QUESTION.png``; the names were checked when their results were read."""
    return f"figures/depth/{g['method']}/{g['model']}_{g['question']}.png"


def section(col: Collection) -> tuple[list[Block], dict]:
    """The "Needle depth x length" section and its numbers (``report.json``'s ``depth_grid``)."""
    blocks: list[Block] = [Heading("Needle depth x length")]
    gs = grids(col)
    if not gs:
        blocks.append(Paragraph("No result here carries chance baselines (`lift`), so there is no depth x length "
                                "grid of the top head's lift; run `detect` or `sweep` with `summed_attention`."))
        return blocks, {"grids": []}
    blocks.append(Paragraph(
        "The needle-in-a-haystack picture: needle depth down (0 = the start of the haystack), prompt length "
        "across. Left, the model's accuracy where answers were decoded (`detect --answers`); right, the lift over "
        "chance of each result's top head, named in its cell. Sweep several depths with `sweep --needle-positions "
        "0.1 0.3 0.5 0.7 0.9`."))
    for g in gs:
        if len(col.methods) > 1 or len({x["model"] for x in gs}) > 1 or len(gs) > 1:
            blocks.append(Heading(f"{g['model']} · {g['question']} · {g['method']}", 3))
        caption = f"{g['method']} · {g['model']} · {g['question']}: " + (
            "accuracy and top head's lift by depth and length" if g["answers_recorded"]
            else f"top head's lift by depth and length ({NO_ANSWERS})")
        blocks.append(Figure(figure_path(g), figures.depth_grid(g), caption))
        if g["answers_recorded"]:
            blocks.append(_accuracy_table(g))
        else:
            blocks.append(Paragraph(f"Accuracy: {NO_ANSWERS} (decode answers with `detect --answers` or `sweep --answers`)."))
        blocks.append(_lift_table(g))
        blocks.append(_stability_text(g))
    pairs = [p for g in gs for p in g["depth_pairs"]]
    if pairs:
        blocks.append(Paragraph("Rank agreement of the full head rankings between depths, per length: Spearman and "
                                "Kendall (tau-b) correlation, Jaccard overlap of the top-10 and top-50 heads."))
        blocks.append(_pairs_table(pairs))
    return blocks, {"grids": gs}


def _stability_text(g: dict) -> Paragraph:
    if len(g["depths"]) < 2:
        return Paragraph(f"One depth ({g['depths'][0]:g}) only: nothing to compare across depths.")
    same = [tokens_label(t) for t in g["tokens"] if g["same_top_head"][str(t)]]
    differ = [tokens_label(t) for t in g["tokens"] if g["same_top_head"][str(t)] is False]
    rhos = [p["spearman"] for p in g["depth_pairs"] if p["spearman"] is not None]
    parts = []
    if same:
        parts.append(f"the top head is the same at every depth at {', '.join(same)}")
    if differ:
        parts.append(f"it changes with depth at {', '.join(differ)}")
    if rhos:
        parts.append(f"Spearman between depths {min(rhos):.2f} to {max(rhos):.2f} (mean {sum(rhos) / len(rhos):.2f})")
    return Paragraph("Across depths: " + ("; ".join(parts) or "no length has results at two depths") + ".")


def _pairs_table(pairs: list[dict]) -> Table:
    body = [[p["group"][0], p["group"][1], p["group"][2], tokens_label(p["group"][3]), f"{p['a']:g}", f"{p['b']:g}",
             num(p["spearman"]), num(p["kendall"]), num(p["jaccard_10"]), num(p["jaccard_50"])] for p in pairs]
    return Table(["Method", "Model", "Question", "Length", "Depth A", "Depth B", "Spearman", "Kendall",
                  "Jaccard@10", "Jaccard@50"], body, align=["l"] * 4 + ["r"] * 6)
