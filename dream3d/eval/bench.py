"""The benchmarks: one runner, and presets that say what it runs (``dream3d bench``, ``dream3d bench-guidance``).

A preset (``Matrix``) is data: rules x representations x prompts x seeds, the settings of every
run, and the columns each run's row keeps. Every run is its own ``dream3d run`` process (so peak
memory is per run), then evaluated as ``dream3d eval`` does (``api.evaluate``, in this process: it
saves a process start per run). A run is the list of its particles (``eval["particles"]``, or the
run's eval itself when it optimised one). Two tables:

- per run (``TOY``, the 12-prompt toy benchmark): one line per run and a median line;
- per (rule, representation) (``RULES_FULL``, the guidance-rule comparison). Faithful prompts name
  one class: a cell's IoU, volume IoU, R-precision, colour error and janus measure are medians over
  every particle of every faithful run. Ambiguous prompts ("a cube": any colour) allow several
  classes and run with ``particles`` particles; diversity is the number of distinct matched classes
  over every particle and seed of a prompt, and the entropy (bits) of that class distribution,
  averaged over prompts.
  Cost columns (seconds, network evaluations and peak memory per step) are medians over the
  faithful runs, which optimise one particle unless the rule itself asks for more.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dream3d import api, registry
from dream3d.rundir.atomic import write_text
from dream3d.rundir.folder import load_run_config
from dream3d.config import REPRESENTATIONS, ConfigError
from dream3d.errors import UserError

# Where a column's figure comes from: the run's eval scores (a particle's, for a run of several),
# summary.json, the wall seconds of the run's process, the logged Gaussian count at COUNT_STEPS,
# the list of the particles' eval scores, or each stage's scores and seconds (a staged run).
EVAL, SUMMARY, WALL, GAUSSIANS, PARTICLES, STAGES = "eval", "summary", "wall", "gaussians", "particles", "stages"
COUNT_STEPS = (1, 100, 200, 300, 400, 600)


class BenchError(UserError, RuntimeError):
    """A benchmark run or its evaluation failed; the message is one line."""


@dataclass(frozen=True)
class Column:
    """One figure of a run's row. header: the per-run table's (default: the name); total: that table's
    median line, "median", "count" (how many are true: "k/n") or "" (blank). A figure a run lacks is
    NaN ("-" in the table); a Gaussian count column is left out unless every run logged one."""

    name: str
    source: str = EVAL
    header: str = ""
    total: str = "median"

    def read(self, run_dir: Path, summary: dict, wall: float) -> object:
        """This column's figure of a finished, evaluated run (None: the run has none to show)."""
        if self.source == WALL:
            return round(wall, 1)
        if self.source == GAUSSIANS:
            return _gaussian_counts(run_dir) or None
        if self.source == PARTICLES:
            return summary["eval"].get("particles", [summary["eval"]])
        if self.source == STAGES:
            return _stage_figures(summary) or None
        return (summary["eval"] if self.source == EVAL else summary).get(self.name, math.nan)

    def cell(self, value: object) -> str:
        if self.source == GAUSSIANS:
            return " / ".join(str(value.get(s, "-")) for s in COUNT_STEPS)
        if self.source == STAGES:
            return "; ".join(f"{name} {fmt(f['volume_iou'])} / {fmt(f['normal_error_deg'])} / {fmt(f['seconds'])} s"
                             for name, f in value.items())
        return fmt(value)

    def summary_cell(self, values: list) -> str:
        if self.total == "count":
            return f"{sum(v is True for v in values)}/{len(values)}"
        return fmt(statistics.median(values)) if self.total == "median" else ""

    @property
    def title(self) -> str:
        return self.header or self.name


