"""``retrieval-heads export``: a result in the formats of other tools (Wu/HeadKV, QRHead, DuoAttention, KV heads)."""

from __future__ import annotations

import argparse

from ._common import allow, groups

SUMMARY = "Write a result as Wu/HeadKV JSON, a QRHead head-set string, a DuoAttention TSV or a KV-head view."


EXAMPLES = """examples:
  retrieval-heads export RESULT --format qrhead --k 20         "L-H,L-H,..." best first
  retrieval-heads export RESULT --format wu --out heads.json   needs RESULT's .samples.jsonl (detect --save-samples)
  retrieval-heads export RESULT --format duo --out pattern.tsv"""


def register(commands) -> None:
    p = commands.add_parser("export", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("result", metavar="RESULT", help="A result JSON written by detect.")
    (out,) = groups(p, "output")
    allow(out.add_argument("--format", required=True, help="wu needs the result's .samples.jsonl."),
          "retrieval_heads.export:FORMATS")
    out.add_argument("--k", type=int, default=20, help="Heads in the qrhead head set.")
    out.add_argument("--kv-heads", type=int, help="KV heads of the model (default: the result's record).")
    out.add_argument("--out", help="Write here (atomically) instead of printing.")
    p.set_defaults(run=export)


def export(args: argparse.Namespace) -> None:
    """Write a result as Wu/HeadKV JSON, a QRHead head-set string, a DuoAttention TSV or a KV-head view."""
    from ..export import FORMATS, render
    from ..errors import UserError
    from ..io import atomic_write_text, given_path
    from ..leftovers import remove_stale_temps
    from ..lock import writing_into
    from ..results import load_result, samples_path
    from ._common import check_not_input

    result = given_path(args.result, "RESULT")
    if args.format not in FORMATS:
        raise UserError(f"unknown format {args.format!r}; choose from: {', '.join(FORMATS)}")
    out = None if args.out is None else given_path(args.out, "--out")
    if out is not None:
        check_not_input(out, [result, samples_path(result)])
    if out is None:
        print(render(args.format, load_result(result), result, args.k, args.kv_heads), end="", flush=True)
        return
    with writing_into(out):  # not while a sweep or detect writes there
        remove_stale_temps([out])  # what a killed export to the same file left
        atomic_write_text(out, render(args.format, load_result(result), result, args.k, args.kv_heads))
    print(f"wrote {out}")

