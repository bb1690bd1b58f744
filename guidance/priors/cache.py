"""Where priors keep what they compute once (datasets, text embeddings), and how they write and read it.

The cache is a convenience, never a source of truth: a file that does not load (truncated
by a crash or a full disk, emptied, not a tensor file) is computed again and replaced, and a
cache folder that cannot be written only costs the computation next time. Files load
weights-only: nothing in the cache can run code.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$DREAM3D_CACHE`` if set, else ``~/.cache/dream3d``."""
    return Path(os.environ.get("DREAM3D_CACHE") or Path.home() / ".cache" / "dream3d")


def load_cached(path: Path) -> Any | None:
    """What ``save_atomic`` wrote to ``path``, or None when it is missing or does not load (then it is rebuilt)."""
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: this one is cut short or foreign
        reason = "truncated or not a tensor file"
    else:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            reason = f"{type(e).__name__} while loading"
    log.warning("warning: cache file %s does not load (%s); computing it again", path, reason)
    return None


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, synced, then renamed: readers never see half a file.

    Serialised in memory first, so that a failed write (a full disk) is an OSError naming ``path``;
    the previous file under ``path``, if any, is left as it was."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_cached(obj: Any, path: Path) -> None:
    """``save_atomic`` for a cache file: one that cannot be written (a full disk, a read-only folder) is a warning."""
    try:
        save_atomic(obj, path)
    except OSError as e:
        log.warning("warning: cannot write cache file %s (%s); it will be computed again next time", path, e.strerror)