# The toy benchmark's row: its scores against the toy world (dream3d/eval/scores.py) and its cost.
TOY_COLUMNS = (
    Column("matched_class", header="matched", total=""),
    Column("iou"),
    Column("r_precision"),
    Column("colour_error"),
    Column("janus"),  # view consistency (dream3d/eval/scores.py)
    Column("view_iou_spread"),
    Column("mesh_iou"),  # NaN when the run exported no GLB, as the 3D ones below
    Column("albedo_error"),  # the GLB's texture against the class's colour (NaN without a texture)
    Column("volume_iou"),
    Column("volume_ratio"),
    Column("watertight", total="count"),
    Column("components"),
    Column("normal_error_deg"),  # degrees: rounded edges and bumps, which volume_iou barely sees
    Column("seconds_per_step", SUMMARY),
    Column("wall_seconds", WALL),
    Column("peak_memory_mb", SUMMARY),
    Column("num_gaussians", GAUSSIANS, header=f"gaussians at steps {'/'.join(map(str, COUNT_STEPS))}", total=""),
    Column("stages", STAGES, header="per stage: volume IoU / normal error / train time", total=""),
)
# The rule matrix's row: every particle's scores (pooled per cell) and the run's cost.
RULE_COLUMNS = (
    Column("particles", PARTICLES),
    Column("seconds_per_step", SUMMARY),
    Column("nfe_per_step", SUMMARY),
    Column("peak_memory_mb", SUMMARY),
    Column("wall_seconds", WALL),
)

# A rule is a named preset: the key=value run overrides that select it. Every registered rule, plus
# SDS + kernel repulsion, which needs at least 3 particles; weight from a probe of 0 / 100 / 1000 on
# "a red shape" (docs/benchmarks-history.md): 100 found more classes at some cost in IoU, 1000 broke the shapes.
RULES: dict[str, tuple[str, ...]] = {
    **{name: (f"guidance={name}",) for name in registry.RULES.names},
    "rsd": ("particles=4", "repulsion.weight=100"),
}
# Two SDS variants for a prior with view prompts (sd, if): without the view suffixes, and with Perp-Neg. Chosen
# by name (--rules), never by default: the toy priors have no view prompts, and their configs refuse Perp-Neg.
VIEW_VARIANTS: dict[str, tuple[str, ...]] = {
    "sds-no-view": ("guidance=sds", "prompts.view_dependent=false"),
    "sds-perp-neg": ("guidance=sds", "sds.perp_neg=true"),
}
RUNNABLE_RULES = {**RULES, **VIEW_VARIANTS}


@dataclass(frozen=True)
class Matrix:
    """A benchmark preset: every rule x representation x (faithful prompt x seed + ambiguous prompt x
    seed), the key=value settings of every run, and the columns of each run's row. A rule,
    representation or prior of None leaves the choice to the run's config (defaults, overrides)."""

    faithful: tuple[str, ...]
    seeds: tuple[int, ...]  # of the faithful prompts
    columns: tuple[Column, ...]
    settings: tuple[str, ...] = ()
    rules: tuple[str | None, ...] = (None,)
    representations: tuple[str | None, ...] = (None,)
    prior: str | None = None
    ambiguous: tuple[str, ...] = ()
    ambiguous_seeds: tuple[int, ...] = ()
    particles: int = 1  # per ambiguous run

    def options(self, rule: str | None, representation: str | None, ambiguous: bool) -> list[str]:
        """The run options of one cell's run; the rule's overrides win over the shared settings."""
        chosen = [*(["--prior", self.prior] if self.prior else []),
                  *(["--representation", representation] if representation else [])]
        particles = [f"particles={self.particles}"] if ambiguous and self.particles > 1 else []
        return [*chosen, *self.settings, *particles, *(RUNNABLE_RULES[rule] if rule else ())]


# Twelve classes: every shape and every colour twice; every setting at its default.
TOY = Matrix(
    faithful=("a red sphere", "a green cube", "a blue cylinder", "a yellow cone", "an orange torus", "a purple pyramid",
              "a green sphere", "a blue cube", "a yellow cylinder", "an orange cone", "a purple torus", "a red pyramid"),
    seeds=(0,), columns=TOY_COLUMNS,
)
TOY_QUICK = replace(TOY, faithful=("a red sphere", "a green cube"))

