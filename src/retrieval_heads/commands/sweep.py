"""``retrieval-heads sweep``: a grid of experiments, resumable.

``--models``, ``--questions``, ``--tokens`` and ``--needle-positions`` take several values each, space- or
comma-separated: ``--models smollm2 --questions all --tokens 1024 2048 --needle-positions 0.1 0.5 0.9``.
"""

from __future__ import annotations

import argparse

from ..spec import ENGINES, GRID_KEYS, GROUPS
from ._common import add_options, groups, quiet_transformers

SUMMARY = "Run every model x question x length x depth experiment not already done; resumable, one model load each."

# the grid's settings (sweep.make_grid's arguments) that flags give, one flag per grid key (spec.GRID_KEYS);
# a flag not given leaves the grid file's
GRID_FLAGS = GRID_KEYS


EXAMPLES = """examples:
  retrieval-heads sweep --models smollm2 --tokens 512 1024 --samples 4      4 questions x 2 lengths
  retrieval-heads sweep --models smollm2 --needle-positions 0.1 0.5 0.9 --span needle answer
  retrieval-heads sweep --config grid.toml --output-dir results             settings from a grid file; flags win
  retrieval-heads sweep --config grid.toml --engine ray --gpus-per-worker 1 one Ray actor per model

Run the same command again to resume: finished experiments are kept, missing or broken ones computed."""


def register(commands) -> None:
    p = commands.add_parser("sweep", help=SUMMARY, description=SUMMARY, epilog=EXAMPLES)
    add_options("sweep", dict(zip(GROUPS, groups(p, *GROUPS))))  # every flag from the spec
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

