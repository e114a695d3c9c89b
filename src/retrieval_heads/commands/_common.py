"""Helpers shared by the subcommands."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


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


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: ``os.path.samefile`` where both exist (links, hard links), else equal
    resolved paths."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def check_not_input(out: str | os.PathLike, inputs, flag: str = "--out") -> None:
    """UserError if ``out`` is one of ``inputs`` (None entries are skipped): an output never replaces what
    was read."""
    for i in inputs:
        if i is not None and same_file(out, i):
            raise UserError(f"{flag} {out} is an input ({i}); choose another file")