# 100 steps at 32x32: the shapes have formed (IoU ~0.86 on "a green cube", docs/benchmarks-history.md) at a
# cost the matrix can afford; the export is one GLB on a 32^3 grid (the Gaussians' at 64^3 cost 12 s a run).
# The representations a run starts from; dmtet refines a stage before it, so it runs when named.
RULES_FULL = Matrix(
    faithful=("a red sphere", "a green cube", "a blue cylinder", "a yellow cone"), seeds=(0,), columns=RULE_COLUMNS,
    settings=("steps=100", "resolution=32", "checkpoint_every=100", "preview_every=100",
              "export.formats=[glb]", "export.video=false", "export.mesh_resolution=32"),
    rules=tuple(RULES), representations=("nerf", "gaussians"), prior="toy-unet-mv",
    ambiguous=("a red shape", "a cube"), ambiguous_seeds=(0, 1, 2), particles=4,
)
# What CI runs: 4 runs of a few steps on tiny grids (the numbers mean nothing, the plumbing is exercised),
# on the closed-form prior (no UNet to load: a run's process starts in half the time). The ambiguous
# prompt runs 3 particles, so the diversity columns count 3 shapes, not always 1.
RULES_QUICK = replace(
    RULES_FULL, rules=("sds", "csd"), representations=("nerf",), faithful=("a red sphere",), ambiguous=("a cube",),
    ambiguous_seeds=(0,), particles=3, prior="toy-mv",
    settings=("steps=6", "resolution=16", "checkpoint_every=6", "preview_every=6",
              "nerf.grid_resolutions=[8,16]", "nerf.num_samples=24", "nerf.occupancy_resolution=16",
              "gaussians.num_points=256", "export.formats=[glb]", "export.video=false", "export.mesh_resolution=16"),
)

CELL_COLUMNS = (
    "iou", "volume_iou", "r_precision", "colour_error", "janus", "distinct_classes", "entropy_bits",
    "seconds_per_step", "nfe_per_step", "peak_memory_mb",
)
CELL_HEADERS = ("IoU", "volume IoU", "R-precision", "colour error", "janus", "distinct classes", "entropy (bits)",
                "s/step", "NFE/step", "peak MB")


def check(matrix: Matrix) -> Matrix:
    """The matrix, or ConfigError naming the first unknown rule or representation."""
    for kind, names, valid in (("rule", matrix.rules, tuple(RUNNABLE_RULES)),
                               ("representation", matrix.representations, REPRESENTATIONS)):
        unknown = [n for n in names if n is not None and n not in valid]
        if unknown or not names:
            raise ConfigError(f"unknown {kind} {unknown[0]!r}; valid: {', '.join(valid)}" if unknown
                              else f"no {kind} to run; valid: {', '.join(valid)}")
    if matrix.particles < 1:
        raise ConfigError(f"particles must be at least 1, got {matrix.particles}")
    return matrix


def with_choices(matrix: Matrix, **choices: object) -> Matrix:
    """The matrix with the given fields replaced (None: keep the preset's)."""
    return check(replace(matrix, **{k: v for k, v in choices.items() if v is not None}))


# -- the runner -----------------------------------------------------------------------


def cells(matrix: Matrix, out: Path, overrides: list[str]) -> Iterator[tuple[dict, str, int, Path, list[str]]]:
    """(labels, prompt, seed, run folder, run options) of every run, in run order. labels: the run's
    rule and representation (when the matrix chooses them) and prompt set."""
    for rule in matrix.rules:
        for representation in matrix.representations:
            for kind, prompts, seeds in (("faithful", matrix.faithful, matrix.seeds),
                                         ("ambiguous", matrix.ambiguous, matrix.ambiguous_seeds)):
                options = matrix.options(rule, representation, kind == "ambiguous") + overrides
                chosen = {k: v for k, v in (("rule", rule), ("representation", representation)) if v is not None}
                for prompt in prompts:
                    for seed in seeds:
                        folder = out.joinpath("runs", *chosen.values(), f"{'-'.join(prompt.split())}-seed{seed}")
                        yield {**chosen, "set": kind}, prompt, seed, folder, options


