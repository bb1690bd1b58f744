"""A finished (or stopped) run as every front end sees it: the API returns it, the web app lists and
shows it, the batch report draws its preview. One type, read from the run folder alone, so the
record of a run is the same whoever made it and whoever reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dream3d.rundir import confine
from dream3d.rundir.folder import read_summary


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
        """The run folder's record, read under the run-folder rule (dream3d.rundir.confine). The export's files are
        the ones summary.json lists that are regular files under the folder's export/, reached through no
        link that leads out of the run folder (a crafted summary or folder cannot name a file elsewhere); a
        summary that cannot be read counts as empty, so one damaged folder does not hide the others."""
        run_dir = Path(run_dir)
        try:
            summary = read_summary(run_dir)
        except (confine.RunDirError, OSError):
            summary = {}
        listed = summary.get("files")
        files = {}
        for kind, relative in (listed.items() if isinstance(listed, dict) else ()):
            path = run_dir / str(relative)
            if _export_file(run_dir, path):
                files[str(kind)] = path
        return cls(run_dir, files, summary, latest_preview(run_dir))


PREVIEW_NAME = r"(?:stage_(\d+)_)?step_(\d+)\.png"


def latest_preview(run_dir: Path) -> Path | None:
    """The newest ``previews/step_<step>.png`` (``stage_<index>_step_<step>.png`` in a staged run; a regular file)
    of a run folder, or None before the first preview or when previews/ links out of the run folder."""
    run_dir = Path(run_dir)
    try:
        previews = confine.own_files(run_dir, run_dir / "previews", PREVIEW_NAME)
    except (confine.RunDirError, OSError):
        return None

    def order(path: Path) -> tuple[int, int]:
        stage, step = re.fullmatch(PREVIEW_NAME, path.name).groups()
        return int(stage or 0), int(step)

    return max(previews, key=order, default=None)


def _export_file(run_dir: Path, path: Path) -> bool:
    """Whether ``path`` is a regular file under run_dir/export/, reached through no link out of the run folder."""
    try:
        return (path.is_relative_to(run_dir / "export") and confine.inside(run_dir, path).is_file()
                and path.resolve().is_relative_to((run_dir / "export").resolve()))
    except (confine.RunDirError, OSError, ValueError):  # a NUL byte or a name too long for the file system
        return False
