"""``retrieval-heads detect``: one experiment."""

from __future__ import annotations

import argparse

from ..defaults import settings_for
from ..spec import GROUPS
from ._common import add_options, groups, print_top, quiet_transformers

SUMMARY = "Run one experiment and write its result JSON."
EXAMPLES = """examples:
  retrieval-heads detect                                     the passkey task, 8 samples of 1,024 tokens, on SmolLM2
  retrieval-heads detect --question passkey --tokens 1024 --span answer      the same, spelled out
  retrieval-heads detect --question inc_state                the original filing experiment: 16 samples of 512 tokens
  retrieval-heads detect --question hq_state --tokens 1024 --span needle answer --rank-by lift
  retrieval-heads detect --method summed_attention query_focused retrieval_score --samples 8
  retrieval-heads detect --model meta-llama/Meta-Llama-3-8B-Instruct --device cuda --dtype bfloat16
  retrieval-heads detect --dataset my_samples.jsonl --span answer --save-samples"""


def register(commands) -> None:
    p = commands.add_parser("detect", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    add_options("detect", dict(zip(GROUPS, groups(p, *GROUPS))))  # every flag from the spec
    p.set_defaults(run=detect)


def detect(args: argparse.Namespace) -> None:
    """Run one experiment and write its result JSON."""
    from ..chance import check_rank_by, check_spans_for, span_names
    from ..experiments import check_args, detect as run, method_names
    from ..io import given_path
    from ..spec import check, default

    dataset = None if args.dataset is None else given_path(args.dataset, "--dataset")
    given = settings_for(args.question, dataset is not None)
    tokens = given.tokens if args.tokens is None else args.tokens
    samples = given.samples if args.samples is None else args.samples
    check_args(None if dataset else args.question, tokens, samples, args.needle_position, args.batch_size, args.seed)
    method = method_names(args.method or default("method"))
    span = span_names(args.span or [given.span])
    check_rank_by(args.rank_by)
    check_spans_for(span, dataset is not None, None if dataset else args.question)
    for name in ("alpha", "max_new_tokens", "save_attention", "top"):  # before the model loads
        check(name, getattr(args, name))
    quiet_transformers()
    res = run(model=args.model, question=args.question, tokens=tokens, samples=samples,
              needle_position=args.needle_position, dataset=dataset, seed=args.seed, method=method,
              dtype=args.dtype, device=args.device, batch_size=args.batch_size,
              output_dir=given_path(args.output_dir, "--output-dir"), save_samples=args.save_samples, progress=True,
              trust_remote_code=args.trust_remote_code, success_only=args.success_only,
              answers=args.answers, max_new_tokens=args.max_new_tokens, save_attention=args.save_attention,
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

