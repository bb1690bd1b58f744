"""A finished (or stopped) run as every front end sees it: the API returns it, the web app lists and
shows it, the batch report draws its preview. One type, read from the run folder alone, so the
record of a run is the same whoever made it and whoever reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    """One run folder: ``files`` maps an export kind ("glb", "obj", "ply", "video", "splats"; "p{i}/glb"
    per particle) to its file, ``summary`` is summary.json, ``preview`` the newest preview image."""

    run_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    preview: Path | None = None

    @classmethod
    def load(cls, run_dir: Path) -> Result:
        """The run folder's record. The export's files are the ones summary.json lists that are there,
        in the folder's export/ (symlinks resolved: a crafted summary cannot name a file elsewhere); a
        summary that cannot be read counts as empty, so one damaged folder does not hide the others."""
        run_dir = Path(run_dir)
        summary = _summary(run_dir / "summary.json")
        listed = summary.get("files")
        files = {}
        for kind, relative in (listed.items() if isinstance(listed, dict) else ()):
            path = run_dir / str(relative)
            if path.is_file() and _inside(path, run_dir / "export"):
                files[str(kind)] = path
        return cls(run_dir, files, summary, latest_preview(run_dir))


def latest_preview(run_dir: Path) -> Path | None:
    """The newest ``previews/step_*.png`` of a run folder, or None before the first preview."""
    previews = sorted((Path(run_dir) / "previews").glob("step_*.png"))
    return previews[-1] if previews else None


def _summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):  # a NUL byte or a name too long for the file system
        return False
