"""The runs folder as the web app sees it: earlier runs, their files, and safe downloads.

Downloads are served from this folder only: ``RunsFolder.resolve`` turns a requested
relative path into a file inside the folder, or refuses it (``..``, absolute paths,
symlinks that lead out, hidden temporary files of an unfinished write).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from dream3d.atomic import atomic_path

DOWNLOAD_ROUTE = "/download"


@dataclass
class RunView:
    """What the page shows of one run folder; files maps a kind (glb, video, obj_zip, splats) to a path."""

    run_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    preview: Path | None = None


class RunsFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def runs(self) -> list[Path]:
        """Run folders (those with a config.yaml), newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if (p / "config.yaml").is_file()]
        return sorted(found, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)

    def find(self, name: str) -> Path | None:
        """The run folder called ``name`` directly under the root, if there is one."""
        path = self.resolve(name, want_dir=True)
        return path if path is not None and (path / "config.yaml").is_file() else None

    def resolve(self, relative: str, want_dir: bool = False) -> Path | None:
        """The file (or folder) at ``relative`` inside the root; None for anything outside or hidden."""
        if any(part.startswith(".") for part in Path(relative).parts):
            return None
        try:
            candidate = (self.root / relative).resolve()
            if candidate == self.root or not candidate.is_relative_to(self.root):
                return None
            return candidate if (candidate.is_dir() if want_dir else candidate.is_file()) else None
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            return None

    def url(self, path: Path) -> str:
        """The download URL of a file inside the root."""
        return f"{DOWNLOAD_ROUTE}/{quote(path.resolve().relative_to(self.root).as_posix())}"

    def view(self, run_dir: Path) -> RunView:
        export = run_dir / "export"
        view = RunView(run_dir, preview=latest_preview(run_dir))
        for kind, name in (("glb", "model.glb"), ("video", "orbit.mp4"), ("splats", "splats.ply")):
            if (export / name).is_file():
                view.files[kind] = export / name
        if (export / "model.obj").is_file() and _inside(export / "model.obj", export):
            view.files["obj_zip"] = obj_zip(export / "model.obj")
        if (run_dir / "summary.json").is_file():
            view.summary = json.loads((run_dir / "summary.json").read_text())
        return view


def latest_preview(run_dir: Path) -> Path | None:
    previews = sorted((run_dir / "previews").glob("step_*.png"))
    return previews[-1] if previews else None


def obj_zip(obj: Path) -> Path:
    """``model-obj.zip`` beside ``obj``: the OBJ with the material library it names and the
    texture maps that library names (made once, remade when the OBJ is newer). A map's file is
    the last word of its line, after any options. Only files whose real path (symlinks
    resolved) lies in the OBJ's own folder go in: a run folder may have been crafted."""
    target = obj.with_name(f"{obj.stem}-obj.zip")
    if not target.is_symlink() and target.is_file() and target.stat().st_mtime >= obj.stat().st_mtime:
        return target
    members = [obj] if _inside(obj, obj.parent) else []
    for mtl in _referenced(obj, r"^mtllib\s+(.+)$") if members else []:
        members.append(mtl)
        members.extend(_referenced(mtl, r"^map_\w+\s.*?(\S+)\s*$"))
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            archive.write(member, member.name)
    return target


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _referenced(text_file: Path, pattern: str) -> list[Path]:
    """Files beside ``text_file`` (and really there, not linked from elsewhere) named by the
    first group of ``pattern`` on its lines."""
    names = re.findall(pattern, text_file.read_text(errors="replace"), flags=re.MULTILINE)
    paths = [text_file.parent / Path(name.strip()).name for name in names]
    return [p for p in paths if p.is_file() and _inside(p, text_file.parent)]
