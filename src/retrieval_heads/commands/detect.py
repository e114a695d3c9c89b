"""``retrieval-heads detect``: one experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import print_top, quiet_transformers


def detect(
    model: str = typer.Option("smollm2", help="smollm2 (embedded), instruct, base, a local path or a hub id."),
    question: str = typer.Option("inc_state", help="inc_state, inc_year, employee_count or hq_state."),
    tokens: int = typer.Option(2048, help="Prompt length in tokens, template and question included."),
    samples: int = typer.Option(6, help="Number of samples (synthetic filings, or the first records of --dataset)."),
    needle_position: float = typer.Option(0.5, help="Depth of the needle in the haystack, 0 (start) to 1 (end)."),
    dataset: Optional[Path] = typer.Option(None, help="JSONL file of your own samples (see README)."),
    output_dir: Path = typer.Option(Path("results"), help="Results go to OUTPUT_DIR/METHOD/MODEL_QUESTION_TOKENS.json."),
    save_samples: bool = typer.Option(False, help="Also write the per-sample audit file (.samples.jsonl)."),
    method: str = typer.Option("summed_attention", help="Scoring method."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (the probe's softmax is float32)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps ..."),
    batch_size: int = typer.Option(1, help="Samples per forward pass."),
    seed: int = typer.Option(0, help="Seed of the synthetic filings."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run (off by default)."),
    top: int = typer.Option(10, help="Rows of the printed top-heads table."),
) -> None:
    """Run one experiment and write its result JSON."""
    from ..experiments import check_args, detect as run

    check_args(None if dataset else question, tokens, samples, needle_position, batch_size)
    quiet_transformers()
    res = run(model=model, question=question, tokens=tokens, samples=samples, needle_position=needle_position,
              dataset=dataset, seed=seed, method=method, dtype=dtype, device=device, batch_size=batch_size,
              output_dir=output_dir, save_samples=save_samples, progress=True, trust_remote_code=trust_remote_code)
    r = res.record
    print_top(res.top(top), f"{r['model_key']} {r['question']} {r['total_tokens']} tokens, "
                            f"{r['samples_processed']} samples")
    print(f"wrote {res.path}")


def register(app: typer.Typer) -> None:
    app.command()(detect)
