"""What the commands print while they work: status lines for the long silent phases, progress bars only on a
terminal, counts with the right plural.

A progress bar redraws itself with carriage returns; written to a file or a pipe it leaves them there, so
bars are drawn only when stderr is a terminal (:func:`bar_disabled`). Status lines (:func:`status`) are plain
lines on stderr, fine in a log file.

>>> plural(1, "question"), plural(4, "question"), plural(2, "sample(s)")
('1 question', '4 questions', '2 sample(s)')
"""

from __future__ import annotations

import sys
from typing import TextIO


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, plural unless n is 1 (``many``, default word + "s"; a word ending in "(s)" stays)."""
    if word.endswith("(s)"):
        return f"{n} {word}"
    return f"{n} {word if n == 1 else (many or word + 's')}"


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, captured output, closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def bar_disabled(progress: bool) -> bool:
    """tqdm's ``disable`` for a bar on stderr: off unless ``progress`` is asked for and stderr is a terminal."""
    return not (progress and is_terminal(sys.stderr))


def status(text: str, enabled: bool = True) -> None:
    """One plain line on stderr saying what a long, silent phase is doing (loading a model, saving attention
    rows); nothing when not ``enabled`` (``--no-progress``)."""
    if enabled:
        print(text, file=sys.stderr, flush=True)
