"""The coordinator of a batch: plans what is left to do from the manifest, feeds an executor,
and records every job's progress in the manifest as its events arrive.

Each job gets its own folder ``OUT/<job id>/`` that receives the run folder of each of its
attempts. A job found "running" or "stopped" (the batch was killed or interrupted) resumes the
newest of those run folders from its latest checkpoint with ``dream3d resume``'s code, which
ends with the same parameters and metrics as an uninterrupted run: no finished step is
computed twice. Only an attempt killed before its first checkpoint starts again from scratch.
"""

from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from dream3d.rundir import folder as rundir
from dream3d.batch import BatchError
from dream3d.batch.manifest import Manifest
from dream3d.config import ConfigError, build_config, merge
from dream3d.rundir.job import DONE, FAILED, QUEUED, RUNNING, STOPPED, Job

STOP_FILE = ".stop"
LOCK_FILE = ".batch.lock"


class Executor(Protocol):
    def free(self) -> int: ...
    def busy(self) -> bool: ...
    def submit(self, spec: dict[str, Any]) -> None: ...
    def poll(self, timeout: float) -> list[dict[str, Any]]: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class Batch:
    """What to run: the jobs of a file, the config layer they all start from, where, how often to retry."""

    out: Path
    jobs: list[Job]
    defaults: dict[str, Any] = field(default_factory=dict)
    retries: int = 1

    def job_config(self, job: Job) -> dict[str, Any]:
        return merge(merge(self.defaults, job.settings), {"out": str(self.out / job.id)})


class Coordinator:
    """Runs one batch with one executor. ``progress`` maps a running job to (step, total)."""

    def __init__(self, batch: Batch, executor: Executor, manifest: Manifest) -> None:
        self.batch = batch
        self.executor = executor
        self.manifest = manifest
        self.progress: dict[str, tuple[int, int]] = {}
        self.finished: list[str] = []  # jobs done in this run, in order
        self.ids = [job.id for job in batch.jobs]
        self._jobs = {job.id: job for job in batch.jobs}
        self._specs: dict[str, dict[str, Any]] = {}
        self._started: set[str] = set()
        self._queue: list[dict[str, Any]] = []

    def plan(self) -> None:
        """Adds new jobs to the manifest, records those whose config is invalid as failed, and
        queues the rest: new, retryable failures, and interrupted runs (to resume)."""
        for job in self.batch.jobs:
            self.manifest.add(job)
        for job in self.batch.jobs:
            record = self.manifest.records[job.id]
            if record.state == DONE:
                continue
            try:
                build_config(self.batch.job_config(job))
            except ConfigError as e:
                record.state, record.error, record.retryable = FAILED, f"line {job.line}: {e}", False
                continue
            if record.state in (RUNNING, STOPPED):
                failed_run = Path(record.run_dir) if record.error and record.run_dir else None
                self._queue.append(self._spec(job, _resumable(self.batch.out / job.id, failed_run)))
            elif record.state == QUEUED or self._may_retry(record):
                self._queue.append(self._spec(job, None))
        self.manifest.save()

    def run(self, interrupts: Callable[[], int], on_change: Callable[["Coordinator"], None], poll_s: float = 0.2) -> bool:
        """Runs the queue to the end; True if it was interrupted (the first interrupt lets running
        jobs checkpoint and stop, a second kills them)."""
        stopping = False
        while self._queue or self.executor.busy():
            if interrupts() >= 2:
                self.executor.kill()
                break
            if interrupts() and not stopping:
                stopping = True
                self._queue.clear()
                self.executor.stop()
            while not stopping and self._queue and self.executor.free() > 0:
                self._submit(self._queue.pop(0))
            for event in self.executor.poll(poll_s):
                self._handle(event, stopping)
            on_change(self)
        return stopping

    def _spec(self, job: Job, resume: Path | None, retry: bool = False) -> dict[str, Any]:
        """retry: the job failed before; a resumed retry then counts as an attempt too."""
        return {"id": job.id, "config": self.batch.job_config(job), "resume": str(resume) if resume else None,
                "retry": retry}

    def _may_retry(self, record: Job) -> bool:
        return record.state == FAILED and record.retryable and record.attempts <= self.batch.retries

    def _submit(self, spec: dict[str, Any]) -> None:
        self._specs[spec["id"]] = spec
        self.executor.submit(spec)
        self.manifest.update(spec["id"], state=RUNNING)

    def _handle(self, event: dict[str, Any], stopping: bool) -> None:
        job_id, kind = event["job"], event["kind"]
        record = self.manifest.records[job_id]
        if kind == "step":
            self.progress[job_id] = (event["step"], event["total"])
            return
        if kind == "started":
            self._started.add(job_id)
            spec = self._specs[job_id]
            fresh = spec["resume"] is None
            self.manifest.update(
                job_id, run_dir=event["run_dir"], where=event["where"], error=None,
                started_at=record.started_at or time.time(),
                # a resumed attempt whose start the killed batch never heard of counts here, and so
                # does the retry of a worker that died (so a job killed every time is not retried forever)
                attempts=record.attempts + (fresh or record.attempts == 0 or spec["retry"]),
                resumes=record.resumes + (not fresh),
            )
            return
        self.progress.pop(job_id, None)
        fields: dict[str, Any] = {"seconds": round(record.seconds + event["seconds"], 2)}
        resume: Path | None = None
        if kind == DONE:
            fields.update(state=DONE, run_dir=event["run_dir"], train_seconds=event["train_seconds"],
                          finished_at=time.time(), error=None)
            self.finished.append(job_id)
        elif kind == STOPPED:
            fields.update(state=STOPPED)
        else:
            spec = self._specs[job_id]
            if job_id not in self._started and (spec["resume"] is None or spec["retry"]):
                fields["attempts"] = record.attempts + 1  # died before it could say it started
            resume = self._checkpointed_run(job_id, record) if event.get("died") else None
            fields.update(state=FAILED, error=event["error"], retryable=event["retryable"], finished_at=time.time())
        self._started.discard(job_id)
        record = self.manifest.update(job_id, **fields)
        if not stopping and self._may_retry(record):
            self._queue.append(self._spec(self._jobs[job_id], resume, retry=True))

    def _checkpointed_run(self, job_id: str, record: Job) -> Path | None:
        """The run folder of the attempt that just died, if it said it started and has a checkpoint:
        its retry resumes there (a worker killed mid-run) instead of starting from step 0."""
        run_dir = Path(record.run_dir) if job_id in self._started and record.run_dir else None
        return run_dir if run_dir is not None and rundir.checkpoint_paths(run_dir) else None


def _resumable(job_dir: Path, failed_run: Path | None) -> Path | None:
    """The newest run folder of a job if it has a checkpoint to continue from and is not the
    folder of a failed attempt (a retry killed before it made its own folder)."""
    runs = sorted(job_dir.glob("*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if runs and runs[-1].parent != failed_run and rundir.checkpoint_paths(runs[-1].parent):
        return runs[-1].parent
    return None


class OutputLock:
    """One batch at a time per output folder (a second would run the same jobs twice)."""

    def __init__(self, out: Path) -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._file = open(out / LOCK_FILE, "w")
        except OSError as e:
            raise BatchError(f"cannot write to output folder {out}: {e.strerror}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise BatchError(f"another dream3d batch is running in {out}") from None

    def release(self) -> None:
        self._file.close()
