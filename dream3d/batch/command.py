"""``dream3d batch``: the command line's side of a batch (executor choice, live table, summary)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from dream3d.batch import BatchError, BatchInterrupted
from dream3d.batch.contact_sheet import contact_sheet
from dream3d.batch.batch_file import read_jobs
from dream3d.batch.manifest import MANIFEST_NAME, Manifest
from dream3d.batch.report import Summary, live_table
from dream3d.batch.scheduler import STOP_FILE, Batch, Coordinator, Executor, OutputLock

CONTACT_SHEET = "contact_sheet.png"


class _Interrupts:
    """Counts SIGINT/SIGTERM: the first stops the batch cleanly, the second kills its jobs."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._count)

    def _count(self, signum: int, frame: Any) -> None:
        self.count += 1

    def __call__(self) -> int:
        return self.count


def default_out(file: Path) -> Path:
    return Path("batches") / file.stem


def run_batch_command(
    file: Path, out: Path | None, defaults: dict[str, Any], workers: int | None, ray: str | None, retries: int,
    console: Console,
) -> int:
    """Runs what is left of the batch in FILE; returns the exit status (1 if a job failed)."""
    if workers is not None and workers < 1:
        raise BatchError(f"--workers must be at least 1, got {workers}")
    if retries < 0:
        raise BatchError(f"--retries must be 0 or more, got {retries}")
    batch = Batch(out or default_out(file), read_jobs(file), defaults, retries)
    lock = OutputLock(batch.out)
    stop_file = batch.out / STOP_FILE
    stop_file.unlink(missing_ok=True)  # left by a batch that was killed while stopping
    tick = time.perf_counter()
    try:
        coordinator = Coordinator(batch, _executor(ray, workers, stop_file), Manifest.load(batch.out))
        coordinator.plan()
        try:
            stopped = _run_with_table(coordinator, console)
        finally:
            coordinator.executor.close()
    finally:
        stop_file.unlink(missing_ok=True)
        lock.release()
    finished, wall = len(coordinator.finished), time.perf_counter() - tick
    console.print(f"this run: {finished} assets in {wall:.1f} s ({60 * finished / wall:.2f} assets/min)")
    summary = _summarize(coordinator.manifest, coordinator.ids, batch.out, console)
    if stopped:
        raise BatchInterrupted("the batch stopped; run the same command again to continue it")
    return 1 if summary.failures else 0


def show_status(file: Path, out: Path | None, console: Console) -> int:
    """``--status``: the table and the summary from the manifest, without running anything."""
    out = out or default_out(file)
    if not (out / MANIFEST_NAME).exists():
        raise BatchError(f"no batch has run in {out} yet (no {MANIFEST_NAME})")
    manifest = Manifest.load(out)
    ids = [job.id for job in read_jobs(file) if job.id in manifest.records]
    console.print(live_table(manifest, ids, {}))
    return 1 if _summarize(manifest, ids, out, console).failures else 0


def _executor(ray: str | None, workers: int | None, stop_file: Path) -> Executor:
    if ray is not None:
        from dream3d.batch.ray_executor import RayExecutor

        return RayExecutor(ray, stop_file, workers)
    import torch

    from dream3d.batch.local import LocalExecutor

    return LocalExecutor(workers, torch.cuda.device_count())


def _run_with_table(coordinator: Coordinator, console: Console) -> bool:
    """Runs the batch under a live table on a terminal; elsewhere (a log) the table is printed once, at the end."""
    interrupts = _Interrupts()
    if not console.is_terminal:
        stopped = coordinator.run(interrupts, lambda c: None)
        console.print(_table(coordinator))
        return stopped
    with Live(_table(coordinator), console=console, refresh_per_second=4) as live:
        return coordinator.run(interrupts, lambda c: live.update(_table(c)))


def _table(coordinator: Coordinator) -> Any:
    return live_table(coordinator.manifest, coordinator.ids, coordinator.progress)


def _summarize(manifest: Manifest, ids: list[str], out: Path, console: Console) -> Summary:
    summary = Summary.of(manifest, ids)
    for line in summary.lines():
        console.print(line, highlight=False, soft_wrap=True)
    sheet = contact_sheet([manifest.records[i] for i in ids], out / CONTACT_SHEET)
    console.print(f"manifest: {out / MANIFEST_NAME}" + (f"\ncontact sheet: {sheet}" if sheet else ""), highlight=False)
    return summary
