"""The run folder: layout, checkpoints and the metrics log.

runs/<slug>-<timestamp>/ config.yaml, checkpoints/step_XXXXXX.pt, previews/,
export/, metrics.jsonl, summary.json, .lock. A staged run (config ``stages``) keeps each stage's checkpoints in
stages/<index>-<name>/checkpoints/ instead: the stages' representations differ, each stage keeps its own newest
ones (its final one is what the next stage starts from and what ``eval --stages`` scores), and a resume finds
where it stopped from which stage folders hold checkpoints. Its metrics.jsonl is one log, each line carrying
``stage`` (the name) and ``stage_index``; its previews are named stage_<index>_step_XXXXXX.png. Every file but
metrics.jsonl is written to a temporary name, synced and renamed (dream3d.rundir.atomic); metrics.jsonl is
appended one whole line at a time (a failed append is cut back) and resume drops lines after its checkpoint.

A run folder is untrusted input: checkpoints load with ``weights_only=True`` (tensors and
plain data, never pickled code), one process at a time trains or exports into it
(``locked``), and every name in it is read, written or deleted under the run-folder rule
(dream3d.rundir.confine: nothing through a link that leads outside).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dream3d.rundir import confine
from dream3d.rundir.atomic import LEFTOVER, write_bytes, write_text
from dream3d.config import ConfigError, RunConfig, build_config, load_yaml, to_yaml
from dream3d.rundir.confine import RunDirError
from dream3d.rundir.lock import FolderBusy, LockError, folder_lock, holds

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"
# what a checkpoint that reads but belongs to another run raises when applied (missing or unexpected keys, shapes)
MISMATCH_ERRORS = (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError)
# the names dream3d reads or writes directly in a run folder (export/p{i}/ lie under export/)
RUN_NAMES = (".lock", "config.yaml", "checkpoints", "previews", "export", "metrics.jsonl", "summary.json", "stages")
CHECKPOINT_NAME = r"step_(\d{6,})\.pt"
STAGES = "stages"
STAGE_FOLDER = r"(\d+)-[a-z0-9_-]+"


class CheckpointUnreadable(RunDirError):
    """A checkpoint file is empty, truncated or corrupt, as a crash or a full disk leaves one: an older one may do."""


class CheckpointRefused(RunDirError):
    """A file that is not a weights-only checkpoint (a pickle of Python objects, a foreign file): never loaded."""


def slugify(prompt: str, max_len: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "run"


def check_writable(out: Path) -> None:
    """Raises RunDirError unless runs can be created under ``out``; creates nothing."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write to output folder {out}: {existing} is not a writable folder")


def create_run_dir(cfg: RunConfig) -> Path:
    """Makes runs/<slug>-<timestamp>[-n]/ under cfg.out and writes config.yaml."""
    out = Path(cfg.out)
    check_writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot write to output folder {out}: {e.strerror}") from None
    stem = f"{slugify(cfg.prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = out / stem, 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}"
    path.mkdir()
    try:
        write_text(path / "config.yaml", to_yaml(cfg))
    except OSError as e:  # a full disk: no folder left behind without its config
        path.rmdir()
        raise RunDirError(f"cannot write {path / 'config.yaml'}: {e.strerror}") from None
    return path


