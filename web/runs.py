"""The runs folder as the web app sees it: earlier runs (``dream3d.rundir.result.Result``, the record the API
returns), and safe downloads.

Downloads are served from this folder only: ``RunsFolder.resolve`` turns a requested
relative path into a file inside the folder, or refuses it (``..``, absolute paths,
symlinks that lead out, hidden temporary files of an unfinished write).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from urllib.parse import quote

from dream3d.rundir.atomic import atomic_path
from dream3d.rundir.result import Result

DOWNLOAD_ROUTE = "/download"


class RunsFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def runs(self) -> list[Result]:
        """The runs (folders with a config.yaml), newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if (p / "config.yaml").is_file()]
        return [Result.load(p) for p in sorted(found, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)]

    def find(self, name: str) -> Result | None:
        """The run in the folder called ``name`` directly under the root, if there is one."""
        path = self.resolve(name, want_dir=True)
        return Result.load(path) if path is not None and (path / "config.yaml").is_file() else None

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

    def downloads(self, result: Result) -> dict[str, Path]:
        """The files a visitor may download of a run, by kind: the export's single-asset files, and the
        OBJ as ``obj_zip`` (with its material and textures) instead of the bare OBJ."""
        files = {kind: result.files[kind] for kind in ("glb", "video", "splats") if kind in result.files}
        obj = result.files.get("obj")
        if obj is not None and _inside(obj, obj.parent):
            files["obj_zip"] = obj_zip(obj)
        return files


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
