"""``retrieval-heads ablate``: remove a result's top-k heads (and random controls) and measure what is lost."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ._common import quiet_transformers


def parse_ks(values: List[str], extra: List[str]) -> list[int]:
    """``--k 0,5,10``, ``--k 0 --k 5`` or ``--k 0 5 10`` (numbers after the first one arrive as extra args)."""
    out = []
    for item in list(values) + list(extra):
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise UserError(f"--k: {part!r} is not a whole number") from None
    return out


def ablate(
    ctx: typer.Context,
    result: Path = typer.Argument(..., help="A result JSON written by detect."),
    k: List[str] = typer.Option(["0", "5", "10", "20", "50"], "--k", help="Numbers of heads to remove: "
                                "--k 0 5 10, --k 0,5,10 or repeated --k."),
    random_seeds: int = typer.Option(3, help="Random controls per k (k heads drawn from outside the top k)."),
    samples: Optional[int] = typer.Option(None, help="Samples to evaluate on (default: the result's count)."),
    tokens: Optional[int] = typer.Option(None, help="Prompt length (default: the result's)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the synthetic filings (default: the result's, i.e. "
                                                  "the samples the heads were found on)."),
    dataset: Optional[Path] = typer.Option(None, help="JSONL samples (needed when the result came from a dataset)."),
    model: Optional[str] = typer.Option(None, help="Model (default: the result's model_key)."),
    max_new_tokens: int = typer.Option(12, help="Longest greedy answer, in tokens."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    batch_size: int = typer.Option(8, help="Rows per forward pass, each row one sample under one condition (its own "
                                           "removed heads); 1 runs one condition at a time."),
    out: Optional[str] = typer.Option(None, help="Output JSON, a name ending in .json (default: RESULT's name + "
                                                  ".ablation.json); the plot goes next to it as .png."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
) -> None:
    """Remove the top-k heads of a result and k random others; write accuracy and log-prob vs k (JSON + PNG)."""
    from ..ablation import ablate as run_ablation
    from ..io import given_path
    from ..results import samples_path
    from ._common import check_not_input

    ks = parse_ks(k, ctx.args)
    out = None if out is None else given_path(out, "--out")
    out = out or result.with_name(result.stem + ".ablation.json")
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must name a .json file (the plot goes beside it as .png), got {out}")
    for o in (out, out.with_suffix(".png")):
        check_not_input(o, [result, samples_path(result), dataset])
    quiet_transformers()
    res = run_ablation(result, model, ks, random_seeds, samples, tokens, seed, dataset, max_new_tokens, batch_size,
                       dtype, device, trust_remote_code, progress=True)
    res.write(out)
    report = res.record
    for row in report["summary"]:
        rnd = f"  random {row['random_accuracy_mean']:.2f} [{row['random_accuracy_min']:.2f}, " \
              f"{row['random_accuracy_max']:.2f}]" if "random_accuracy_mean" in row else ""
        print(f"k={row['k']:>3}  top: accuracy {row['top_accuracy']:.2f}  logprob {row['top_logprob']:.3f}{rnd}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True})(ablate)
