"""``retrieval-heads ablate``: remove a result's top-k heads (and random controls) and measure what is lost."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..spec import default
from ._common import add_options, groups, quiet_transformers

SUMMARY = ("Remove the top-k heads of a result and, as controls, random heads of the same layers and of any "
           "layer; write accuracy and log-probs vs k, a paired test and a conclusion (JSON + PNG).")
DEFAULT_KS = default("k", "ablate")


def parse_ks(given: list[str] | None) -> list[int]:
    """``--k 0 5 10``, ``--k 0,5,10`` or ``--k 0 --k 5`` as whole numbers; None (no --k): the default ks."""
    if given is None:
        return list(DEFAULT_KS)
    out = []
    for item in given:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise UserError(f"--k: {part!r} is not a whole number") from None
    return out


EXAMPLES = """examples:
  retrieval-heads ablate results/summed_attention/smollm2_inc_state_512.json
  retrieval-heads ablate RESULT --k 0 5 10 --draws 5 --controls matched --samples 32
  retrieval-heads ablate RESULT --dataset my_samples.jsonl      a result made from a dataset needs it again"""


def register(commands) -> None:
    p = commands.add_parser("ablate", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("result", metavar="RESULT", help="A result JSON written by detect.")
    exp, out, eng = groups(p, "experiment", "output", "engine")
    add_options("ablate", {"experiment": exp, "engine": eng})  # the settings it shares with detect, and its own
    out.add_argument("--out", help="Output JSON, a name ending in .json (default: RESULT's name + .ablation.json); "
                                   "the plot goes next to it as .png.")
    p.set_defaults(run=ablate)


def ablate(args: argparse.Namespace) -> None:
    """Remove the top-k heads of a result and k random others; write accuracy and log-prob vs k (JSON + PNG)."""
    from ..ablation import ablate as run_ablation
    from ..io import given_path
    from ..leftovers import remove_stale_temps
    from ..lock import writing_into
    from ..results import samples_path
    from ._common import check_not_input

    result = given_path(args.result, "RESULT")
    dataset = None if args.dataset is None else given_path(args.dataset, "--dataset")
    ks = parse_ks(args.k)
    controls = [c.strip() for c in str(args.controls).split(",") if c.strip()]
    if not controls:  # an empty --controls (e.g. an unset shell variable) would silently drop every control
        raise UserError(f"--controls names no control, got {args.controls!r} (choose from matched, random; "
                        "--draws 0 runs none)")
    out = None if args.out is None else given_path(args.out, "--out")
    out = out or result.with_name(result.stem + ".ablation.json")
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must name a .json file (the plot goes beside it as .png), got {out}")
    for o in (out, out.with_suffix(".png")):
        check_not_input(o, [result, samples_path(result), dataset])
    quiet_transformers()
    with writing_into(out):  # not while a sweep or detect writes there
        remove_stale_temps([out, out.with_suffix(".png")])  # what a killed ablate to the same files left
        res = run_ablation(result, args.model, ks, args.random_seeds, args.samples, args.tokens, args.seed, dataset,
                           args.max_new_tokens, args.batch_size, args.dtype, args.device, args.trust_remote_code,
                           progress=True, controls=controls)
        res.write(out)
    from ..ablation_stats import summary_lines

    print("\n".join(summary_lines(res.record)))
    print(f"wrote {out} and {out.with_suffix('.png')}")

