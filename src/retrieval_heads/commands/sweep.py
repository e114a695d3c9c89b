"""``retrieval-heads sweep``: a grid of experiments, resumable.

``--models``, ``--questions``, ``--tokens`` and ``--needle-positions`` take several values each, space- or
comma-separated: ``--models smollm2 --questions all --tokens 1024 2048 --needle-positions 0.1 0.5 0.9``.
"""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_MAX_NEW_TOKENS
from ._common import allow, flag, groups, quiet_transformers, values

SUMMARY = "Run every model x question x length x depth experiment not already done; resumable, one model load each."

# the grid's settings (sweep.make_grid's arguments) that flags give; a flag not given leaves the grid file's
ENGINES = ("local", "ray")
GRID_FLAGS = ("models", "questions", "tokens", "samples", "needle_position", "needle_positions", "seed", "method",
              "dtype", "device", "batch_size", "save_samples", "save_attention", "trust_remote_code", "eager_attentions",
              "rank_by", "answers", "span", "max_new_tokens")


EXAMPLES = """examples:
  retrieval-heads sweep --models smollm2 --tokens 512 1024 --samples 4      4 questions x 2 lengths
  retrieval-heads sweep --models smollm2 --needle-positions 0.1 0.5 0.9 --span needle answer
  retrieval-heads sweep --config grid.toml --output-dir results             settings from a grid file; flags win
  retrieval-heads sweep --config grid.toml --engine ray --gpus-per-worker 1 one Ray actor per model

Run the same command again to resume: finished experiments are kept, missing or broken ones computed."""


def register(commands) -> None:
    p = commands.add_parser("sweep", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    exp, meth, out, eng = groups(p, "experiment", "methods", "output", "engine")
    values(exp, "--models", "MODEL", "Model keys, local paths or hub ids [default: smollm2, as detect; the original "
                                     "study's Llama-3-8B pair: instruct base].")
    values(exp, "--questions", "QUESTION", "Question keys (filing questions or long-context tasks, docs/tasks.md), "
                                           "or 'all' for the four filing questions [default: all four].",
           "retrieval_heads.data.tasks:QUESTION_KEYS")
    values(exp, "--tokens", "TOKENS", "Prompt lengths in tokens [default: 2048 4096 6144 8192].")
    exp.add_argument("--samples", type=int, help="Samples per experiment [default: 6].")
    exp.add_argument("--needle-position", type=float, metavar="DEPTH",
                     help="Needle depth, 0 (start) to 1 (end) [default: 0.5].")
    values(exp, "--needle-positions", "DEPTH", "Several needle depths, each swept like a length (0.5 keeps the plain "
                                               "file names; others add _dDEPTH) [default: 0.5].")
    exp.add_argument("--seed", type=int, help="Seed of the synthetic filings [default: 0].")
    exp.add_argument("--config", help="Grid file (.json or .toml) of these settings; flags win.")
    values(meth, "--method", "METHOD", "Scoring method(s); several are scored from one prefill per sample "
                                       "[default: summed_attention].", "retrieval_heads.methods:METHODS")
    values(meth, "--span", "SPAN", "Span kinds of a span-measuring method (the default one), each its own result "
                                   "(summed_attention+answer, ...) [default: needle].", "retrieval_heads.chance:SPANS")
    allow(meth.add_argument("--rank-by", help="Rank those results' heads by score or lift [default: score]."),
          "retrieval_heads.chance:RANK_BY")
    flag(meth, "--answers", None, "Also decode the model's greedy answers (accuracy in each result) [default: off].")
    meth.add_argument("--max-new-tokens", type=int, help="Longest greedy answer, in tokens (--answers, "
                                                         f"retrieval_score) [default: {DEFAULT_MAX_NEW_TOKENS}].")
    out.add_argument("--output-dir", default="results", help="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json "
                                                            "(_dDEPTH before .json at a depth other than 0.5).")
    flag(out, "--save-samples", None, "Also write the per-sample audit files [default: off].")
    out.add_argument("--save-attention", type=int, metavar="K",
                     help="Save the top K heads' last-token attention rows beside each result (.attention.npz) "
                          "[default: 0, off].")
    flag(out, "--progress", True, "Show the progress bar (stderr).")
    allow(eng.add_argument("--engine", default="local", help="local (this process) or ray (actors on a Ray cluster)."),
          ENGINES)
    allow(eng.add_argument("--dtype", help="Weights' dtype [default: float32]."), "retrieval_heads.models:DTYPES")
    eng.add_argument("--device", help="cpu, cuda, cuda:1, mps ... [default: cpu].")
    eng.add_argument("--batch-size", type=int, help="Samples per forward pass [default: 1].")
    flag(eng, "--trust-remote-code", None, "Allow the models' own Python code to run [default: off].")
    flag(eng, "--eager-attentions", None, "Score models whose family has no attention interface (bloom, gpt_neo, "
                                          "mpt, ...) from their full attention matrices: exact, but one layer's "
                                          "batch x heads x tokens^2 floats at a time (16 heads at 8K tokens: 4 GiB "
                                          "per sample in float32); ignored by other models [default: off].")
    eng.add_argument("--address", help="Ray cluster to join (e.g. HEAD_IP:6379 or 'auto') [default: a private local "
                                       "instance].")
    eng.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray worker (one worker per model); "
                                                                      "0: CPU only.")
    eng.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per Ray worker.")
    eng.add_argument("--device-map", help="Shard each model over the GPUs it has, e.g. 'auto' (accelerate) [default: "
                                          "whole on --device].")
    p.set_defaults(run=sweep)


def grid_settings(args: argparse.Namespace) -> dict:
    """The grid's settings: the grid file's (``--config``), and over them every flag given, both ways
    (``--no-answers`` beats a file's true). A depth flag replaces the file's depth(s), either key."""
    from ..io import given_path
    from ..sweep import load_grid_file

    settings = load_grid_file(given_path(args.config, "--config")) if args.config is not None else {}
    if args.needle_position is not None or args.needle_positions:
        settings.pop("needle_position", None)
        settings.pop("needle_positions", None)
    settings.update({k: getattr(args, k) for k in GRID_FLAGS if getattr(args, k) is not None})
    return settings


def sweep(args: argparse.Namespace) -> None:
    """Run every model x question x length x depth experiment not already done; resumable, one model load each."""
    from ..errors import UserError
    from ..io import given_path
    from ..sweep import make_grid, results_folders, run_sweep

    output_dir = given_path(args.output_dir, "--output-dir")
    grid = make_grid(**grid_settings(args))
    quiet_transformers()
    if args.engine == "ray":
        from ..sweep import run_ray_sweep

        s = run_ray_sweep(grid, output_dir, address=args.address, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, device_map=args.device_map)
    elif args.engine == "local":
        if args.address is not None or args.gpus_per_worker or args.cpus_per_worker != 1:
            raise UserError("--address, --gpus-per-worker and --cpus-per-worker are for --engine ray")
        from functools import partial

        from ..models import load_model

        s = run_sweep(grid, output_dir, load=partial(load_model, device_map=args.device_map), progress=args.progress)
    else:
        raise UserError(f"unknown engine {args.engine!r}; choose from: {', '.join(ENGINES)}")
    print(f"sweep finished in {s.seconds:.0f} s: {len(s.done)} computed, {len(s.recomputed)} recomputed, "
          f"{len(s.skipped)} already done; results in {results_folders(grid, output_dir)}")

