"""Where priors keep what they compute once (datasets, text embeddings), and how they write it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def cache_root() -> Path:
    """``$DREAM3D_CACHE`` if set, else ``~/.cache/dream3d``."""
    return Path(os.environ.get("DREAM3D_CACHE") or Path.home() / ".cache" / "dream3d")


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renames it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
