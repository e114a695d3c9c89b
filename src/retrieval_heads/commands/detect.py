"""``retrieval-heads detect``: one experiment."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_MAX_NEW_TOKENS
from ..errors import UserError
from ._common import flag, print_top, quiet_transformers, values

SUMMARY = "Run one experiment and write its result JSON."


def register(commands) -> None:
    p = commands.add_parser("detect", help=SUMMARY, description=SUMMARY)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), instruct, base, a local path or a hub id.")
    p.add_argument("--question", default="inc_state", help="inc_state, inc_year, employee_count or hq_state.")
    p.add_argument("--tokens", type=int, default=512, help="Prompt length in tokens, template and question included.")
    p.add_argument("--samples", type=int, default=16,
                   help="Number of samples (synthetic filings, or the first records of --dataset).")
    p.add_argument("--needle-position", type=float, default=0.5,
                   help="Depth of the needle in the haystack, 0 (start) to 1 (end).")
    p.add_argument("--dataset", default=None, help="JSONL file of your own samples (see README).")
    p.add_argument("--output-dir", default="results", help="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json "
                                                          "(_dDEPTH before .json at a depth other than 0.5).")
    flag(p, "--save-samples", False, "Also write the per-sample audit file (.samples.jsonl).")
    p.add_argument("--save-attention", type=int, default=0, metavar="K",
                   help="Also save, per sample, the last token's attention rows of the top K heads (.attention.npz, "
                        "for the report's explorer); 0: off.")
    values(p, "--method", "METHOD", "Scoring method(s): summed_attention, query_focused, retrieval_score, qrhead, "
                                    "qrhead_exact; "
                                    "space- or comma-separated or repeated, all on the same samples "
                                    "[default: summed_attention].")
    flag(p, "--success-only", False, "Count only correctly answered samples (written as METHOD_success).")
    flag(p, "--answers", False, "Also decode and record the model's answers and accuracy (automatic with "
                                "retrieval_score or --success-only).")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"Longest greedy answer, in tokens [default: {DEFAULT_MAX_NEW_TOKENS}].")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (the probe's softmax is float32).")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--batch-size", type=int, default=1, help="Samples per forward pass.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the synthetic filings.")
    flag(p, "--trust-remote-code", False, "Allow the model's own Python code to run (off by default).")
    p.add_argument("--top", type=int, default=10, help="Rows of the printed top-heads table.")
    values(p, "--span", "SPAN", "Span(s) scored by summed_attention: needle, answer, fact; space- or comma-separated "
                                "or repeated, each written as its own result [default: needle].")
    p.add_argument("--rank-by", default="score", help="Rank summed_attention's heads by score (the seed's) or lift.")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="Level of the test against the control span (Benjamini-Hochberg).")
    p.set_defaults(run=detect)


def detect(args: argparse.Namespace) -> None:
    """Run one experiment and write its result JSON."""
    from ..chance import check_rank_by, check_spans_for, span_names
    from ..experiments import check_args, detect as run, method_names
    from ..io import given_path

    dataset = None if args.dataset is None else given_path(args.dataset, "--dataset")
    check_args(None if dataset else args.question, args.tokens, args.samples, args.needle_position,
               args.batch_size)
    method = method_names(args.method or ["summed_attention"])
    span = span_names(args.span or ["needle"])
    check_rank_by(args.rank_by)
    check_spans_for(span, dataset is not None)
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.save_attention < 0:
        raise UserError(f"--save-attention must be 0 (off) or a number of heads, got {args.save_attention}")
    if args.top < 0:
        raise UserError(f"--top must be >= 0, got {args.top}")
    quiet_transformers()
    res = run(model=args.model, question=args.question, tokens=args.tokens, samples=args.samples,
              needle_position=args.needle_position, dataset=dataset, seed=args.seed, method=method,
              dtype=args.dtype, device=args.device, batch_size=args.batch_size,
              output_dir=given_path(args.output_dir, "--output-dir"), save_samples=args.save_samples, progress=True,
              trust_remote_code=args.trust_remote_code, success_only=args.success_only,
              answers=args.answers or None, max_new_tokens=args.max_new_tokens, save_attention=args.save_attention,
              span=span, rank_by=args.rank_by, alpha=args.alpha)
    verdicts = []
    for res in res.values():
        r = res.record
        acc = f", accuracy {r['extra']['accuracy']:.2f}" if "accuracy" in r["extra"] else ""
        by = f", ranked by {res.rank_by}" if res.lift is not None else ""
        print_top(res.top_rows(args.top), f"{r['method']}: {r['model_key']} {r['question']} {r['total_tokens']} "
                                          f"tokens, {r['samples_processed']} samples{acc}{by}")
        print(f"wrote {res.path}")
        if "verdict" in r:
            verdicts.append(f"{r['method']}: {r['verdict']}" if len(span) > 1 else r["verdict"])
    for line in verdicts:  # the command ends with the verdict (one line per span)
        print(line)

