"""What a person sees of a batch: the live table while it runs, the summary after it."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from dream3d.batch.manifest import Manifest
from dream3d.rundir.job import DONE, FAILED, QUEUED, RUNNING, STOPPED, Job

STATE_STYLES = {QUEUED: "dim", RUNNING: "cyan", STOPPED: "yellow", DONE: "green", FAILED: "red"}
SHOWN_FINISHED = 8  # the table lists every running job and the latest finished ones
ERROR_WIDTH = 60  # the summary prints errors in full


def live_table(manifest: Manifest, ids: list[str], progress: dict[str, tuple[int, int]]) -> Table:
    """Counts by state in the title; rows: running (or stopped) jobs with their step, then the latest finished."""
    counts = manifest.counts(ids)
    title = "  ".join(f"[{STATE_STYLES[s]}]{s} {n}[/]" for s, n in counts.items() if n or s != STOPPED)
    table = Table(title=title, expand=False)
    for column in ("job", "state", "step", "seconds"):
        table.add_column(column, no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=ERROR_WIDTH)
    records = [manifest.records[i] for i in ids]
    running = [r for r in records if r.state in (RUNNING, STOPPED)]
    finished = sorted((r for r in records if r.state in (DONE, FAILED)), key=lambda r: r.finished_at or 0)
    for record in running + finished[-SHOWN_FINISHED:]:
        step, total = progress.get(record.id, (0, 0))
        table.add_row(
            record.prompt, f"[{STATE_STYLES[record.state]}]{record.state}[/]", f"{step}/{total}" if total else "",
            f"{record.seconds:.1f}" if record.seconds else "", record.error or "",
        )
    return table


@dataclass
class Summary:
    """Counts by state, failures, and job time: in all, and per finished asset."""

    counts: dict[str, int]
    failures: list[Job]
    job_seconds: float
    seconds_per_asset: float | None

    @classmethod
    def of(cls, manifest: Manifest, ids: list[str]) -> "Summary":
        records = [manifest.records[i] for i in ids]
        done = [r.seconds for r in records if r.state == DONE]
        return cls(
            manifest.counts(ids), [r for r in records if r.state == FAILED],
            sum(r.seconds for r in records), sum(done) / len(done) if done else None,
        )

    def lines(self) -> list[str]:
        total = sum(self.counts.values())
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        lines = [f"{total} jobs: {counts}"]
        per_asset = f", {self.seconds_per_asset:.1f} s per finished asset" if self.seconds_per_asset else ""
        lines.append(f"job time: {self.job_seconds:.1f} s in all{per_asset}")
        lines += [f"failed: {r.prompt!r} (line {r.line}, attempts {r.attempts}): {r.error}" for r in self.failures]
        return lines