def run_matrix(matrix: Matrix, out: Path, overrides: list[str], on_row: Callable[[dict], None] = lambda row: None
               ) -> list[dict]:
    """Runs every cell of the matrix under ``out/runs``; returns one row per run (``error`` set when it failed)."""
    rows = []
    for labels, prompt, seed, folder, options in cells(matrix, out, overrides):
        row = {**labels, "prompt": prompt, "seed": seed, **_run_row(matrix.columns, prompt, seed, folder, options)}
        on_row(row)
        rows.append(row)
    return rows


def run_and_eval(prompt: str, seed: int, out: Path, options: list[str]) -> tuple[Path, dict, float]:
    """Runs ``dream3d run`` in a subprocess, then evaluates its run folder (the newest under ``out``).

    Returns (run folder, its summary.json, wall seconds of the run process); a failed run
    raises BenchError with its last line on stderr."""
    command = [sys.executable, "-m", "dream3d", "run", prompt, "--seed", str(seed), "--out", str(out), *options]
    tick = time.perf_counter()
    _call(command)
    wall = time.perf_counter() - tick
    run_dir = max(out.glob("*/"), key=lambda p: p.stat().st_mtime)
    api.evaluate(run_dir, stages=bool(load_run_config(run_dir).stages))
    return run_dir, json.loads((run_dir / "summary.json").read_text()), wall


def _call(command: list[str]) -> None:
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BenchError(f"`dream3d run {command[4]!r}` failed: {last}")


def _run_row(columns: Sequence[Column], prompt: str, seed: int, folder: Path, options: list[str]) -> dict:
    """One run's figures, one per column (a column the run has no figure for is left out); or its error."""
    try:
        run_dir, summary, wall = run_and_eval(prompt, seed, folder, options)
    except BenchError as e:
        return {"error": str(e)}
    figures = ((c.name, c.read(run_dir, summary, wall)) for c in columns)
    return {"run_dir": str(run_dir), **{name: value for name, value in figures if value is not None}}


def _stage_figures(summary: dict) -> dict[str, dict]:
    """A staged run's per-stage volume IoU, normal error (``eval --stages``) and training seconds, by stage name."""
    stages = [s for s in summary.get("stages", []) if isinstance(s, dict)]
    seconds = {s.get("name"): s.get("train_seconds", math.nan) for s in stages}
    return {name: {key: scores.get(key, math.nan) for key in ("volume_iou", "normal_error_deg")}
            | {"seconds": seconds.get(name, math.nan)}
            for name, scores in summary.get("eval_stages", {}).items()}


def _gaussian_counts(run_dir: Path) -> dict[int, int]:
    """The logged Gaussian count at COUNT_STEPS (empty for representations that log none)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["num_gaussians"] for r in records if r["step"] in COUNT_STEPS and "num_gaussians" in r}


def stop_at_failure(row: dict) -> None:
    """An ``on_row`` that ends the benchmark at the first failed run, with that run's one-line error."""
    if "error" in row:
        raise BenchError(row["error"])


# -- the per-run table (the toy benchmark) -----------------------------------------------


def markdown_table(rows: list[dict], columns: Sequence[Column] = TOY_COLUMNS) -> str:
    """One line per run and a median line (columns a run has no figure for are left out of the table)."""
    shown = [c for c in columns if all(c.name in r for r in rows)]
    lines = [[r["prompt"], str(r["seed"]), *(c.cell(r[c.name]) for c in shown)] for r in rows]
    medians = [c.summary_cell([r[c.name] for r in rows]) for c in shown]
    return markdown(["prompt", "seed", *(c.title for c in shown)], [*lines, ["**median**", "", *medians]])


