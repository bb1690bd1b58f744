"""Atomic file writes: a crash never leaves a half-written file under its final name.

A write goes to a temporary file beside the target, is synced, then renamed over it; a write
that fails (a full disk, a read-only folder) removes the temporary file and leaves the
previous version of the target as it was. The OSError it raises names the target.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The name of a temporary file a write makes (mkstemp's ".<stem>.<8 random characters>.tmp<suffix>"; the splats
# writer in representations/splat_ply.py names its own ".<name>.<8 characters>.tmp"): what a killed write leaves
LEFTOVER = r"\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (same suffix); renames it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    # mkstemp makes 0600 files; a finished file should have the permissions of any other new file
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _naming(e, path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, or a power cut could leave an empty file behind the name


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def _naming(error: OSError, path: Path) -> OSError:
    """The same error about ``path``, not about its temporary file (which is gone)."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))
