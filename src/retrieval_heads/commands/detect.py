"""``retrieval-heads detect``: one experiment."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ._common import print_top, quiet_transformers


def detect(
    model: str = typer.Option("smollm2", help="smollm2 (embedded), instruct, base, a local path or a hub id."),
    question: str = typer.Option("inc_state", help="inc_state, inc_year, employee_count or hq_state."),
    tokens: int = typer.Option(512, help="Prompt length in tokens, template and question included."),
    samples: int = typer.Option(16, help="Number of samples (synthetic filings, or the first records of --dataset)."),
    needle_position: float = typer.Option(0.5, help="Depth of the needle in the haystack, 0 (start) to 1 (end)."),
    dataset: Optional[Path] = typer.Option(None, help="JSONL file of your own samples (see README)."),
    output_dir: str = typer.Option("results", help="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json "
                                                   "(_dDEPTH before .json at a depth other than 0.5)."),
    save_samples: bool = typer.Option(False, help="Also write the per-sample audit file (.samples.jsonl)."),
    save_attention: int = typer.Option(0, help="Also save, per sample, the last token's attention rows of the "
                                               "top K heads (.attention.npz, for the report's explorer); 0: off."),
    method: List[str] = typer.Option(["summed_attention"], help="Scoring method(s): summed_attention, query_focused, "
                                     "retrieval_score, qrhead; comma-separated or repeated, all on the same samples."),
    success_only: bool = typer.Option(False, help="Count only correctly answered samples (written as METHOD_success)."),
    answers: bool = typer.Option(False, help="Also decode and record the model's answers and accuracy (automatic "
                                             "with retrieval_score or --success-only)."),
    max_new_tokens: int = typer.Option(12, help="Longest greedy answer, in tokens."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (the probe's softmax is float32)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps ..."),
    batch_size: int = typer.Option(1, help="Samples per forward pass."),
    seed: int = typer.Option(0, help="Seed of the synthetic filings."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run (off by default)."),
    top: int = typer.Option(10, help="Rows of the printed top-heads table."),
    span: List[str] = typer.Option(["needle"], help="Span(s) scored by summed_attention: needle, answer, fact; "
                                   "comma-separated or repeated, each written as its own result."),
    rank_by: str = typer.Option("score", help="Rank summed_attention's heads by score (the seed's) or lift."),
    alpha: float = typer.Option(0.05, help="Level of the test against the control span (Benjamini-Hochberg)."),
) -> None:
    """Run one experiment and write its result JSON."""
    from ..chance import check_rank_by, check_spans_for, span_names
    from ..experiments import check_args, detect as run, method_names
    from ..io import given_path

    check_args(None if dataset else question, tokens, samples, needle_position, batch_size)
    method = method_names(method)
    span = span_names(span)
    check_rank_by(rank_by)
    check_spans_for(span, dataset is not None)
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must lie in (0, 1), got {alpha}")
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if save_attention < 0:
        raise UserError(f"--save-attention must be 0 (off) or a number of heads, got {save_attention}")
    if top < 0:
        raise UserError(f"--top must be >= 0, got {top}")
    quiet_transformers()
    res = run(model=model, question=question, tokens=tokens, samples=samples, needle_position=needle_position,
              dataset=dataset, seed=seed, method=method, dtype=dtype, device=device, batch_size=batch_size,
              output_dir=given_path(output_dir, "--output-dir"), save_samples=save_samples, progress=True,
              trust_remote_code=trust_remote_code, success_only=success_only, answers=answers or None,
              max_new_tokens=max_new_tokens, save_attention=save_attention, span=span, rank_by=rank_by, alpha=alpha)
    verdicts = []
    for res in res.values():
        r = res.record
        acc = f", accuracy {r['extra']['accuracy']:.2f}" if "accuracy" in r["extra"] else ""
        by = f", ranked by {res.rank_by}" if res.lift is not None else ""
        print_top(res.top_rows(top), f"{r['method']}: {r['model_key']} {r['question']} {r['total_tokens']} tokens, "
                                     f"{r['samples_processed']} samples{acc}{by}")
        print(f"wrote {res.path}")
        if "verdict" in r:
            verdicts.append(f"{r['method']}: {r['verdict']}" if len(span) > 1 else r["verdict"])
    for line in verdicts:  # the command ends with the verdict (one line per span)
        print(line)


def register(app: typer.Typer) -> None:
    app.command()(detect)
