"""What a writer killed by SIGKILL leaves behind, and how the next writer of the same target puts it right.

Every writer builds its output beside the target and renames it into place, so a kill leaves the target
whole (old or new) plus a hidden temp: a file ``.NAME.rh-XXXXXXXX.tmp`` (:func:`retrieval_heads.io.temp_target`)
or, for a report folder, ``.NAME.XXXXXXXX.tmp`` (the new report being built) or ``.NAME.old.XXXXXXXX.tmp``
(the earlier report moved aside, only where the folder cannot be exchanged atomically). The next writer of
the same target, holding the lock on its folder (:mod:`retrieval_heads.lock`), removes those of its own
target's names and nothing else: :func:`remove_stale_temps` for files, :func:`recover_folder` for a report
folder, which first puts an earlier report back in place if the kill left the folder missing.

A report folder is replaced with :func:`exchange` (``renameat2(RENAME_EXCHANGE)``: the new folder and the
earlier one swap names in one step), so there is no moment without a report at its name; where the system
lacks it, the earlier folder is moved aside first and restored by the next run if a kill comes between.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from .io import temp_target


def remove_stale_temps(files: list[Path]) -> list[Path]:
    """Remove the temp files that a writer killed between write and rename left for ``files``: only names
    of the writer's own pattern (``io.temp_target``) whose target is one of ``files``, in their folders.
    Returns what was removed."""
    by_folder: dict[Path, set[str]] = {}
    for f in files:
        by_folder.setdefault(f.parent, set()).add(f.name)
    removed = []
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there (yet)
            continue
        for e in entries:
            if temp_target(e.name) in names and e.is_file(follow_symlinks=False):
                Path(e.path).unlink(missing_ok=True)
                removed.append(Path(e.path))
    return removed


def folder_temps(out: Path) -> tuple[list[Path], list[Path]]:
    """(new, old): the temp folders of a report at ``out``, being built (``.NAME.XXXXXXXX.tmp``) and moved
    aside (``.NAME.old.XXXXXXXX.tmp``), oldest first. ``mkdtemp`` names: 8 of ``a-z0-9_``."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?P<old>old\.)?[a-z0-9_]{8}\.tmp")
    new, old = [], []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return [], []
    for e in sorted(entries, key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns):
        m = pattern.fullmatch(e.name)
        if m and e.is_dir(follow_symlinks=False):
            (old if m["old"] else new).append(Path(e.path))
    return new, old


def recover_folder(out: str | os.PathLike) -> bool:
    """Put right what a killed report write left at ``out``: if ``out`` is missing and an earlier report was
    moved aside, it goes back to its name; then every temp folder of ``out`` is removed. Call it holding the
    lock on ``out``'s folder. Returns whether an earlier report was restored."""
    out = Path(out)
    new, old = folder_temps(out)
    restored = False
    if old and not os.path.lexists(out):
        os.rename(old.pop(), out)  # the latest moved aside
        restored = True
    for d in new + old:
        shutil.rmtree(d, ignore_errors=True)
    return restored


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the names of ``a`` and ``b`` (both exist) in one step, ``renameat2(RENAME_EXCHANGE)``; False
    where the system or file system does not offer it (then nothing changed), OSError on another failure."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))
