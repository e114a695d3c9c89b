"""The ``retrieval-heads`` command: a thin layer over the Python API.

Each subcommand lives in ``commands/<name>.py``: ``register(commands)`` adds its parser (argparse) and the
function that runs it; they are listed in workflow order (:data:`COMMANDS`). Options that take several
values take them natively (``--tokens 1024 2048``). Bad input, usage errors included, ends with one line on
stderr, ``error: ...`` (argparse's own message for a usage error; a parameter named by its flag), and exit
code 2; no usage block, no traceback, no partial file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from . import __version__, commands
from .errors import UserError
from .spec import cli_message

DESCRIPTION = "Find the attention heads a language model uses to retrieve facts from a long context."
INTERRUPTED = "error: interrupted; finished results are kept"
COMMANDS = ("detect", "sweep", "report", "ablate", "export")  # workflow order; any other module of commands/ after
EPILOG = """workflow:
  retrieval-heads detect --tokens 512 --samples 16          one experiment on the embedded model
  retrieval-heads sweep --models smollm2 --tokens 1024 2048  a grid of experiments, resumable
  retrieval-heads report results                             tables, heatmaps, rank stability (HTML)
  retrieval-heads ablate results/summed_attention/smollm2_inc_state_512.json
  retrieval-heads export results/summed_attention/smollm2_inc_state_512.json --format qrhead

Run `retrieval-heads COMMAND --help` for a command's options and examples."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's help ends with its allowed values (an action's
    ``allowed``: a tuple, or ``"module:NAME"``, a tuple, a registry or a function giving one, read only when
    the help is shown) and its default (``[default: 512]``), unless the default is None or the help already
    names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        allowed = getattr(action, "allowed", None)
        if allowed is not None:  # before a default the help names itself, else at the end
            shown = "Allowed: " + ", ".join(map(str, _resolve(allowed))).replace("%", "%%") + "."
            at = text.find(" [default")
            text = f"{text[:at]} {shown}{text[at:]}" if at >= 0 else f"{text} {shown}"
        default = action.default
        if action.option_strings and default not in (None, argparse.SUPPRESS) and "[default" not in text:
            shown = ("on" if default else "off") if isinstance(default, bool) else default
            text += "  [default: " + str(shown).replace("%", "%%") + "]"
        return text


def _resolve(allowed) -> list:
    if isinstance(allowed, str):
        module, _, name = allowed.partition(":")
        allowed = getattr(importlib.import_module(module), name)
        return list(allowed() if callable(allowed) else allowed)
    return list(allowed)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors raise UserError (one line, exit 2) instead of printing a usage
    block; options are never abbreviated. The subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(" ".join(message.split()))


def build_parser() -> Parser:
    parser = Parser(prog="retrieval-heads", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    others = sorted(i.name for i in pkgutil.iter_modules(commands.__path__)
                    if not i.name.startswith("_") and i.name not in COMMANDS)
    for name in COMMANDS + tuple(others):
        importlib.import_module(f"{commands.__name__}.{name}").register(subcommands)
    return parser


def parse(argv: List[str]) -> argparse.Namespace:
    """The parsed command line (``args.run(args)`` runs it); UserError for any usage error. ``--help`` and
    ``--version`` print and raise SystemExit(0)."""
    return build_parser().parse_args(argv)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a scheduler's stop), raised where the process is, as Ctrl-C is: the writes in
    progress remove their temp files and the locks their notes, finished results are kept."""


def _terminated(signum, frame):
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    import signal
    import threading

    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # never another program's own handler
    if ours:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return _run(argv)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(argv: Optional[List[str]]) -> int:
    try:
        try:
            args = parse(list(sys.argv[1:] if argv is None else argv))
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        args.run(args)
        return 0
    except UserError as e:  # a parameter's error names its flag (spec.cli_message)
        print(f"error: {single_line(cli_message(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(INTERRUPTED, file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (OSError, RuntimeError) as e:  # a path no system call can take, wherever it is first used
        why = unusable_path(e)
        if why is None:
            raise
        print(f"error: {single_line(why)}", file=sys.stderr)
        return 2


def unusable_path(e: BaseException) -> str | None:
    """The one-line reason for a path given by the user that no system call can take (a name or path too long
    for the file system, a loop of symbolic links), or None for any other error. Found wherever the path is
    first used (``Path.is_dir`` raises for them), before anything is written: writes are atomic.

    >>> unusable_path(OSError(36, "File name too long", "x" * 300))[:40]
    'cannot use the path xxxxxxxxxxxxxxxxxxxx'
    """
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        path, reason = str(e.filename), e.strerror
    elif type(e) is RuntimeError and str(e).startswith("Symlink loop from "):  # Path.resolve(), Python < 3.13
        path, reason = str(e).removeprefix("Symlink loop from ").strip("'"), "a loop of symbolic links"
    else:
        return None
    shown = path if len(path) <= 200 else f"{path[:120]}...{path[-60:]} ({len(path)} characters)"
    return f"cannot use the path {shown}: {reason}"


_BREAKS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029) if c != 0x09}


def single_line(message: str) -> str:
    """``message`` with line breaks and other control characters escaped (``\\n``), so that an error naming a
    path with a newline in it stays one line.

    >>> single_line("cannot read /tmp/a\\nb")
    'cannot read /tmp/a\\\\nb'
    """
    return message.translate(_BREAKS)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
