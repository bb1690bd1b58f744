"""The run-folder rule: everything dream3d writes, deletes or reads in a run folder is a regular file or a
folder inside that run folder, after resolving links (docs/security.md#the-run-folder-rule).

A run folder may come from someone else (a shared disk, a copied or downloaded run), so any name in it may
be a symlink to anywhere. ``inside`` checks a path below a run folder one name at a time and refuses, in one
RunDirError line naming the link, any that leads outside; a link that stays inside is followed. Readers
open the checked file with O_NOFOLLOW and take only a regular file (``read_bytes``); writers rename a
temporary file over the name (dream3d.rundir.atomic), which replaces a link rather than writing through it; the lock
file opens with O_NOFOLLOW (dream3d.rundir.lock); cleanup deletes only ``own_files``: regular files, not links, in a
checked folder, under a name dream3d gives.

The check is made when dream3d uses a path: a folder that another program changes while dream3d works in it
is beyond this rule (the run's lock keeps dream3d's own processes apart, not other programs).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from dream3d.errors import UserError


class RunDirError(UserError, ValueError):
    """A folder is not a usable run; the message is one line."""


def inside(root: Path, path: Path) -> Path:
    """``path`` (``root`` joined with plain names) once no name of it below ``root`` is a link that leads
    outside ``root``; raises RunDirError naming the first such link."""
    root, path = Path(root), Path(path)
    real_root = _resolve(root, root)
    current = root
    for name in path.relative_to(root).parts:
        current = current / name
        if current.is_symlink() and not _resolve(current, root).is_relative_to(real_root):
            raise RunDirError(f"refusing {current}: it is a link to {os.readlink(current)}, outside the run folder {root}")
    if not _resolve(path, root).is_relative_to(real_root):  # a ".." name
        raise RunDirError(f"refusing {path}: it lies outside the run folder {root}")
    return path


def folder(root: Path, path: Path) -> Path:
    """``path`` checked by ``inside``, made (with its parents) if missing."""
    inside(root, path).mkdir(parents=True, exist_ok=True)
    return path


def read_bytes(root: Path, path: Path) -> bytes | None:
    """The bytes of the regular file at ``path`` inside ``root``, or None when nothing is there.

    RunDirError for a link out, or for anything but a regular file (a FIFO would block the read)."""
    inside(root, path)
    try:
        fd = os.open(_resolve(path, root), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunDirError(f"refusing {path}: it is not a regular file")
        return f.read()


def own_files(root: Path, path: Path, pattern: str) -> list[Path]:
    """The regular files (not links) directly in the folder ``path`` inside ``root`` whose whole name matches
    ``pattern``: the files dream3d may delete there. A missing folder has none."""
    try:
        entries = list(os.scandir(inside(root, path)))
    except (FileNotFoundError, NotADirectoryError):
        return []
    name = re.compile(pattern)
    return [Path(path) / e.name for e in entries if name.fullmatch(e.name) and e.is_file(follow_symlinks=False)]


def _resolve(path: Path, root: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop
        raise RunDirError(f"refusing {path}: a link in it does not resolve (a loop), in the run folder {root}") from None
