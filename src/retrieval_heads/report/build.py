"""Assemble the report: collect results, compute every number and figure in memory, then write.

Nothing is written until everything is computed, so bad input leaves no partial report; the files are then
written into a temp folder beside the output folder, which is renamed into place when complete. Output folder:

- ``report.html``: one self-contained page (figures as data URIs; opens offline);
- ``report.md``: the same content in Markdown, figures linked from ``figures/``;
- ``report.json``: every number of the report (no timestamps: same results, same JSON);
- ``figures/grid.png``, ``figures/{method}/{model}_{question}_{tokens}.png`` (``..._d{depth}.png`` at a needle
  depth other than 0.5) and ``figures/depth/{method}/{model}_{question}.png`` (the depth x length grids).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_bytes, given_path, json_bytes
from ..results import check_name, file_name
from . import depth, explorer, figures, html, markdown, properties, stability, tables
from .collect import Collection, collect, load_sample_scores
from .document import Block, Bullets, Figure, Heading, Paragraph, Raw, Table
from .heatmaps import Heatmaps

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
            data.setdefault(method, {}).setdefault(e.model, {}).setdefault(e.question_label, {})[str(e.tokens)] = {
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
    bounded: list[str] = []  # groups of more than 12 lengths: neighbouring lengths compared only
    by_len = stability.length_pairs(exps, bounded)
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
    return blocks, data, skip_m + skip_x + bounded


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
        ident = {"method": e.method, "model": e.model, "question": e.question, "tokens": e.tokens, "depth": e.depth}
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


def _overview(col: Collection) -> tuple[list[Block], list[str]]:
    regions: list = []
    png = figures.grid(col.experiments, regions)
    rows, lengths, n_rows, n_lengths = figures.grid_layout(col.experiments)
    caption, notes = "All experiments (colours scaled per panel)", []
    if (len(rows), len(lengths)) != (n_rows, n_lengths):
        shown = " and ".join(f"{k} of {n} {what}" for k, n, what in ((len(rows), n_rows, "rows"),
                                                                     (len(lengths), n_lengths, "lengths")) if k < n)
        caption = f"Experiments at {shown} (colours scaled per panel)"
        notes.append(f"`figures/grid.png` shows {shown} (at most {figures.GRID_ROWS} rows, the first, and "
                     f"{figures.GRID_LENGTHS} lengths, evenly spaced, the shortest and the longest included); every "
                     "experiment has its own heatmap at the end.")
    return [
        Heading("Heatmaps"),
        Paragraph("Score of every head, layers down and heads across, the top head boxed in red; one heatmap per "
                  "experiment, with its colour scale, is at the end."),
        Figure("figures/grid.png", png, caption, regions=regions),
    ], notes


def _explorer(col: Collection) -> tuple[list[Block], Raw, dict, list[str]]:
    """The explorer's section (near the top) and its panel, data and script (at the end of the page)."""
    data, summary, notes = explorer.payload(col)
    n_saved = sum(1 for e in data["experiments"] if "saved" in e)
    blocks: list[Block] = [Heading("Where the heads look"),
                           Raw(explorer.intro_html(n_saved, len(col.experiments)),
                               "The attention explorer is in `report.html` (open it in a browser).")]
    return blocks, Raw(explorer.panel_html(data)), {"experiments": summary}, notes


def figure_path(e) -> str:
    """``figures/METHOD/MODEL_QUESTION_TOKENS.png`` (``..._dDEPTH.png`` away from depth 0.5, as the result's
    own name), relative to the report folder; the names come from the result's fields, so they are checked
    (``results.check_name``): never a path out of the folder."""
    name = file_name(e.model, e.question, int(e.tokens), e.depth).removesuffix(".json")
    return f"figures/{check_name(e.method, 'method')}/{name}.png"


def _figures(col: Collection) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = [
        Heading("Heatmap per experiment"),
        Paragraph("The top 5 heads are numbered, the top head is boxed in red."),
    ]
    paths = []
    drawer = Heatmaps()  # one figure per head grid, its fixed parts drawn once: figures.heatmap's bytes
    for i, e in enumerate(col.experiments):
        path = figure_path(e)
        regions: list = []
        png = drawer.png(e, regions=regions)
        blocks.append(Figure(path, png, f"{e.method} · {e.title}", width=460,
                             regions=[dict(r, exp=i) for r in regions]))
        paths.append(path)
    return blocks, paths


def default_out(results_dir: str | Path, out_dir: str | Path | None) -> Path:
    return given_path(out_dir, "--out") if out_dir is not None else Path(results_dir) / "report"


