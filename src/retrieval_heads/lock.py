"""The results-dir lock: one command at a time writes into a results folder.

``sweep`` and ``detect`` hold :func:`results_lock` on their ``--output-dir`` for the whole run: an exclusive
``fcntl.flock`` on the directory itself (opened ``O_RDONLY | O_DIRECTORY``), so deleting or replacing a file
inside it cannot release it, and the kernel drops it when its holder dies (even by SIGKILL): it is never
stale. ``export --out``, ``ablate`` and ``report`` write one file or folder; they hold :func:`writing_into`
while they compute and write: an exclusive flock on the folder they write into and a shared one on its
parent. So they never run while a sweep or detect holds either folder (a result's folder is
``OUTPUT_DIR/METHOD``), nor two of them into one folder, and a sweep or detect does not start while they
write. A command that finds the lock taken stops at once (it does not wait) with one line naming
the holder, and writes nothing.

Holding the folder, a writer removes what a killed writer of the same target left there
(:mod:`retrieval_heads.leftovers`).

``{dir}/.sweep.lock`` is only a note of the exclusive holder's pid and command, for that line: written as a
new file (``O_CREAT | O_EXCL | O_NOFOLLOW``, an old note unlinked first) so that nothing is ever written
through a link (a symbolic link there is an error), and removed on leaving, with any folder the lock created
and left empty. A note that cannot be written (a full disk) is one line and leaves no empty note behind.

>>> import tempfile
>>> with results_lock(tempfile.mkdtemp(), "detect") as note:
...     note.read_text().split()[1]
'detect'
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import UserError
from .io import given_path
from .leftovers import remove_stale_temps

LOCK_NAME = ".sweep.lock"


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, deepest first."""
    out = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _busy(folder: Path, option: str) -> UserError:
    pid, command = _holder(folder / LOCK_NAME)
    return UserError(f"another {command} (pid {pid}) is running on {folder}; wait for it to finish or use another "
                     f"{option}")


@contextmanager
def results_lock(output_dir: str | Path, command: str = "sweep", own: list[Path] | None = None,
                 option: str = "--output-dir") -> Iterator[Path]:
    """Hold the exclusive lock on ``output_dir`` for the block; UserError at once if another process holds it
    (or holds :func:`writing_into` there). Creates ``output_dir``; on leaving, removes the note and any folder
    it created that stayed empty. With ``own`` (the result and samples paths the holder may write), the
    result folders are checked and the temp files a killed writer left for those files are removed once the
    lock is held."""
    import fcntl

    from .results import check_result_folder

    if isinstance(output_dir, str):
        given_path(output_dir, option)
    out = Path(output_dir)
    note = out / LOCK_NAME
    created = _missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    mine = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, option) from None
        mine = _write_note(note, command)
        for folder in sorted({p.parent for p in own or ()}):
            check_result_folder(folder)  # before its temp files are cleaned or any work is done
        for p in own or ():
            if p.is_dir() and not p.is_symlink():  # found only when the result is written, after computing
                raise UserError(f"{p} is a folder where a result file goes; move it away or use another {option}")
        if own:
            remove_stale_temps(own)
        yield note
    finally:
        try:
            if mine is not None:  # the note is ours (nobody replaced it): it goes with the lock
                st = os.stat(note, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == mine:
                    os.unlink(note)
        except OSError:
            pass
        for d in created:  # deepest first; a folder that holds anything stays
            try:
                os.rmdir(d)
            except OSError:
                break
        os.close(fd)  # releases the lock, after the clean-up


@contextmanager
def writing_into(target: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on the folder ``target`` is written into and a shared one on its parent (those
    that exist) for the block: UserError at once if a sweep, a detect or another writer holds them (a result
    file's folder is ``OUTPUT_DIR/METHOD``, so its parent is the dir a sweep locks)."""
    import fcntl

    target = Path(target).absolute()
    with ExitStack() as stack:
        for folder, how in ((target.parent, fcntl.LOCK_EX), (target.parent.parent, fcntl.LOCK_SH)):
            if folder == target or folder == target.parent and how == fcntl.LOCK_SH or not folder.is_dir():
                continue
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # unreadable: the write will say so
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(folder, option) from None
        yield


def holds_output_dir(command: str):
    """Decorate a function with an ``output_dir`` argument: when it is given, the function runs holding
    :func:`results_lock` there (checked writable first, so that the line names the reason)."""
    import functools
    import inspect

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            output_dir = signature.bind(*args, **kwargs).arguments.get("output_dir")
            if output_dir is None:
                return fn(*args, **kwargs)
            from .io import check_writable

            check_writable(output_dir)
            with results_lock(output_dir, command):
                return fn(*args, **kwargs)
        return run
    return wrap


def _holder(note: Path) -> tuple[str, str]:
    """(pid, command) from the lock holder's note; '?' and 'retrieval-heads command' where unknown (no note,
    unreadable, a link, or a holder of :func:`writing_into`, which writes no note)."""
    try:
        fd = os.open(note, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return "?", "retrieval-heads command"
    try:
        words = os.read(fd, 64).decode("ascii", "replace").split()
    except OSError:
        words = []
    finally:
        os.close(fd)
    pid = words[0] if words and words[0].isdigit() else "?"
    command = words[1] if len(words) > 1 and words[1] in ("sweep", "detect") else "retrieval-heads command"
    return pid, command


def _write_note(note: Path, command: str) -> tuple[int, int]:
    """Write ``PID COMMAND`` to ``note`` as a new file; returns its (device, inode). A failed write (a full
    disk) removes the new file: no empty note is left."""
    try:
        st = os.stat(note, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"cannot write {note}: {e.strerror or e}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UserError(f"{note} is a symbolic link; remove it (a sweep writes its pid there, never through a link)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{note} is not a regular file; remove it")
    try:
        if st is not None:
            os.unlink(note)  # a hard link elsewhere keeps its content: only this name goes
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise UserError(f"{note} was created by someone else while this {command} took the lock; retry") from None
    except OSError as e:
        raise UserError(f"cannot write {note}: {e.strerror or e}") from None
    try:
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        _unlink_quietly(note)
        raise UserError(f"cannot write {note}: {e.strerror or e}") from None
    os.close(fd)
    return st.st_dev, st.st_ino


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
