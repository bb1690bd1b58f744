"""The web app's job queue: one optimisation at a time, the others wait in line.

A single worker thread takes jobs first come, first served (one device, one run), so two
browsers that press Generate together get both runs, one after the other. Each job
records the loop's progress events; the page polls a job's ``snapshot`` to draw them.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dream3d import api
from dream3d.config import RunConfig
from dream3d.jobs import QUEUED, RUNNING, STOPPED, run_job
from dream3d.loop import Progress

Runner = Callable[[RunConfig, api.EventHandler, api.StopCheck], api.Result]


def run_and_export(cfg: RunConfig, on_event: api.EventHandler, should_stop: api.StopCheck) -> api.Result:
    """The default runner: a fresh run that, when stopped, still exports what it reached."""
    return api.run(cfg, on_event, should_stop, export_on_stop=True)


@dataclass
class Snapshot:
    """What the page shows of a job at one moment. position: runs ahead of it (0 once it runs)."""

    state: str  # queued | running | done | stopped | failed (dream3d.jobs)
    position: int
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta_s: float = 0.0
    it_per_s: float = 0.0
    preview: Path | None = None
    result: api.Result | None = None
    error: str | None = None


@dataclass
class Job:
    id: str
    cfg: RunConfig
    state: str = QUEUED
    last_step: Progress | None = None
    preview: Path | None = None
    result: api.Result | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def record(self, event: Progress) -> None:
        """The loop's event handler: keeps the latest step and preview."""
        if event.kind == "step":
            self.last_step = event
        elif event.kind == "preview" and event.preview is not None:
            self.preview = event.preview


class JobQueue:
    """FIFO of jobs run by one worker thread; a user error (``dream3d.errors``) becomes a job's one-line error."""

    def __init__(self, runner: Runner = run_and_export) -> None:
        self._runner = runner
        self._pending: queue.Queue[Job] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []  # queued and running job ids, oldest first
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="dream3d-jobs", daemon=True)
        self._worker.start()

    def submit(self, cfg: RunConfig) -> Job:
        with self._lock:
            job = Job(id=f"job-{next(self._ids)}", cfg=cfg)
            self._jobs[job.id] = job
            self._order.append(job.id)
        self._pending.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def stop(self, job_id: str) -> bool:
        """Asks a running job to stop, and drops a queued one from the line at once (state
        "stopped", no result); False if there is no such unfinished job."""
        job = self._jobs.get(job_id)
        if job is None or job.finished.is_set():
            return False
        job.stop_requested.set()
        with self._lock:
            queued = job.state == QUEUED
        if queued:
            self._finish(job, STOPPED)
        return True

    def position(self, job: Job) -> int:
        """Jobs ahead of ``job`` in line (0: it runs now or has finished)."""
        with self._lock:
            return self._order.index(job.id) if job.id in self._order else 0

    def snapshot(self, job: Job) -> Snapshot:
        snap = Snapshot(job.state, self.position(job), preview=job.preview, result=job.result, error=job.error)
        if job.last_step is not None:
            event = job.last_step
            snap.step, snap.total = event.step, event.total
            snap.loss, snap.eta_s, snap.it_per_s = event.losses.get("loss"), event.eta_s, event.it_per_s
        else:
            snap.total = job.cfg.steps
        return snap

    def _work(self) -> None:
        while True:
            job = self._pending.get()
            with self._lock:
                if job.stop_requested.is_set():  # stopped while queued: already finished
                    continue
                job.state, job.started_at = RUNNING, time.monotonic()
            # a bug's details stay in the server log: the page is public
            outcome = run_job(lambda on_event, stop: self._runner(job.cfg, on_event, stop), job.record,
                              job.stop_requested.is_set, bug_details=False)
            job.result, job.error = outcome.result, outcome.error
            self._finish(job, outcome.state)

    def _finish(self, job: Job, state: str) -> None:
        with self._lock:
            if job.finished.is_set():
                return
            self._order.remove(job.id)
            job.state, job.finished_at = state, time.monotonic()
            job.finished.set()
