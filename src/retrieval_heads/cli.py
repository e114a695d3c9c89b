"""The ``retrieval-heads`` command: a thin layer over the Python API.

Each subcommand lives in ``commands/<name>.py`` and adds itself with ``register(app)``.
Bad input ends with one line on stderr, ``error: ...``, and exit code 2; no traceback, no partial file.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import List, Optional

import typer

from . import commands
from .errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find the attention heads a language model uses to retrieve facts from a long context.")


@app.callback()
def _root() -> None:
    """Find the attention heads a language model uses to retrieve facts from a long context."""


INTERRUPTED = "error: interrupted; finished results are kept"


def main(argv: Optional[List[str]] = None) -> int:
    cmd = typer.main.get_command(app)
    try:
        rc = cmd.main(args=argv if argv is not None else sys.argv[1:], prog_name="retrieval-heads",
                      standalone_mode=False)
        if rc == 130:  # typer turns Ctrl-C into a silent exit code 130
            print(INTERRUPTED, file=sys.stderr)
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
        print(INTERRUPTED, file=sys.stderr)
        return 130


for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{commands.__name__}.{_info.name}").register(app)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
