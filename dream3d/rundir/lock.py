"""An exclusive, process-held lock on a folder: one writer at a time.

``fcntl.flock`` on a lock file inside the folder: the kernel drops the lock when the
holding process exits, however it ends (a SIGKILL included), so no stale lock is ever
left behind. The holder writes its pid and command into the file, for the error a
refused process shows. Re-entrant within a thread (``resume`` locks, then trains,
which locks again); another thread or process is refused. The lock file is opened without
following a link (O_NOFOLLOW) and must be a regular file: a folder from someone else cannot
make the lock empty or create a file elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_held = threading.local()


class LockError(RuntimeError):
    """The folder's lock file can be neither created nor opened (a missing or read-only folder)."""


class FolderBusy(LockError):
    """Another process (or thread) holds the folder's lock; ``holder`` says who, or is empty."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is in use by {holder or 'another process'}")
        self.folder, self.holder = folder, holder


def holder_line() -> str:
    """This process, as the lock file records it: ``pid 123 (dream3d resume runs/x)``."""
    argv = list(sys.argv) or ["python"]
    program = Path(argv[0])
    # `python -m dream3d` runs dream3d/__main__.py: name the package, as the console script would
    argv[0] = program.parent.name if program.name == "__main__.py" else program.name or "python"
    return f"pid {os.getpid()} ({' '.join(argv)[:200]})"


def holds(folder: Path, name: str = ".lock") -> bool:
    """Whether this thread holds ``folder``'s lock."""
    return str(Path(folder).resolve() / name) in getattr(_held, "counts", {})


@contextmanager
def folder_lock(folder: Path, name: str = ".lock") -> Iterator[None]:
    """Holds ``folder/name`` exclusively for the block; raises FolderBusy at once if it is held,
    LockError if the lock file can be neither created nor opened."""
    key = str(Path(folder).resolve() / name)
    counts: dict[str, int] = getattr(_held, "counts", None) or {}
    _held.counts = counts
    if key in counts:
        counts[key] += 1
        try:
            yield
        finally:
            counts[key] -= 1
        return
    try:
        fd = _open(Path(key))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockError(f"refusing {Path(folder) / name}: the lock file is a symbolic link") from None
        raise LockError(f"cannot lock {folder}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LockError(f"refusing {Path(folder) / name}: the lock file is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(Path(folder), _read_holder(fd)) from None
        _write_holder(fd, holder_line())
        counts[key] = 1
        try:
            yield
        finally:
            del counts[key]
            _write_holder(fd, "")
    finally:
        os.close(fd)  # releases the lock


def _open(path: Path) -> int:
    # no O_TRUNC: a refused opener must not erase the holder's line; O_NONBLOCK: a FIFO must not block the open
    flags = os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not path.exists():
            raise
        return os.open(path, os.O_RDONLY | flags)  # flock needs no write access: a read-only folder still locks


def _read_holder(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


def _write_holder(fd: int, line: str) -> None:
    # the holder line is a courtesy for the refused process; a read-only lock file just goes without it
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
    except OSError:
        pass