def load_run_config(run_dir: Path) -> RunConfig:
    """The config of an existing run, once its folder passes ``check_run_dir``."""
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir} is not a dream3d run folder (not a folder)")
    check_run_dir(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a dream3d run folder (no config.yaml)")
    try:
        return build_config(load_yaml(run_dir / "config.yaml"))
    except ConfigError as e:
        raise RunDirError(f"{run_dir}/config.yaml: {e}") from None


def check_run_dir(run_dir: Path) -> None:
    """Raises RunDirError, before anything is written, when a name of the run folder links outside it
    (dream3d.rundir.confine) or its summary.json is damaged."""
    for name in RUN_NAMES:
        confine.inside(run_dir, run_dir / name)
    read_summary(run_dir)


def stage_folder(index: int, name: str) -> str:
    """A stage's folder, relative to the run folder."""
    return f"{STAGES}/{index}-{name}"


def stage_folders(run_dir: Path) -> list[Path]:
    """The stage folders of a run, in stage order: folders (not links) named <index>-<name> under stages/."""
    stages = confine.inside(run_dir, run_dir / STAGES)
    found = [p for p in stages.iterdir() if re.fullmatch(STAGE_FOLDER, p.name) and p.is_dir()
             and not p.is_symlink()] if stages.is_dir() and not stages.is_symlink() else []
    return sorted(found, key=lambda p: int(re.fullmatch(STAGE_FOLDER, p.name)[1]))


def checkpoint_paths(run_dir: Path, stage: str | None = None) -> list[Path]:
    """The checkpoints dream3d wrote, oldest first: regular files named step_<step>.pt in checkpoints/ (a folder,
    a link or any other name there is not one of them). ``stage`` (a ``stage_folder``): that stage's only; None:
    the run's, every stage's in stage order for a staged run."""
    if stage is None:
        return [*_checkpoints(run_dir, run_dir), *(p for f in stage_folders(run_dir) for p in _checkpoints(run_dir, f))]
    return _checkpoints(run_dir, run_dir / stage)


def _checkpoints(run_dir: Path, folder: Path) -> list[Path]:
    found = confine.own_files(run_dir, folder / "checkpoints", CHECKPOINT_NAME)
    return sorted(found, key=lambda path: int(re.fullmatch(CHECKPOINT_NAME, path.name)[1]))


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int, stage: str = "") -> Path:
    """Writes checkpoints/step_<step>.pt (under the ``stage`` folder, if given) and deletes all but the newest
    ``keep`` of that folder's checkpoints."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = confine.folder(run_dir, run_dir / stage / "checkpoints") / f"step_{step:06d}.pt"
    write_bytes(path, buffer.getvalue())
    for old in _checkpoints(run_dir, run_dir / stage)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state, loaded weights-only: tensors, numbers, strings and containers of them.

    torch.save writes a zip archive, so an empty file or the start of an archive cut short
    (a crash, a full disk) is CheckpointUnreadable: an older checkpoint may do. Anything else
    that does not load weights-only is CheckpointRefused: a pickle or foreign file, or an
    archive whose pickle names Python objects (loading it could run code)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointUnreadable(f"{path} is empty")
    if not zipfile.is_zipfile(path):
        if head == ZIP_MAGIC[: len(head)]:  # the start of an archive, cut short
            raise CheckpointUnreadable(f"{path} is truncated")
        raise CheckpointRefused(f"refusing {path}: it is not a checkpoint dream3d writes (a torch.save zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointRefused(
            f"refusing {path}: it holds pickled objects other than tensors and plain data (loading it could run code)"
        ) from None
    except (EOFError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointUnreadable(f"{path} is corrupt ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointRefused(f"refusing {path}: it holds a {type(state).__name__}, not a dream3d checkpoint")
    return state


def read_latest_checkpoint(paths: list[Path], missing: str) -> tuple[Path, dict[str, Any]]:
    """The newest of ``paths`` (oldest first) that reads, and its state.

    Unreadable newer ones are skipped with one warning line; ``missing`` is the error when
    none is left. A refused checkpoint is never skipped: the folder was tampered with."""
    skipped = []
    for path in reversed(paths):
        try:
            state = load_checkpoint(path)
        except CheckpointUnreadable as e:
            skipped.append(str(e))
            continue
        if skipped:
            log.warning("warning: %s; using %s instead", "; ".join(skipped), path.name)
        return path, state
    raise RunDirError(f"{missing}" + (f" ({'; '.join(skipped)})" if skipped else ""))


def require_checkpoint(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first; none is a RunDirError (checked before the lock file is touched)."""
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise RunDirError(f"{run_dir} has no checkpoint to continue from")
    return paths


