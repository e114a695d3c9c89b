"""``retrieval-heads export``: a result in the formats of other tools (Wu/HeadKV, QRHead, DuoAttention, KV heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export(
    result: Path = typer.Argument(..., help="A result JSON written by detect."),
    format: str = typer.Option(..., "--format", help="wu (needs .samples.jsonl), qrhead, duo or kv."),
    k: int = typer.Option(20, help="Heads in the qrhead head set."),
    kv_heads: Optional[int] = typer.Option(None, help="KV heads of the model (default: the result's record)."),
    out: Optional[str] = typer.Option(None, help="Write here (atomically) instead of printing."),
) -> None:
    """Write a result as Wu/HeadKV JSON, a QRHead head-set string, a DuoAttention TSV or a KV-head view."""
    from ..export import FORMATS, render
    from ..errors import UserError
    from ..io import atomic_write_text, given_path
    from ..results import load_result, samples_path
    from ._common import check_not_input

    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; choose from: {', '.join(FORMATS)}")
    out = None if out is None else given_path(out, "--out")
    if out is not None:
        check_not_input(out, [result, samples_path(result)])
    text = render(format, load_result(result), result, k, kv_heads)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command()(export)
