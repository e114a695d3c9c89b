"""What the commands print while they work: status lines for the long silent phases, progress bars only on a
terminal, counts with the right plural.

A progress bar redraws itself with carriage returns; written to a file or a pipe it leaves them there, so
bars are drawn only when stderr is a terminal (:func:`bar_disabled`). A long phase that moves no bar is
announced by :func:`phase` on a terminal while it runs, and erased after, like a bar: bad input found after
it (a prompt too long for the model just loaded) still ends with exactly one line, the error.

>>> plural(1, "question"), plural(4, "question"), plural(2, "sample(s)")
('1 question', '4 questions', '2 sample(s)')
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


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


ERASE = "\r\x1b[2K"  # back to the start of the line, and clear it


@contextmanager
def phase(text: str, enabled: bool = True, bar: Any = None) -> Iterator[None]:
    """Say on a terminal what a long, silent phase is doing (``text``, e.g. "loading model smollm2 ...").

    On a terminal ``text`` is shown while the phase runs (as the description of ``bar``, a live tqdm bar,
    when one is given), and erased when it ends, as a progress bar is: an error that follows (bad input found
    once the model is loaded) is still the only line left. In a file or a pipe nothing is written. Nothing
    either when not ``enabled``."""
    if not (enabled and is_terminal(sys.stderr)):
        yield
        return
    if bar is not None and not getattr(bar, "disable", True):
        before = bar.desc
        bar.set_description_str(text)
        try:
            yield
        finally:
            bar.set_description_str(before)
        return
    sys.stderr.write(text)
    sys.stderr.flush()
    try:
        yield
    finally:
        sys.stderr.write(ERASE)
        sys.stderr.flush()
