"""The ``retrieval-heads`` command: a thin layer over the Python API.

Each subcommand lives in ``commands/<name>.py``: ``register(commands)`` adds its parser (argparse) and the
function that runs it. Options that take several values take them natively (``--tokens 1024 2048``).
Bad input, usage errors included, ends with one line on stderr, ``error: ...``, and exit code 2; no usage
block, no traceback, no partial file.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import re
import sys
from typing import List, Optional

from . import commands
from .errors import UserError

DESCRIPTION = "Find the attention heads a language model uses to retrieve facts from a long context."
INTERRUPTED = "error: interrupted; finished results are kept"

# argparse's messages (what Parser.error receives) -> the command's own; anything else passes unchanged
_USAGE_MESSAGES = [
    (r"argument (?P<opt>\S+): expected at least one argument", "{opt} needs at least one value"),
    (r"argument (?P<opt>\S+): expected one argument", "Option '{opt}' requires an argument."),
    (r"argument (?P<opt>\S+): invalid (?P<type>int|float) value: (?P<value>.*)",
     "Invalid value for '{opt}': {value} is not a valid {kind}."),
    (r"argument (?P<opt>[^\s/]+)\S*: ignored explicit argument .*", "Option '{opt}' does not take a value."),
    (r"argument COMMAND: invalid choice: '?(?P<value>[^'\s]*)'?.*", "No such command '{value}'."),
]


def _usage_message(message: str) -> str:
    for pattern, text in _USAGE_MESSAGES:
        m = re.fullmatch(pattern, message.strip())
        if m:
            kind = {"int": "integer", "float": "number"}.get(m.groupdict().get("type") or "", "")
            return text.format(**m.groupdict(), kind=kind)
    m = re.fullmatch(r"the following arguments are required: (?P<names>.*)", message.strip())
    if m:
        first = m["names"].split(", ")[0].split("/")[0]
        return f"Missing option '{first}'." if first.startswith("-") else f"Missing argument '{first}'."
    return " ".join(message.split())


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default (``[default: 512]``), unless the default is None or the help
    already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.option_strings and default not in (None, argparse.SUPPRESS) and "[default" not in text:
            shown = ("on" if default else "off") if isinstance(default, bool) else default
            text += "  [default: " + str(shown).replace("%", "%%") + "]"
        return text


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors raise UserError (one line, exit 2) instead of printing a usage
    block; options are never abbreviated. The subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(_usage_message(message))


def build_parser() -> Parser:
    parser = Parser(prog="retrieval-heads", description=DESCRIPTION)
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(subcommands)
    parser.subcommands = subcommands.choices  # name -> its parser
    return parser


def _unexpected(parser: Parser, extra: List[str], argv: List[str], command: Optional[str]) -> str:
    """The message for what no option or argument took: the first unknown option (with the close names of
    the options of the parser it was given to), else the stray values."""
    first = extra[0]
    if not (first.startswith("-") and len(first) > 1):
        values = []
        for a in extra:
            if a.startswith("-") and len(a) > 1:
                break
            values.append(a)
        return f"Got unexpected extra argument(s) ({' '.join(values)})"
    if command is not None and first in argv[argv.index(command) + 1:]:
        parser = parser.subcommands[command]
    name = first.split("=", 1)[0]
    close = sorted(difflib.get_close_matches(name, [s for a in parser._actions for s in a.option_strings
                                                    if s.startswith("--") and s != "--help"]))
    return f"No such option: {name}" + (f" (Possible options: {', '.join(close)})" if close else "")


def parse(argv: List[str]) -> argparse.Namespace:
    """The parsed command line (``args.run(args)`` runs it); UserError for any usage error. ``--help``
    prints the help and raises SystemExit(0)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UserError(_unexpected(parser, extra, argv, args.command))
    if args.command is None:
        raise UserError("Missing command.")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    try:
        try:
            args = parse(list(sys.argv[1:] if argv is None else argv))
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        args.run(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
