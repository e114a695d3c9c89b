"""Atomic writes (a temp file in the same folder, fsync, then rename over the target) and guarded JSON reads.

A reader (or a resumed sweep) sees either the old file, the new file, or no file; never half of one.
Every JSON file that may come from someone else (results, samples files, datasets, grids) is parsed with
:func:`parse_json`: too deep a nesting, an integer too long to convert, or a non-standard constant
(``NaN``, ``Infinity``) is one :class:`UserError`, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError

# The writer's temp files: ``.{target name}.rh-{8 random chars of mkstemp}.tmp`` beside the target. Only names
# of this exact form are ever removed as stale (see :func:`temp_target`); a user's ``.notes.tmp`` is not.
TEMP_TAG, TEMP_SUFFIX = ".rh-", ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)" + re.escape(TEMP_TAG) + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


def temp_target(name: str) -> str | None:
    """The target file name if ``name`` is a temp file of :func:`atomic_write_bytes`, else None.

    >>> temp_target(".m_inc_state_256.json.rh-k2x_9a0b.tmp"), temp_target(".notes.tmp")
    ('m_inc_state_256.json', None)
    """
    m = _TEMP_NAME.fullmatch(name)
    return m["target"] if m else None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_files([(path, data)])


def atomic_write_files(files: Sequence[tuple[str | os.PathLike, bytes]]) -> None:
    """Write several files as one: each goes to a synced temp file beside its target first, and only when
    all are written are they renamed into place, in the given order (put the file whose presence marks the
    work done last). A failure while writing (a full disk) leaves every target as it was and no temp file."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            path = Path(path)
            temps.append((_write_temp(path, data), path))
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        for tmp, _ in temps:
            _unlink_quietly(tmp)  # a no-op for those renamed into place


def _write_temp(path: Path, data: bytes) -> str:
    """A synced temp file ``.NAME.*.tmp`` beside ``path`` holding ``data``; its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _unlink_quietly(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` if it is a regular file (after links); OSError otherwise. A FIFO, a device
    (``/dev/zero``) or a socket named like a result, samples file, dataset or grid would block the reader or
    fill the memory; it is opened without blocking and refused before a byte is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def given_path(value: str | os.PathLike, option: str) -> Path:
    """``value`` as a Path; UserError for an empty string (``Path("")`` would silently mean the current
    folder). Give the CLI's raw string: a Path made from ``""`` can no longer be told from ``"."``."""
    if not str(value).strip():
        raise UserError(f"{option} is empty; give a path (use . for the current folder)")
    return Path(value)


def check_writable(folder: str | os.PathLike) -> None:
    """UserError unless ``folder`` exists as a writable directory or could be created; creates nothing.
    Called before any work, so that an unwritable output dir costs no computation."""
    folder = given_path(folder, "the output folder")
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"cannot write to {folder}: {os.strerror(errno.ENOTDIR)} ({p} is a file)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {folder}: {os.strerror(errno.EACCES)}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    atomic_write_bytes(path, jsonl_bytes(rows))


def json_bytes(obj: Any) -> bytes:
    """The text of a JSON file of ours (indented, one trailing newline)."""
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def jsonl_bytes(rows: Iterable[Any]) -> bytes:
    """The text of a JSONL file of ours (one compact object per line)."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")


MAX_JSON_DEPTH = 64  # far deeper than any file of ours; deep enough for any grid, result or dataset record


class JSONError(UserError):
    """A JSON text that cannot be read as data; the message is the reason alone (the caller names the file)."""


def _reject_constant(name: str):
    raise JSONError(f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JSONError(f"key {json.dumps(twice)[:40]} is given twice")
    return out


def parse_json(text: str | bytes, unique_keys: bool = False) -> Any:
    """``json.loads`` for untrusted text. Raises :class:`JSONError` (a UserError) with a short reason for
    malformed JSON, nesting deeper than :data:`MAX_JSON_DEPTH`, integers too long to convert (Python's
    digit limit) or beyond a float's range, floats that overflow to inf, and the constants NaN/Infinity; with ``unique_keys``, an
    object's key given twice (else the last one wins, as in ``json.loads``). A leading byte-order mark is
    dropped.

    >>> parse_json('{"a": [1, 2.5]}')
    {'a': [1, 2.5]}
    >>> parse_json('[' * 100 + ']' * 100)
    Traceback (most recent call last):
    ...
    retrieval_heads.io.JSONError: nested deeper than 64 levels
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).removeprefix(b"\xef\xbb\xbf")
    else:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as Windows editors write one: not data
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise JSONError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # int digit limit
        raise JSONError(str(e).split(";")[0].split(":")[0].strip() or "a number out of range") from None
    _check_depth(obj)
    return obj


def _finite_float(s: str) -> float:
    x = float(s)
    if x in (float("inf"), float("-inf")):
        raise JSONError(f"number {s[:20]}{'...' if len(s) > 20 else ''} is out of range")
    return x


_FLOAT_MAX = 1.7976931348623157e308


def _check_depth(obj: Any) -> None:
    """Nesting within :data:`MAX_JSON_DEPTH`, and every integer within a float's range (a larger one would
    raise OverflowError wherever it is used as a number, e.g. ``math.isfinite(10**400)``)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > MAX_JSON_DEPTH:
                raise JSONError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
        elif type(o) is int and not -_FLOAT_MAX <= o <= _FLOAT_MAX:
            raise JSONError(f"integer {str(o)[:20]}... ({len(str(abs(o)))} digits) is out of range")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


NAME_CHARS = re.compile(r"[A-Za-z0-9._+-]+")
MAX_NAME = 128


def check_name(value: Any, field: str) -> str:
    """``value`` if it can be part of a file name (a result's method, model_key and question are): a non-empty
    string of at most 128 characters from ``A-Za-z0-9._+-``, not starting with '.', without '..' (so no
    '/', '\\', hidden file or parent folder can come from it); else UserError naming ``field``."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{field}: expected a non-empty name, got {json.dumps(value)[:60]}")
    if len(value) > MAX_NAME or not NAME_CHARS.fullmatch(value) or value.startswith(".") or ".." in value:
        raise UserError(f"{field}: {json.dumps(value)[:60]} cannot name a file (use at most {MAX_NAME} of "
                        f"A-Za-z0-9._+-, not starting with '.', no '..')")
    return value


def safe_key(text: str) -> str:
    """``text`` (e.g. a local folder's name) turned into a name that passes :func:`check_name`: every other
    character becomes '_', runs of dots become '_', and leading dots go (empty: ``model``).

    >>> safe_key("my model (v2)"), safe_key(".hidden..x"), safe_key("Ünï")
    ('my_model__v2_', 'hidden_x', '_n_')
    """
    key = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._+-]", "_", text)).lstrip(".")[:MAX_NAME]
    return key or "model"
