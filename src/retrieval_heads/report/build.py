"""Assemble the report: collect results, compute every number and figure in memory, then write.

Nothing is written until everything is computed, so bad input leaves no partial report. Output folder:

- ``report.html``: one self-contained page (figures as data URIs; opens offline);
- ``report.md``: the same content in Markdown, figures linked from ``figures/``;
- ``report.json``: every number of the report (no timestamps: same results, same JSON);
- ``figures/grid.png`` and ``figures/{method}/{model}_{question}_{tokens}.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from . import figures, html, markdown, stability, tables
from .collect import Collection, collect, load_sample_scores
from .document import Block, Bullets, Figure, Heading, Paragraph, Table

TITLE = "Retrieval heads report"


@dataclass
class Report:
    blocks: list[Block]
    data: dict
    collection: Collection

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


def _join(items) -> str:
    return ", ".join(f"`{x}`" for x in items)


def _summary(col: Collection) -> list[Block]:
    exps = col.experiments
    lengths = sorted({e.tokens for e in exps})
    text = (f"{len(exps)} result(s) from `{col.root}`: method(s) {_join(col.methods)}; "
            f"model(s) {_join(sorted({e.model for e in exps}))}; "
            f"question(s) {_join(dict.fromkeys(e.question for e in exps))}; "
            f"lengths {', '.join(str(t) for t in lengths)} tokens.")
    return [Paragraph(text)]


def _retrieve(col: Collection) -> tuple[list[Block], list[dict]]:
    """First section: does the model retrieve at all? Accuracy, top lift and the heads beating the control."""
    blocks: list[Block] = [Heading("Does the model retrieve?")]
    rows = [tables.retrieval_row(e) for e in col.experiments if e.lift is not None]
    if not rows:
        blocks.append(Paragraph("No result here carries chance baselines (`lift`, `significance`): they come "
                                "with `summed_attention` results of this version; run `detect` or `sweep` again."))
        return blocks, rows
    blocks.append(Paragraph(
        "Per experiment: the model's accuracy (when answers were decoded: `--answers`), the highest lift (score "
        "over the score of a head spreading its attention evenly over the keys it can see; 1.0x = chance), and "
        "the heads whose per-sample lift on the span beats that on a control span of haystack text, one-sided "
        "Wilcoxon signed-rank test over samples, Benjamini-Hochberg over all heads, at the result's alpha."))
    blocks.append(tables.retrieval_table(rows))
    return blocks, rows


def _top_heads(col: Collection) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading("Top head per configuration")]
    data: dict = {}
    for method in col.methods:
        mine = [e for e in col.experiments if e.method == method]
        if len(col.methods) > 1:
            blocks.append(Heading(method, 3))
        blocks.append(tables.top_head_table(mine))
        for e in mine:
            top = e.record["head_rankings"][0]
            data.setdefault(method, {}).setdefault(e.model, {}).setdefault(e.question, {})[str(e.tokens)] = {
                "head": top["head"], "score": top["score"],
                **({"lift": top["lift"]} if "lift" in top else {})}
    return blocks, data


def _movement(col: Collection) -> tuple[list[Block], dict]:
    counts = stability.top1_counts(col.experiments)
    moves = stability.movement(col.experiments)
    blocks: list[Block] = [
        Heading("How the top heads move across lengths"),
        Paragraph("How often each head ranks first, then, for each model and question, the rank of every "
                  "length's top 5 heads at every length (1 = best)."),
    ]
    blocks += [tables.top1_table(c) for c in counts]
    if moves:
        blocks += [tables.movement_table(g) for g in moves]
    else:
        blocks.append(Paragraph("Only one length per model and question: no movement to show."))
    return blocks, {"top1_counts": counts, "movement": moves}


def _stability(col: Collection) -> tuple[list[Block], dict, list[str]]:
    exps = col.experiments
    by_len = stability.length_pairs(exps)
    by_model, skip_m = stability.model_pairs(exps)
    by_method, skip_x = stability.method_pairs(exps)
    blocks: list[Block] = [
        Heading("Rank stability"),
        Paragraph("Spearman and Kendall (tau-b) correlation of the full head rankings (all heads' scores), and "
                  "the Jaccard overlap of the top-10 and top-50 head sets."),
        Heading("Between lengths", 3),
    ]
    tl = tables.tokens_label
    blocks.append(tables.pairs_table(by_len, ["Method", "Model", "Question"], "Length A", "Length B", tl)
                  if by_len else Paragraph("No model and question has results at two lengths."))
    blocks.append(Heading("Between models", 3))
    blocks.append(tables.pairs_table([{**r, "group": [r["group"][0], r["group"][1], tl(r["group"][2])]}
                                      for r in by_model], ["Method", "Question", "Length"], "Model A", "Model B")
                  if by_model else Paragraph("No question and length has results of two models with the same "
                                             "head grid."))
    blocks.append(Heading("Between methods", 3))
    blocks.append(tables.pairs_table([{**r, "group": [r["group"][0], r["group"][1], tl(r["group"][2])]}
                                      for r in by_method], ["Model", "Question", "Length"], "Method A", "Method B")
                  if by_method else Paragraph("No experiment has results of two methods."))
    data = {"length_pairs": by_len, "model_pairs": by_model, "method_pairs": by_method}
    return blocks, data, skip_m + skip_x


def _bootstrap(col: Collection, resamples: int, seed: int, top: int) -> tuple[list[Block], dict, list[str]]:
    blocks: list[Block] = [
        Heading("Bootstrap intervals of the top heads' ranks"),
        Paragraph(f"The samples of each experiment are resampled with replacement ({resamples} resamples, "
                  f"seed {seed}) and the heads re-ranked by their summed score; for the result's top {top} "
                  "heads: the median rank, the 2.5-97.5 percentile interval, and how often the head ranks first."),
    ]
    entries, notes = [], []
    for e in col.experiments:
        per_sample, why = load_sample_scores(e)
        ident = {"method": e.method, "model": e.model, "question": e.question, "tokens": e.tokens}
        if per_sample is None:
            entries.append({**ident, "skipped": why})
            notes.append(f"{e.method} · {e.title}: bootstrap skipped, {why}.")
            continue
        rows = stability.rank_intervals(e, per_sample, top, resamples, seed)
        entries.append({**ident, "samples": int(per_sample.shape[0]), "heads": rows})
        blocks.append(tables.bootstrap_table(e, rows))
    if not any("heads" in x for x in entries):
        blocks.append(Paragraph("Skipped: no result has per-sample scores beside it (`.samples.jsonl`; run "
                                "`detect` or `sweep` with `--save-samples`)."))
        notes = []
    elif notes:
        blocks.append(Paragraph(f"Skipped for {len(notes)} result(s) without usable per-sample scores; see Notes."))
    return blocks, {"resamples": resamples, "seed": seed, "top": top, "experiments": entries}, notes


def _overview(col: Collection) -> list[Block]:
    return [
        Heading("Heatmaps"),
        Paragraph("Score of every head, layers down and heads across, the top head boxed in red; one heatmap per "
                  "experiment, with its colour scale, is at the end."),
        Figure("figures/grid.png", figures.grid(col.experiments), "All experiments (colours scaled per panel)"),
    ]


def _figures(col: Collection) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [
        Heading("Heatmap per experiment"),
        Paragraph("The top 5 heads are numbered, the top head is boxed in red."),
    ]
    paths = []
    for e in col.experiments:
        path = f"figures/{e.method}/{e.slug}.png"
        blocks.append(Figure(path, figures.heatmap(e), f"{e.method} · {e.title}", width=460))
        paths.append(path)
    return blocks, paths


def default_out(results_dir: str | Path, out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path(results_dir) / "report"


def build(results_dir: str | Path, out_dir: str | Path | None = None, resamples: int = 1000, seed: int = 0,
          top: int = 20) -> Report:
    """Everything of the report, in memory; ``out_dir`` (default RESULTS_DIR/report) is not read."""
    col = collect(results_dir, exclude=default_out(results_dir, out_dir))
    blocks = _summary(col)
    b_ret, d_ret = _retrieve(col)
    b_top, d_top = _top_heads(col)
    b_move, d_move = _movement(col)
    b_stab, d_stab, n_stab = _stability(col)
    b_boot, d_boot, n_boot = _bootstrap(col, resamples, seed, top)
    b_fig, paths = _figures(col)
    notes = n_stab + n_boot + [f"Not a result, skipped: `{p}`" for p in col.skipped]
    blocks += b_ret + b_top + _overview(col) + b_move + b_stab + b_boot + b_fig
    blocks += [Heading("Results read"), Table(
        ["Method", "Model", "Question", "Tokens", "Samples", "Top head", "File"],
        [[e.method, e.model, e.question, str(e.tokens), str(e.record["samples_processed"]), tables.top_head_cell(e),
          f"`{e.rel}`"] for e in col.experiments],
        align=["l", "l", "l", "r", "r", "l", "l"])]
    if notes:
        blocks += [Heading("Notes"), Bullets(notes)]
    data = {
        "results_dir": str(results_dir),
        "experiments": [{"method": e.method, "model": e.model, "question": e.question, "tokens": e.tokens,
                         "samples_processed": e.record["samples_processed"], "file": e.rel,
                         "top_head": e.record["head_rankings"][0]["head"],
                         "top_score": e.record["head_rankings"][0]["score"], "figure": p}
                        for e, p in zip(col.experiments, paths)],
        "retrieval": d_ret, "top_head_table": d_top, **d_move, **d_stab, "bootstrap": d_boot, "notes": notes,
    }
    return Report(blocks, data, col)


def write(report: Report, out_dir: str | Path) -> list[Path]:
    """Figures first, then report.json, report.md, and report.html last; each atomic."""
    out = Path(out_dir)
    md, page = markdown.render(TITLE, report.blocks), html.render(TITLE, report.blocks)
    written = []
    for f in report.figures:
        atomic_write_bytes(out / f.path, f.png)
        written.append(out / f.path)
    atomic_write_json(out / "report.json", report.data)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", page)
    return written + [out / "report.json", out / "report.md", out / "report.html"]


def make_report(results_dir: str | Path, out_dir: str | Path | None = None, resamples: int = 1000, seed: int = 0,
                top: int = 20) -> tuple[Report, Path]:
    """Build and write the report; returns it and its folder (default ``RESULTS_DIR/report``)."""
    out = default_out(results_dir, out_dir)
    report = build(results_dir, out, resamples, seed, top)
    write(report, out)
    return report, out
