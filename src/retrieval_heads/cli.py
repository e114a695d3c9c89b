"""The ``retrieval-heads`` command: a thin layer over the Python API.

Bad input ends with one line on stderr, ``error: ...``, and exit code 2; no traceback, no partial file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find the attention heads a language model uses to retrieve facts from a long context.")


def _quiet_transformers() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1") if os.environ.get("RETRIEVAL_HEADS_ONLINE") != "1" else None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.callback()
def _root() -> None:
    """Find the attention heads a language model uses to retrieve facts from a long context."""


def print_top(rows: list[tuple[str, float]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("head")
    table.add_column("score", justify="right")
    for i, (h, s) in enumerate(rows, 1):
        table.add_row(str(i), h, f"{s:.4f}")
    Console().print(table)


@app.command()
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
    from .experiments import check_args, detect as run

    check_args(None if dataset else question, tokens, samples, needle_position, batch_size)
    _quiet_transformers()
    res = run(model=model, question=question, tokens=tokens, samples=samples, needle_position=needle_position,
              dataset=dataset, seed=seed, method=method, dtype=dtype, device=device, batch_size=batch_size,
              output_dir=output_dir, save_samples=save_samples, progress=True, trust_remote_code=trust_remote_code)
    r = res.record
    print_top(res.top(top), f"{r['model_key']} {r['question']} {r['total_tokens']} tokens, "
                            f"{r['samples_processed']} samples")
    print(f"wrote {res.path}")


def main(argv: Optional[List[str]] = None) -> int:
    cmd = typer.main.get_command(app)
    try:
        rc = cmd.main(args=argv if argv is not None else sys.argv[1:], prog_name="retrieval-heads",
                      standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors: unknown option, a value of the wrong type
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted; finished results are kept", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
