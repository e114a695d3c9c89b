"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError
from ..hf import quiet_transformers  # noqa: F401  (the subcommands read it from here)


def flag(parser, name: str, default: bool | None, help: str) -> argparse.Action:
    """``--name/--no-name``; with ``default=None`` the option is tri-state (None: not given). ``parser``: a
    parser or one of its argument groups."""
    action = parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default)
    action.help = help  # set after: Python 3.10's BooleanOptionalAction appends its own "(default: ...)"
    return action


def values(parser, name: str, metavar: str, help: str, allowed=None) -> argparse.Action:
    """An option that takes one value or several, space- or comma-separated (commas are split by the API or
    the command), or repeated: ``--tokens 1024 2048``, ``--tokens 1024,2048``, ``--tokens 1024 --tokens 2048``.
    None when not given (a default list would be extended, not replaced, by what is given). ``allowed``: see
    :func:`allow`."""
    action = parser.add_argument(name, nargs="+", action="extend", metavar=metavar, default=None, help=help)
    return allow(action, allowed)


def allow(action: argparse.Action, allowed) -> argparse.Action:
    """Show an option's allowed values at the end of its help: a tuple, or ``"module:NAME"`` (a tuple or a
    registry), read only when the help is shown. The API checks the values, with its own message."""
    if allowed is not None:
        action.allowed = allowed
    return action


def add_options(command: str, groups: dict) -> dict[str, argparse.Action]:
    """The flags of ``command`` generated from the spec (:mod:`retrieval_heads.spec`): every setting the
    command takes, in the group of its own title (else the first of ``groups``, {title: group}), with its
    type, default, allowed values and help. In ``sweep`` a grid setting is its grid key
    (``--models``), default None (a flag not given leaves the grid file's setting), the grid's default in the
    help. Returns {dest: action}."""
    from ..spec import FIELDS, default, option, setting, value_type

    first = next(iter(groups.values()))
    out = {}
    for name in FIELDS:
        s = setting(name)
        if command not in s.commands:
            continue
        in_grid = command == "sweep" and s.grid is not None
        dest, flag_ = option(name, command)
        group = groups.get(s.group, first)
        text = s.help.get(command, FIELDS[name].description)
        value = None if in_grid else default(name, command)
        words = s.default_text.get(command)
        if words is None and in_grid:
            words = _shown(default(name, "grid"))
        many = s.many if in_grid else s.several
        if words is None and many and value is not None:  # a list option's default is shown, never extended
            words = _shown(value)
        if words is not None and "[default" not in text:
            text = f"{text} [default: {words}]"
        kind = value_type(name)
        if kind is bool:
            action = flag(group, flag_, value, text)
        elif many:
            action = values(group, flag_, s.metavar or name.upper(), text, s.allowed)
        else:
            action = allow(group.add_argument(flag_, *s.aliases, dest=dest, default=value, metavar=s.metavar,
                                              type=kind if kind in (int, float) else None, help=text), s.allowed)
        out[dest] = action
    return out


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def groups(parser: argparse.ArgumentParser, *titles: str) -> list:
    """Argument groups of ``parser`` under these titles (experiment, methods, output, engine), in order."""
    return [parser.add_argument_group(t) for t in titles]


def print_top(rows: list[tuple], title: str) -> None:
    """rows: (head, score) or (head, score, lift or None); a lift column is shown when any row has one. The
    title is one line above the rows (never wrapped to the table's width); on a terminal the rows are a drawn
    table, otherwise (a file, a pipe) plain aligned lines, no box characters."""
    import sys

    from ..console import is_terminal

    with_lift = any(len(r) > 2 and r[2] is not None for r in rows)
    if not is_terminal(sys.stdout):
        print(title)
        head = ["rank", "head", "score"] + (["lift"] if with_lift else [])
        body = [[str(i), r[0], f"{r[1]:.4f}"] + ([("—" if r[2] is None else f"{r[2]:.2f}x")] if with_lift else [])
                for i, r in enumerate(rows, 1)]
        widths = [max(len(x[c]) for x in [head] + body) for c in range(len(head))]
        for line in [head] + body:
            print("  ".join(x.rjust(w) if c != 1 else x.ljust(w) for c, (x, w) in enumerate(zip(line, widths))).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()  # the title goes above it, whole: as a table title it wraps to the table's width
    table.add_column("rank", justify="right")
    table.add_column("head")
    table.add_column("score", justify="right")
    if with_lift:
        table.add_column("lift", justify="right")
    for i, r in enumerate(rows, 1):
        cells = [str(i), r[0], f"{r[1]:.4f}"]
        if with_lift:
            cells.append("—" if r[2] is None else f"{r[2]:.2f}x")
        table.add_row(*cells)
    console = Console()
    console.print(title, style="italic", highlight=False)
    console.print(table)


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
    what = result_file_kind(out)
    if what:  # another experiment's result would be lost, replaced by an export or a curve
        raise UserError(f"{flag} {out} holds {what}; an output never replaces one, choose another file")


def result_file_kind(path: str | os.PathLike) -> str | None:
    """What of ``detect``'s or ``sweep``'s output ``path`` holds ("a result", "a samples file", "an attention
    file"), or None: a missing file, or any other file (which an explicit --out may replace)."""
    from ..io import JSONError, parse_json, read_regular

    p = Path(path)
    if not p.is_file() or p.is_symlink():  # a link itself is replaced, never what it points to
        return None
    if p.name.endswith(".samples.jsonl"):
        return "a samples file"
    if p.name.endswith(".attention.npz"):
        return "an attention file"
    if p.suffix.lower() != ".json" or p.stat().st_size > 64 << 20:
        return None
    try:
        obj = parse_json(read_regular(p))
    except (OSError, JSONError, UnicodeDecodeError):
        return None
    return "a result" if isinstance(obj, dict) and ("head_rankings" in obj or "checksum" in obj) else None
