"""``retrieval-heads sweep``: a grid of experiments (the seed's run_all), resumable.

``--models``, ``--questions``, ``--tokens`` and ``--needle-positions`` take several values each, space- or
comma-separated: ``--models smollm2 --questions all --tokens 1024 2048 --needle-positions 0.1 0.5 0.9``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from ._common import quiet_transformers

LIST_OPTIONS = ("--models", "--questions", "--tokens", "--needle-positions")


def spread(args: list[str], options=LIST_OPTIONS) -> list[str]:
    """``--tokens 1024 2048`` -> ``--tokens 1024 --tokens 2048`` for the list options (click reads one value
    per option occurrence). The command takes no positional arguments, so every bare word after a list
    option belongs to it."""
    from ..errors import UserError

    out: list[str] = []
    current = None
    for a in args + ["--"]:
        if current is not None and out[-1] == current and a.startswith("-"):
            raise UserError(f"{current} needs at least one value")
        if a.startswith("-"):
            name = a.split("=", 1)[0]
            current = name if name in options else None
            out.append(a)
        elif current is not None and out[-1] != current:
            out.extend([current, a])
        else:
            out.append(a)
    return out[:-1]


class ListOptionsCommand(TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, spread(list(args)))


def sweep(
    models: Optional[List[str]] = typer.Option(
        None, metavar="MODEL...", help="Model keys, local paths or hub ids [default: instruct base, the seed's pair]."),
    questions: Optional[List[str]] = typer.Option(
        None, metavar="QUESTION...", help="Question keys, or 'all' [default: all four]."),
    tokens: Optional[List[str]] = typer.Option(
        None, metavar="TOKENS...", help="Prompt lengths in tokens [default: 2048 4096 6144 8192]."),
    samples: Optional[int] = typer.Option(None, help="Samples per experiment [default: 6]."),
    needle_position: Optional[float] = typer.Option(None, help="Needle depth, 0 (start) to 1 (end) [default: 0.5]."),
    needle_positions: Optional[List[str]] = typer.Option(
        None, metavar="DEPTH...", help="Several needle depths, each swept like a length (0.5 keeps the seed's "
                                       "file names; others add _dDEPTH) [default: 0.5]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the synthetic filings [default: 0]."),
    method: Optional[str] = typer.Option(None, help="Scoring method, or several comma-separated (all from one prefill per sample) [default: summed_attention]."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 [default: float32]."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1, mps ... [default: cpu]."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per forward pass [default: 1]."),
    save_samples: Optional[bool] = typer.Option(None, "--save-samples/--no-save-samples",
                                                help="Also write the per-sample audit files [default: off]."),
    trust_remote_code: Optional[bool] = typer.Option(
        None, "--trust-remote-code/--no-trust-remote-code",
        help="Allow the models' own Python code to run [default: off]."),
    save_attention: Optional[int] = typer.Option(None, help="Save the top K heads' last-token attention rows "
                                                            "beside each result (.attention.npz) [default: 0, off]."),
    rank_by: Optional[str] = typer.Option(None, help="Rank summed_attention's heads by score or lift [default: score]."),
    answers: Optional[bool] = typer.Option(None, "--answers/--no-answers",
                                           help="Also decode the model's greedy answers (accuracy in each "
                                                "result) [default: off]."),
    config: Optional[Path] = typer.Option(None, help="Grid file (.json or .toml) of the settings above; flags win."),
    output_dir: str = typer.Option("results", help="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json "
                                                   "(_dDEPTH before .json at a depth other than 0.5)."),
    progress: bool = typer.Option(True, help="Show the progress bar (stderr)."),
    engine: str = typer.Option("local", help="local (this process) or ray (actors on a Ray cluster)."),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster to join (e.g. HEAD_IP:6379 or 'auto') [default: a private local instance]."),
    gpus_per_worker: float = typer.Option(0, help="GPUs per Ray worker (one worker per model); 0: CPU only."),
    cpus_per_worker: int = typer.Option(1, help="CPUs (torch threads) per Ray worker."),
    device_map: Optional[str] = typer.Option(
        None, help="Shard each model over the GPUs it has, e.g. 'auto' (accelerate) [default: whole on --device]."),
) -> None:
    """Run every model x question x length x depth experiment not already done; resumable, one model load each."""
    from ..errors import UserError
    from ..io import given_path
    from ..sweep import load_grid_file, make_grid, results_folders, run_sweep

    output_dir = given_path(output_dir, "--output-dir")
    settings = load_grid_file(config) if config else {}
    if needle_position is not None or needle_positions:  # a depth flag replaces the file's depth(s), either key
        settings.pop("needle_position", None)
        settings.pop("needle_positions", None)
    flags = dict(models=models, questions=questions, tokens=tokens, samples=samples,
                 needle_position=needle_position, needle_positions=needle_positions or None, seed=seed,
                 method=method, dtype=dtype, device=device,
                 batch_size=batch_size, save_samples=save_samples, save_attention=save_attention,
                 trust_remote_code=trust_remote_code, rank_by=rank_by, answers=answers)
    settings.update({k: v for k, v in flags.items() if v is not None})
    grid = make_grid(**settings)
    quiet_transformers()
    if engine == "ray":
        from ..ray_engine import run_ray_sweep

        s = run_ray_sweep(grid, output_dir, address=address, gpus_per_worker=gpus_per_worker,
                          cpus_per_worker=cpus_per_worker, device_map=device_map)
    elif engine == "local":
        if address is not None or gpus_per_worker or cpus_per_worker != 1:
            raise UserError("--address, --gpus-per-worker and --cpus-per-worker are for --engine ray")
        from functools import partial

        from ..models import load_model

        s = run_sweep(grid, output_dir, load=partial(load_model, device_map=device_map), progress=progress)
    else:
        raise UserError(f"unknown engine {engine!r}; choose from: local, ray")
    print(f"sweep finished in {s.seconds:.0f} s: {len(s.done)} computed, {len(s.recomputed)} recomputed, "
          f"{len(s.skipped)} already done; results in {results_folders(grid, output_dir)}")


def register(app: typer.Typer) -> None:
    app.command(cls=ListOptionsCommand)(sweep)