def build(results_dir: str | Path, out_dir: str | Path | None = None, resamples: int = 1000, seed: int = 0,
          top: int = 20) -> Report:
    """Everything of the report, in memory; ``out_dir`` (default RESULTS_DIR/report) is not read."""
    col = collect(results_dir, exclude=default_out(results_dir, out_dir))
    blocks = _summary(col)
    b_ret, d_ret = _retrieve(col)
    b_depth, d_depth = depth.section(col)
    b_top, d_top = _top_heads(col)
    b_move, d_move = _movement(col)
    b_stab, d_stab, n_stab = _stability(col)
    b_boot, d_boot, n_boot = _bootstrap(col, resamples, seed, top)
    n_prop: list[str] = []  # groups of more than 12 results: neighbouring ones compared only
    b_prop, d_prop = properties.section(col, n_prop)
    b_fig, paths = _figures(col)
    b_exp, panel, d_exp, n_exp = _explorer(col)
    b_over, n_over = _overview(col)
    notes = n_over + n_stab + n_prop + n_boot + n_exp + [f"Not a result, skipped: `{p}`" for p in col.skipped]
    blocks += b_ret + b_depth + b_top + b_over + b_exp + b_move + b_stab + b_prop + b_boot + b_fig
    blocks += [Heading("Results read"), Table(
        ["Method", "Model", "Question", "Tokens", "Samples", "Top head", "File"],
        [[e.method, e.model, e.question, str(e.tokens), str(e.record["samples_processed"]), tables.top_head_cell(e),
          f"`{e.rel}`"] for e in col.experiments],
        align=["l", "l", "l", "r", "r", "l", "l"])]
    if notes:
        blocks += [Heading("Notes"), Bullets(notes)]
    blocks.append(panel)
    data = {
        "results_dir": str(results_dir),
        "experiments": [{"method": e.method, "model": e.model, "question": e.question, "tokens": e.tokens,
                         "depth": e.depth, "samples_processed": e.record["samples_processed"], "file": e.rel,
                         "top_head": e.record["head_rankings"][0]["head"],
                         "top_score": e.record["head_rankings"][0]["score"], "figure": p}
                        for e, p in zip(col.experiments, paths)],
        "retrieval": d_ret, "depth_grid": d_depth, "top_head_table": d_top, **d_move, **d_stab, "bootstrap": d_boot, "attention": d_exp,
        "properties": d_prop,
        "notes": notes,
    }
    return Report(blocks, data, col)


REPORT_FILES = ("report.html", "report.md", "report.json")


def check_out(out_dir: str | Path) -> None:
    """UserError unless ``out_dir`` is absent, or a folder holding nothing but an earlier report (which the new
    one replaces): a folder with anything else in it is never replaced."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{out} exists and is not a report folder; choose another --out")
    other = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not _ours(out, p))
    if other:
        raise UserError(f"{out} holds files that are not part of a report ({', '.join(other[:3])}); "
                        "choose another --out")


def _ours(out: Path, p: Path) -> bool:
    parts = p.relative_to(out).parts
    if p.is_symlink():
        return False
    if len(parts) == 1:
        return parts[0] in REPORT_FILES or (parts[0] == "figures" and p.is_dir())
    return parts[0] == "figures" and (p.is_dir() or p.suffix == ".png")


def write(report: Report, out_dir: str | Path) -> list[Path]:
    """The whole report is written into a temp folder beside ``out_dir`` and renamed into place when complete;
    an earlier report there is replaced only then. A failure (a full disk) leaves the earlier report, or no
    folder, and nothing of this run."""
    out = Path(out_dir)
    check_out(out)
    md, page = markdown.render(TITLE, report.blocks), html.render(TITLE, report.blocks)
    files = [(f.path, f.png) for f in report.figures] + [
        ("report.json", json_bytes(report.data)), ("report.md", md.encode("utf-8", "backslashreplace")),
        ("report.html", page.encode("utf-8", "backslashreplace"))]  # a file name of non-UTF-8 bytes: \udcff
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # folders this run creates
    tmp = None
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a report is an ordinary folder
        except OSError as e:
            raise UserError(f"cannot write to {out.parent}: {e.strerror or e}") from None
        for rel, data in files:
            try:
                atomic_write_bytes(tmp / rel, data)
            except UserError as e:  # name the file the user asked for, not the temp folder
                raise UserError(str(e).replace(str(tmp), str(out))) from None
        _move_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # deepest first; only while empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return [out / rel for rel, _ in files]


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``. An earlier ``out`` swaps names with ``tmp`` in one step
    (:func:`~retrieval_heads.leftovers.exchange`) and is removed after; where that is not offered, it is moved
    aside first and removed after (put back if the rename fails; restored by the next run after a kill)."""
    from ..leftovers import exchange

    try:
        if not out.exists():
            os.replace(tmp, out)
            return
        if exchange(tmp, out):  # no moment without a report at ``out``
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
        os.replace(out, old)  # onto the empty folder mkdtemp made
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_report(results_dir: str | Path, out_dir: str | Path | None = None, resamples: int = 1000, seed: int = 0,
                top: int = 20) -> tuple[Report, Path]:
    """Build and write the report; returns it and its folder (default ``RESULTS_DIR/report``).

    It holds the results-dir lock on the folder it writes into (:func:`retrieval_heads.lock.writing_into`,
    as ``export`` and ``ablate`` do) from before it reads until the report is in place: UserError at once,
    naming the holder, while a sweep or a detect writes there (nothing is written); a sweep does not start
    meanwhile. An earlier report a killed run moved aside is put back first, and temp folders it left are
    removed (:func:`retrieval_heads.leftovers.recover_folder`).
    """
    from ..leftovers import recover_folder
    from ..lock import writing_into

    out = default_out(results_dir, out_dir)
    with writing_into(out):
        recover_folder(out)
        report = build(results_dir, out, resamples, seed, top)
        write(report, out)
    return report, out