def write_runs(out: Path, overrides: list[str], rows: list[dict]) -> str:
    """Writes bench.json (the overrides and every row) and bench.md under ``out``; returns the table."""
    write_text(out / "bench.json", json.dumps({"options": overrides, "rows": rows}, indent=2) + "\n")
    text = markdown_table(rows)
    write_text(out / "bench.md", text)
    return text


# -- the per-cell table (the rule matrix) ------------------------------------------------


def diversity(classes: list[str]) -> tuple[int, float]:
    """(number of distinct classes, entropy in bits of their empirical distribution) of matched classes."""
    counts = Counter(classes).values()
    total = sum(counts)
    return len(counts), max(0.0, -sum(c / total * math.log2(c / total) for c in counts))


def cell(rows: list[dict]) -> dict:
    """One (rule, representation)'s table entry from its runs (failed runs are counted, not scored)."""
    done = [r for r in rows if "error" not in r]
    faithful = [r for r in done if r["set"] == "faithful"]
    particles = [p for r in faithful for p in r["particles"]]
    entry = {"runs": len(done), "failed": len(rows) - len(done)}
    for key in ("iou", "r_precision", "colour_error", "janus"):
        entry[key] = _median([p[key] for p in particles])
    # the exported mesh's score; a run of several particles exports one mesh each, scored apart (NaN if absent)
    entry["volume_iou"] = _median([p.get("volume_iou", math.nan) for p in particles])
    for key in ("seconds_per_step", "nfe_per_step", "peak_memory_mb"):
        entry[key] = _median([r[key] for r in faithful])
    prompts = sorted({r["prompt"] for r in done if r["set"] == "ambiguous"})
    per_prompt = [diversity([p["matched_class"] for r in done if r["prompt"] == prompt and r["set"] == "ambiguous"
                             for p in r["particles"]]) for prompt in prompts]
    entry["distinct_classes"] = _mean([float(d[0]) for d in per_prompt])
    entry["entropy_bits"] = _mean([d[1] for d in per_prompt])
    entry["diversity_by_prompt"] = {p: {"distinct_classes": d[0], "entropy_bits": d[1]} for p, d in zip(prompts, per_prompt)}
    return entry


def table(matrix: Matrix, rows: list[dict]) -> list[dict]:
    """One entry per (rule, representation), in the matrix's order."""
    return [{"rule": rule, "representation": rep,
             **cell([r for r in rows if r["rule"] == rule and r["representation"] == rep])}
            for rule in matrix.rules for rep in matrix.representations]


def cells_markdown(entries: list[dict]) -> str:
    """The table as markdown: one line per (rule, representation)."""
    rows = [[e["rule"], e["representation"], str(e["runs"]), str(e["failed"]), *(fmt(e[c]) for c in CELL_COLUMNS)]
            for e in entries]
    return markdown(["rule", "representation", "runs", "failed", *CELL_HEADERS], rows)


def write_cells(out: Path, matrix: Matrix, overrides: list[str], rows: list[dict]) -> str:
    """Writes bench.json (the matrix, the table and every raw row) and bench.md under ``out``; returns the table."""
    entries = table(matrix, rows)
    document = {"matrix": asdict(matrix), "overrides": overrides, "table": entries, "rows": rows}
    write_text(out / "bench.json", json.dumps(document, indent=2) + "\n")
    text = cells_markdown(entries)
    write_text(out / "bench.md", text)
    return text


# -- cells and tables ------------------------------------------------------------------------


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of string cells: the header line, its rule, one line per row."""
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def fmt(value: object) -> str:
    """A table cell: floats to 3 decimals (1 from 10 up), NaN as "-", anything else as is."""
    if not isinstance(value, float):
        return f"{value}"
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan
