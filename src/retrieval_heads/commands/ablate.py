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
    batch_size: int = typer.Option(1, help="Samples per forward pass."),
    out: Optional[str] = typer.Option(None, help="Output JSON, a name ending in .json (default: RESULT's name + "
                                                  ".ablation.json); the plot goes next to it as .png."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
) -> None:
    """Remove the top-k heads of a result and k random others; write accuracy and log-prob vs k (JSON + PNG)."""
    from ..ablation import check_ks, plot_png, random_heads, run_ablation
    from ..data.dataset import load_jsonl
    from ..data.prompt import PromptFormat
    from ..data.questions import QUESTIONS
    from ..data.samples import dataset_samples
    from ..experiments import build_prompts, check_args, check_tokens
    from ..io import atomic_write_files, given_path, json_bytes
    from ..models import MODELS, load_model
    from ..results import load_result, samples_path
    from ._common import check_not_input

    ks = parse_ks(k, ctx.args)
    out = None if out is None else given_path(out, "--out")
    record = load_result(result)
    ks = check_ks(ks, record["num_layers"] * record["num_heads"])
    for kk in ks if random_seeds > 0 else []:
        random_heads(record, kk, 0)  # a control that cannot be drawn fails before the model loads
    n = record["samples_processed"] if samples is None else samples
    t = record["total_tokens"] if tokens is None else tokens
    s = record.get("seed", 0) if seed is None else seed
    synthetic = dataset is None
    if synthetic and record["question"] not in QUESTIONS:
        raise UserError(f"{result} was made from a dataset ({record['question']}); pass it with --dataset")
    check_args(record["question"] if synthetic else None, t, n, record["needle_position"], batch_size)
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if random_seeds < 0:
        raise UserError(f"--random-seeds must be >= 0, got {random_seeds}")
    out = out or result.with_name(result.stem + ".ablation.json")
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must name a .json file (the plot goes beside it as .png), got {out}")
    for o in (out, out.with_suffix(".png")):
        check_not_input(o, [result, samples_path(result), dataset])
    if model is None and record["model_key"] not in MODELS:  # a file's field never names a folder to load
        raise UserError(f"{result} was made with model {str(record['model_name'])[:80]!r}, not a built-in key; "
                        f"pass the model with --model")
    records = None if synthetic else load_jsonl(dataset)[:n]
    quiet_transformers()
    lm = load_model(model or record["model_key"], dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if (lm.num_layers, lm.num_heads) != (record["num_layers"], record["num_heads"]):
        raise UserError(f"{lm.name} has {lm.num_layers}x{lm.num_heads} heads, the result {record['num_layers']}x"
                        f"{record['num_heads']}")
    if synthetic:
        prompts = [g[record["question"]] for g in build_prompts(lm, [record["question"]], t, n,
                                                                record["needle_position"], s)]
    else:
        check_tokens(lm, t)
        prompts = dataset_samples(PromptFormat(lm.tokenizer), records, t, record["needle_position"])
    report = run_ablation(lm, record, prompts, ks, random_seeds, max_new_tokens, batch_size, progress=True,
                          tokens=t, seed=s if synthetic else None)
    report["result"] = str(result)
    # the plot first, the JSON last, as one write: a full disk leaves neither
    atomic_write_files([(out.with_suffix(".png"), plot_png(report)), (out, json_bytes(report))])
    for row in report["summary"]:
        rnd = f"  random {row['random_accuracy_mean']:.2f} [{row['random_accuracy_min']:.2f}, " \
              f"{row['random_accuracy_max']:.2f}]" if "random_accuracy_mean" in row else ""
        print(f"k={row['k']:>3}  top: accuracy {row['top_accuracy']:.2f}  logprob {row['top_logprob']:.3f}{rnd}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True})(ablate)
