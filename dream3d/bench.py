"""The toy benchmark: run a set of toy prompts, evaluate each against the toy world, tabulate.

Each run is a separate ``dream3d run`` process (so peak memory is per run), followed
by its evaluation (``api.evaluate``, what ``dream3d eval`` calls, in this process: it saves
a process start per run). The table (markdown and JSON) has one row per run and a median row.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from dream3d import api
from dream3d.atomic import write_text
from dream3d.errors import UserError

# Twelve classes: every shape and every colour twice.
BENCH_PROMPTS = (
    "a red sphere", "a green cube", "a blue cylinder", "a yellow cone", "an orange torus", "a purple pyramid",
    "a green sphere", "a blue cube", "a yellow cylinder", "an orange cone", "a purple torus", "a red pyramid",
)
QUICK_PROMPTS = ("a red sphere", "a green cube")
COLUMNS = (
    "iou", "r_precision", "colour_error", "janus", "view_iou_spread", "mesh_iou", "volume_iou", "volume_ratio", "watertight", "components",
    "seconds_per_step", "wall_seconds", "peak_memory_mb",
)
MESH_3D = ("volume_iou", "volume_ratio", "watertight", "components")  # evaluate_mesh_3d's, absent without a GLB
COUNT_STEPS = (1, 100, 200, 300, 400, 600)  # where the Gaussian count is reported


class BenchError(UserError, RuntimeError):
    """A benchmark run or its evaluation failed; the message is one line."""


def run_and_eval(prompt: str, seed: int, out: Path, options: list[str]) -> tuple[Path, dict, float]:
    """Runs ``dream3d run`` in a subprocess, then evaluates its run folder (the newest under ``out``).

    Returns (run folder, its summary.json, wall seconds of the run process); a failed run
    raises BenchError with its last line on stderr."""
    command = [sys.executable, "-m", "dream3d", "run", prompt, "--seed", str(seed), "--out", str(out), *options]
    tick = time.perf_counter()
    _call(command)
    wall = time.perf_counter() - tick
    run_dir = max(out.glob("*/"), key=lambda p: p.stat().st_mtime)
    api.evaluate(run_dir)
    return run_dir, json.loads((run_dir / "summary.json").read_text()), wall


def _call(command: list[str]) -> None:
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BenchError(f"`dream3d run {command[4]!r}` failed: {last}")


def run_one(prompt: str, seed: int, out: Path, options: list[str]) -> dict:
    """Runs and evaluates one prompt in subprocesses; returns its table row."""
    run_dir, summary, wall = run_and_eval(prompt, seed, out, options)
    row = {
        "prompt": prompt, "seed": seed, "run_dir": str(run_dir), "matched_class": summary["eval"]["matched_class"],
        **{k: summary["eval"][k] for k in ("iou", "r_precision", "colour_error", "janus", "view_iou_spread")},
        "mesh_iou": summary["eval"].get("mesh_iou", float("nan")),  # nan when the run exported no GLB
        **{k: summary["eval"].get(k, float("nan")) for k in MESH_3D},
        "seconds_per_step": summary["seconds_per_step"], "wall_seconds": round(wall, 1),
        "peak_memory_mb": summary["peak_memory_mb"],
    }
    counts = _gaussian_counts(run_dir)
    if counts:
        row["num_gaussians"] = counts
    return row


def _gaussian_counts(run_dir: Path) -> dict[int, int]:
    """The logged Gaussian count at COUNT_STEPS (empty for representations that log none)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["num_gaussians"] for r in records if r["step"] in COUNT_STEPS and "num_gaussians" in r}


def bench(prompts: tuple[str, ...], seeds: list[int], out: Path, options: list[str]) -> list[dict]:
    """Runs every prompt x seed; writes bench.json and bench.md under ``out``; returns the rows."""
    rows = [run_one(p, s, out / "runs", options) for p in prompts for s in seeds]
    write_text(out / "bench.json", json.dumps({"options": options, "rows": rows}, indent=2) + "\n")
    write_text(out / "bench.md", markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per run and a median line; a Gaussian count column when the runs logged one."""
    counts = all("num_gaussians" in r for r in rows)
    extra = [f"gaussians at steps {'/'.join(map(str, COUNT_STEPS))}"] if counts else []
    lines = []
    for r in rows:
        cells = [fmt(r[c]) for c in COLUMNS]
        if counts:
            cells.append(" / ".join(str(r["num_gaussians"].get(s, "-")) for s in COUNT_STEPS))
        lines.append([r["prompt"], str(r["seed"]), r["matched_class"], *cells])
    medians = [_summary(c, [r[c] for r in rows]) for c in COLUMNS] + [""] * len(extra)
    return markdown(["prompt", "seed", "matched", *COLUMNS, *extra], [*lines, ["**median**", "", "", *medians]])


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of string cells: the header line, its rule, one line per row (both benchmarks)."""
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def _summary(column: str, values: list) -> str:
    """The median row's cell: how many meshes are watertight ("k/n"), the median otherwise."""
    if column == "watertight":
        return f"{sum(v is True for v in values)}/{len(values)}"
    return fmt(statistics.median(values))


def fmt(value: object) -> str:
    """A table cell: floats to 3 decimals (1 from 10 up), NaN as "-", anything else as is."""
    if not isinstance(value, float):
        return f"{value}"
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
