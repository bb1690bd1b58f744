"""The run folder: layout, checkpoints and the metrics log.

runs/<slug>-<timestamp>/ config.yaml, checkpoints/step_XXXXXX.pt, previews/,
export/, metrics.jsonl, summary.json. Every file is written atomically.
"""

from __future__ import annotations

import io
import os
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from dream3d.atomic import write_bytes, write_text
from dream3d.config import ConfigError, RunConfig, build_config, load_yaml, to_yaml


class RunDirError(ValueError):
    """A folder is not a usable run; the message is one line."""


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
    write_text(path / "config.yaml", to_yaml(cfg))
    return path


def load_run_config(run_dir: Path) -> RunConfig:
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a dream3d run folder (no config.yaml)")
    try:
        return build_config(load_yaml(run_dir / "config.yaml"))
    except ConfigError as e:
        raise RunDirError(f"{run_dir}/config.yaml: {e}") from None


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))


def latest_checkpoint(run_dir: Path) -> Path:
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise RunDirError(f"{run_dir} has no checkpoint to continue from")
    return paths[-1]


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = run_dir / "checkpoints" / f"step_{step:06d}.pt"
    write_bytes(path, buffer.getvalue())
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drops log lines after ``last_step`` (written after the checkpoint a resume starts from)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if _step_of(line) <= last_step]
    write_text(path, "".join(line + "\n" for line in lines))


def _step_of(line: str) -> float:
    """A log line's step; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merges fields into summary.json (the run, the export and the evaluation each add theirs)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(fields)
    write_text(path, json.dumps(summary, indent=2) + "\n")
    return summary
