"""Files of the model cache (:func:`retrieval_heads.models.cache_dir`): where it lives when ``HOME`` is empty,
whether a converted ``model.safetensors`` is whole, and the reason of a failed write in one line.

This module imports no other module of the package but ``errors``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from .errors import UserError, first_line


def user_cache_base() -> str:
    """``$XDG_CACHE_HOME`` (an absolute path; a relative one is ignored), else ``HOME/.cache``. An empty or root ``HOME`` (``expanduser`` then gives ``/``)
    falls back to the account's home directory; where that is root too, UserError: never ``/.cache``.

    >>> os.environ.get("XDG_CACHE_HOME") or user_cache_base().endswith(".cache")
    True
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # a relative one is invalid (XDG Base Directory spec): it would put the
        return xdg                  # cache, a 500 MB model, wherever the command happens to run
    home = os.environ.get("HOME", "")
    if home.strip().rstrip("/") == "":
        import pwd

        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = ""
    home = os.path.expanduser(home) if home.startswith("~") else home
    if home.rstrip("/") == "":
        raise UserError("HOME is empty or /, so there is no user cache folder; set RETRIEVAL_HEADS_CACHE (or "
                        "XDG_CACHE_HOME) to a writable folder")
    return os.path.join(home, ".cache")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole safetensors file (None when it is): its header must be readable JSON
    and its tensors must end exactly at the end of the file, as a truncated copy's do not. Reads the
    header only.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "m.safetensors"; _ = p.write_bytes(b"\\x02" + b"\\0" * 7)
    >>> safetensors_problem(p)
    'the header is cut short'
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a header"
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                return "the header is cut short"
            header = json.loads(f.read(n))
    except OSError as e:
        return e.strerror or str(e)
    except ValueError:
        return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not JSON"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    end = max((e for e in ends if isinstance(e, int)), default=0)
    if 8 + n + end != size:
        return f"{size} bytes where its tensors need {8 + n + end} (truncated?)"
    return None


def write_reason(e: BaseException) -> str:
    """A failed write's reason in words: an OSError's strerror, or the message inside a SafetensorError
    (``... IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })``)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    m = re.search(r'message: "([^"]+)"', str(e))
    return m[1] if m else first_line(e)