def latest_state(run_dir: Path, stage: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of a run (or of its ``stage`` folder) that reads (see read_latest_checkpoint) and its
    state."""
    if stage is None:
        return read_latest_checkpoint(require_checkpoint(run_dir), f"{run_dir} has no readable checkpoint")
    paths = checkpoint_paths(run_dir, stage)
    return read_latest_checkpoint(paths, f"{run_dir / stage} has no readable checkpoint")


def apply_checkpoint(path: Path, state: dict[str, Any], apply: Callable[[dict[str, Any]], None], what: str) -> None:
    """``apply(state)``; a state that does not fit (another representation, other sizes) is one RunDirError line."""
    try:
        apply(state)
    except MISMATCH_ERRORS as e:
        raise RunDirError(f"{path} is not a checkpoint of {what} ({_first_line(e)})") from None


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Holds the run folder's lock: one process trains or exports into a run at a time. Taking it (not again
    within the thread) removes the temporary files that killed writes left: every writer holds the lock, so
    none of them is still being written."""
    confine.inside(run_dir, run_dir / ".lock")
    first = not holds(run_dir)
    try:
        with folder_lock(run_dir):
            if first:
                remove_leftovers(run_dir)
            yield
    except FolderBusy as e:
        raise RunDirError(f"{e}; wait for it to end") from None
    except LockError as e:
        raise RunDirError(str(e)) from None


def remove_leftovers(run_dir: Path) -> None:
    """Deletes the temporary files of writes that were killed (dream3d.rundir.atomic.LEFTOVER names; regular files
    only) from the folders dream3d writes into."""
    export = run_dir / "export"
    particles = [p for p in confine.inside(run_dir, export).glob("p*")
                 if re.fullmatch(r"p\d+", p.name) and p.is_dir() and not p.is_symlink()]
    stages = [f / "checkpoints" for f in stage_folders(run_dir)]
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "previews", export, *particles, *stages):
        for leftover in confine.own_files(run_dir, folder, LEFTOVER):
            leftover.unlink()


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Appends one log line whole: a write that fails part-way (a full disk) is cut back off."""
    line = (json.dumps(record) + "\n").encode()
    path = confine.inside(run_dir, run_dir / "metrics.jsonl").resolve()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            os.ftruncate(fd, size)
            raise OSError(e.errno, e.strerror, str(run_dir / "metrics.jsonl")) from None
    finally:
        os.close(fd)


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def truncate_metrics(run_dir: Path, last_step: int, stage_index: int = 0) -> None:
    """Drops log lines after ``last_step`` of stage ``stage_index`` (written after the checkpoint a resume starts
    from), and any line that is not a step record (cut short by a crash, or garbage)."""
    path = run_dir / "metrics.jsonl"
    data = confine.read_bytes(run_dir, path)
    if data is None:
        return
    lines = [line for line in data.split(b"\n") if _step_of(line) <= (stage_index, last_step)]
    write_bytes(path, b"".join(line + b"\n" for line in lines))


def _step_of(line: bytes) -> tuple[float, float]:
    """A log line's (stage index, step); a line that is not a step record counts as after every checkpoint."""
    after = (float("inf"), float("inf"))
    try:
        record = json.loads(line)
        step, stage = record["step"], record.get("stage_index", 0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):  # ValueError: not JSON
        return after
    return (stage, step) if isinstance(step, int) and isinstance(stage, int) else after


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json's fields ({} before the first stage writes it); RunDirError when it is damaged."""
    path = run_dir / "summary.json"
    data = confine.read_bytes(run_dir, path)
    if data is None:
        return {}
    try:
        summary = json.loads(data)
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is damaged (not UTF-8 text); move it away to start a new summary") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is damaged (not JSON: {e.msg} at line {e.lineno}); move it away to start a new "
                          "summary") from None
    except RecursionError:
        raise RunDirError(f"{path} is damaged (nested too deep); move it away to start a new summary") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"{path} is damaged (a JSON {type(summary).__name__}, not an object); move it away to "
                          "start a new summary")
    return summary


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merges fields into summary.json (the run, the export and the evaluation each add theirs)."""
    summary = read_summary(run_dir)
    summary.update(fields)
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
