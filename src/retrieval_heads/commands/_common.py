"""Helpers shared by the subcommands."""

from __future__ import annotations



def quiet_transformers() -> None:
    """No transformers warnings or loading bars between our progress bar and table."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
