"""The web app's job queue: one optimisation at a time, the others wait in line.

A single worker thread takes jobs first come, first served (one device, one run), so two
browsers that press Generate together get both runs, one after the other. A job is the
``dream3d.rundir.job.Job`` record the batch manifest keeps too; the queue holds beside it what only a
live page needs (the stop and finished flags, the latest progress event and preview), and the
page polls a job's ``snapshot`` to draw them.
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
from dream3d.rundir.job import QUEUED, RUNNING, STOPPED, Job, run_job
from dream3d.run.loop import Progress
from dream3d.rundir.result import Result

Runner = Callable[[RunConfig, api.EventHandler, api.StopCheck], Result]


def run_and_export(cfg: RunConfig, on_event: api.EventHandler, should_stop: api.StopCheck) -> Result:
    """The default runner: a fresh run that, when stopped, still exports what it reached."""
    return api.run(cfg, on_event, should_stop, export_on_stop=True)


@dataclass
class Snapshot:
    """What the page shows of a job at one moment. position: runs ahead of it (0 once it runs)."""

    state: str  # dream3d.rundir.job.STATES
    position: int
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta_s: float = 0.0
    it_per_s: float = 0.0
    preview: Path | None = None


@dataclass
class _Live:
    """What the queue keeps of a job while a page may watch it."""

    cfg: RunConfig
    stop_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    last_step: Progress | None = None
    preview: Path | None = None

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
        self._live: dict[str, _Live] = {}
        self._order: list[str] = []  # queued and running job ids, oldest first
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="dream3d-jobs", daemon=True)
        self._worker.start()

    def submit(self, cfg: RunConfig) -> Job:
        with self._lock:
            job = Job(id=f"job-{next(self._ids)}", prompt=cfg.prompt, settings=cfg.model_dump(mode="json"))
            self._jobs[job.id], self._live[job.id] = job, _Live(cfg)
            self._order.append(job.id)
        self._pending.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Blocks until ``job`` has finished (True) or ``timeout`` seconds have passed (False)."""
        return self._live[job.id].finished.wait(timeout)

    def stop(self, job_id: str) -> bool:
        """Asks a running job to stop, and drops a queued one from the line at once (state
        "stopped", no run folder); False if there is no such unfinished job."""
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return False
        self._live[job_id].stop_requested.set()
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
        live = self._live[job.id]
        snap = Snapshot(job.state, self.position(job), preview=live.preview)
        if live.last_step is not None:
            event = live.last_step
            snap.step, snap.total = event.step, event.total
            snap.loss, snap.eta_s, snap.it_per_s = event.losses.get("loss"), event.eta_s, event.it_per_s
        else:
            snap.total = live.cfg.steps
        return snap

    def _work(self) -> None:
        while True:
            job = self._pending.get()
            live = self._live[job.id]
            with self._lock:
                if live.stop_requested.is_set():  # stopped while queued: already finished
                    continue
                job.state, job.started_at = RUNNING, time.time()
            # a bug's details stay in the server log: the page is public
            outcome = run_job(lambda on_event, stop: self._runner(live.cfg, on_event, stop), live.record,
                              live.stop_requested.is_set, bug_details=False)
            if outcome.result is not None:
                job.run_dir, job.train_seconds = str(outcome.result.run_dir), outcome.result.summary.get("train_seconds")
            job.error, job.retryable, job.seconds = outcome.error, outcome.retryable, round(outcome.seconds, 2)
            job.attempts = 1
            self._finish(job, outcome.state)

    def _finish(self, job: Job, state: str) -> None:
        with self._lock:
            if self._live[job.id].finished.is_set():
                return
            self._order.remove(job.id)
            job.state, job.finished_at = state, time.time()
            self._live[job.id].finished.set()
