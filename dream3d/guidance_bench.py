"""The guidance-rule comparison: rules x representations x toy prompts x seeds on one embedded prior.

Every run is its own ``dream3d run`` process, then evaluated as ``dream3d eval`` does (``bench.run_and_eval``).
A run is the list of its particles (``eval["particles"]``, or the run's eval itself when it
optimised one). Two prompt sets:

- faithful prompts name one class; a cell's IoU, R-precision and colour error are medians
  over every particle of every faithful run;
- ambiguous prompts ("a cube": any colour) allow several classes and run with ``particles``
  particles; diversity is the number of distinct matched classes over every particle and
  seed of a prompt, and the entropy (bits) of that class distribution, averaged over prompts.

Cost columns (seconds, network evaluations and peak memory per step) are medians over the
faithful runs, which optimise one particle unless the rule itself asks for more.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from dream3d.atomic import write_text
from dream3d.bench import BenchError, fmt, run_and_eval
from dream3d.bench import markdown as bench_markdown
from dream3d import registry
from dream3d.config import ConfigError, REPRESENTATIONS

# A rule is a named preset: the key=value run overrides that select it. Every registered rule, plus
# SDS + kernel repulsion, which needs at least 3 particles; weight from a probe of 0 / 100 / 1000 on
# "a red shape" (docs/benchmarks.md): 100 found more classes at some cost in IoU, 1000 broke the shapes.
RULES: dict[str, tuple[str, ...]] = {
    **{name: (f"guidance={name}",) for name in registry.RULES.names},
    "rsd": ("particles=4", "repulsion.weight=100"),
}

# 100 steps at 32x32: the shapes have formed (IoU ~0.86 on "a green cube", docs/benchmarks.md) at a
# cost the matrix can afford; the export is one GLB on a 32^3 grid (the Gaussians' at 64^3 cost 12 s a run).
FULL_SETTINGS = (
    "steps=100", "resolution=32", "checkpoint_every=100", "preview_every=100",
    "export.formats=[glb]", "export.video=false", "export.mesh_resolution=32",
)
# seconds per run: a few steps on tiny grids; the numbers mean nothing, the plumbing is exercised
QUICK_SETTINGS = (
    "steps=6", "resolution=16", "checkpoint_every=6", "preview_every=6",
    "nerf.grid_resolutions=[8,16]", "nerf.num_samples=24", "nerf.occupancy_resolution=16", "gaussians.num_points=256",
    "export.formats=[glb]", "export.video=false", "export.mesh_resolution=16",
)


@dataclass(frozen=True)
class Matrix:
    """What one benchmark runs: every rule x representation x (faithful prompt x seed + ambiguous prompt x seed)."""

    rules: tuple[str, ...]
    representations: tuple[str, ...]
    faithful: tuple[str, ...]
    ambiguous: tuple[str, ...]
    seeds: tuple[int, ...]  # of the faithful prompts
    ambiguous_seeds: tuple[int, ...]
    particles: int  # per ambiguous run
    prior: str
    settings: tuple[str, ...]  # key=value overrides of every run

    def options(self, rule: str, representation: str, ambiguous: bool) -> list[str]:
        """The run options of one cell's run; the rule's overrides win over the shared settings."""
        particles = [f"particles={self.particles}"] if ambiguous and self.particles > 1 else []
        return ["--prior", self.prior, "--representation", representation, *self.settings, *particles, *RULES[rule]]


FULL = Matrix(
    rules=tuple(RULES), representations=REPRESENTATIONS,
    faithful=("a red sphere", "a green cube", "a blue cylinder", "a yellow cone"),
    ambiguous=("a red shape", "a cube"), seeds=(0,), ambiguous_seeds=(0, 1, 2), particles=4,
    prior="toy-unet-mv", settings=FULL_SETTINGS,
)
# What CI runs: 4 runs, on the closed-form prior (no UNet to load: a run's process starts in half the time).
# The ambiguous prompt runs 3 particles, so the diversity columns count 3 shapes, not always 1.
QUICK = Matrix(
    rules=("sds", "csd"), representations=("nerf",), faithful=("a red sphere",), ambiguous=("a cube",),
    seeds=(0,), ambiguous_seeds=(0,), particles=3, prior="toy-mv", settings=QUICK_SETTINGS,
)

TABLE_COLUMNS = (
    "iou", "r_precision", "colour_error", "distinct_classes", "entropy_bits",
    "seconds_per_step", "nfe_per_step", "peak_memory_mb",
)
HEADERS = ("IoU", "R-precision", "colour error", "distinct classes", "entropy (bits)", "s/step", "NFE/step", "peak MB")


def check(matrix: Matrix) -> Matrix:
    """The matrix, or ConfigError naming the first unknown rule or representation."""
    for kind, names, valid in (("rule", matrix.rules, tuple(RULES)),
                               ("representation", matrix.representations, REPRESENTATIONS)):
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise ConfigError(f"unknown {kind} {unknown[0]!r}; valid: {', '.join(valid)}" if unknown
                              else f"no {kind} to run; valid: {', '.join(valid)}")
    if matrix.particles < 1:
        raise ConfigError(f"particles must be at least 1, got {matrix.particles}")
    return matrix


def run_matrix(matrix: Matrix, out: Path, overrides: list[str], on_row: Callable[[dict], None] = lambda row: None
               ) -> list[dict]:
    """Runs every cell of the matrix under ``out/runs``; returns one row per run (``error`` set when it failed)."""
    rows = []
    for rule, representation, kind, prompt, seed, folder, options in cells(matrix, out, overrides):
        row = {"rule": rule, "representation": representation, "set": kind, "prompt": prompt,
               "seed": seed, **_run_row(prompt, seed, folder, options)}
        on_row(row)
        rows.append(row)
    return rows


def cells(matrix: Matrix, out: Path, overrides: list[str]) -> Iterator[tuple[str, str, str, str, int, Path, list[str]]]:
    """(rule, representation, prompt set, prompt, seed, run folder, run options) of every run, in run order."""
    for rule in matrix.rules:
        for representation in matrix.representations:
            for kind, prompts, seeds in (("faithful", matrix.faithful, matrix.seeds),
                                         ("ambiguous", matrix.ambiguous, matrix.ambiguous_seeds)):
                options = matrix.options(rule, representation, kind == "ambiguous") + overrides
                for prompt in prompts:
                    for seed in seeds:
                        folder = out / "runs" / rule / representation / f"{'-'.join(prompt.split())}-seed{seed}"
                        yield rule, representation, kind, prompt, seed, folder, options


def _run_row(prompt: str, seed: int, folder: Path, options: list[str]) -> dict:
    """One run's raw figures: its particles' eval metrics and the run's cost; or its error."""
    try:
        run_dir, summary, wall = run_and_eval(prompt, seed, folder, options)
    except BenchError as e:
        return {"error": str(e)}
    return {
        "run_dir": str(run_dir), "particles": summary["eval"].get("particles", [summary["eval"]]),
        "seconds_per_step": summary["seconds_per_step"], "nfe_per_step": summary.get("nfe_per_step", math.nan),
        "peak_memory_mb": summary["peak_memory_mb"], "wall_seconds": round(wall, 1),
    }


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
    for key in ("iou", "r_precision", "colour_error"):
        entry[key] = _median([p[key] for p in particles])
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


def markdown(entries: list[dict]) -> str:
    """The table as markdown: one line per (rule, representation)."""
    rows = [[e["rule"], e["representation"], str(e["runs"]), str(e["failed"]), *(fmt(e[c]) for c in TABLE_COLUMNS)]
            for e in entries]
    return bench_markdown(["rule", "representation", "runs", "failed", *HEADERS], rows)


def write(out: Path, matrix: Matrix, overrides: list[str], rows: list[dict]) -> list[dict]:
    """Writes bench.json (the matrix, the table and every raw row) and bench.md under ``out``; returns the table."""
    entries = table(matrix, rows)
    document = {"matrix": asdict(matrix), "overrides": overrides, "table": entries, "rows": rows}
    write_text(out / "bench.json", json.dumps(document, indent=2) + "\n")
    write_text(out / "bench.md", markdown(entries))
    return entries


def with_choices(matrix: Matrix, **choices: object) -> Matrix:
    """The matrix with the given fields replaced (None: keep the preset's)."""
    return check(replace(matrix, **{k: v for k, v in choices.items() if v is not None}))


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan

