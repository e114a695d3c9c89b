"""``retrieval-heads detect``: one experiment."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_MAX_NEW_TOKENS
from ..errors import UserError
from ._common import allow, flag, groups, print_top, quiet_transformers, values

SUMMARY = "Run one experiment and write its result JSON."
EXAMPLES = """examples:
  retrieval-heads detect                                     16 samples of 512 tokens on the embedded SmolLM2
  retrieval-heads detect --question hq_state --tokens 1024 --span needle answer --rank-by lift
  retrieval-heads detect --method summed_attention query_focused retrieval_score --samples 8
  retrieval-heads detect --model meta-llama/Meta-Llama-3-8B-Instruct --device cuda --dtype bfloat16
  retrieval-heads detect --dataset my_samples.jsonl --span answer --save-samples"""


def register(commands) -> None:
    p = commands.add_parser("detect", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    exp, meth, out, eng = groups(p, "experiment", "methods", "output", "engine")
    exp.add_argument("--model", default="smollm2", help="smollm2 (embedded), instruct, base, a local path or a hub id.")
    allow(exp.add_argument("--question", default="inc_state", help="The question asked about each filing."),
          "retrieval_heads.data.questions:QUESTIONS")
    exp.add_argument("--tokens", type=int, default=512, help="Prompt length in tokens, template and question included.")
    exp.add_argument("--samples", type=int, default=16,
                     help="Number of samples (synthetic filings, or the first records of --dataset).")
    exp.add_argument("--needle-position", type=float, default=0.5, metavar="DEPTH",
                     help="Depth of the needle in the haystack, 0 (start) to 1 (end).")
    exp.add_argument("--dataset", default=None, help="JSONL file of your own samples (see docs/data.md).")
    exp.add_argument("--seed", type=int, default=0, help="Seed of the synthetic filings.")
    values(meth, "--method", "METHOD", "Scoring method(s), space- or comma-separated or repeated, all on the same "
                                       "samples [default: summed_attention].", "retrieval_heads.methods:METHODS")
    values(meth, "--span", "SPAN", "Span(s) scored by a span-measuring method (the default one), each written as "
                                   "its own result [default: needle].", "retrieval_heads.chance:SPANS")
    allow(meth.add_argument("--rank-by", default="score", help="Rank those results' heads by score (summed mass, "
                                                                "the original ranking) or lift."),
          "retrieval_heads.chance:RANK_BY")
    meth.add_argument("--alpha", type=float, default=0.05,
                      help="Level of the test against the control span (Benjamini-Hochberg).")
    flag(meth, "--success-only", False, "Count only correctly answered samples (written as METHOD_success).")
    flag(meth, "--answers", False, "Also decode and record the model's answers and accuracy (automatic with a "
                                   "method that reads them, or --success-only).")
    meth.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                      help=f"Longest greedy answer, in tokens [default: {DEFAULT_MAX_NEW_TOKENS}].")
    out.add_argument("--output-dir", default="results", help="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json "
                                                            "(_dDEPTH before .json at a depth other than 0.5).")
    flag(out, "--save-samples", False, "Also write the per-sample audit file (.samples.jsonl).")
    out.add_argument("--save-attention", type=int, default=0, metavar="K",
                     help="Also save, per sample, the last token's attention rows of the top K heads (.attention.npz, "
                          "for the report's explorer); 0: off.")
    out.add_argument("--top", type=int, default=10, help="Rows of the printed top-heads table.")
    allow(eng.add_argument("--dtype", default="float32", help="Weights' dtype (the probe's softmax is float32)."),
          "retrieval_heads.models:DTYPES")
    eng.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    eng.add_argument("--batch-size", type=int, default=1, help="Samples per forward pass.")
    flag(eng, "--trust-remote-code", False, "Allow the model's own Python code to run (off by default).")
    flag(eng, "--eager-attentions", False, "Score a model whose family has no attention interface (bloom, gpt_neo, "
                                           "mpt, ...) from its full attention matrices: exact, but one layer's "
                                           "batch x heads x tokens^2 floats at a time (16 heads at 8K tokens: "
                                           "4 GiB per sample in float32); ignored by other models.")
    p.set_defaults(run=detect)


def detect(args: argparse.Namespace) -> None:
    """Run one experiment and write its result JSON."""
    from ..chance import check_rank_by, check_spans_for, span_names
    from ..experiments import check_args, detect as run, method_names
    from ..io import given_path

    dataset = None if args.dataset is None else given_path(args.dataset, "--dataset")
    check_args(None if dataset else args.question, args.tokens, args.samples, args.needle_position,
               args.batch_size, args.seed)
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
              span=span, rank_by=args.rank_by, alpha=args.alpha, eager_attentions=args.eager_attentions)
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

