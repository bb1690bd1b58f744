"""One job, run where an executor put it (a local process or a Ray task).

A job either starts fresh (a new run folder) or resumes the run folder of an interrupted
attempt with ``api.resume``, which finishes it exactly as an uninterrupted run would. It
reports through ``report`` (any picklable-dict sink: a multiprocessing queue, a Ray queue)
and returns its final event: done, stopped (checkpointed on a stop request) or failed, as
``dream3d.rundir.job.run_job`` (the web app's queue runs its jobs through it too) says it ended.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dream3d import api
from dream3d.rundir import job
from dream3d.config import build_config
from dream3d.run.loop import Progress

STEP_REPORT_SECONDS = 0.5

Report = Callable[[dict[str, Any]], None]


def run_job(spec: dict[str, Any], report: Report, should_stop: Callable[[], bool], where: str) -> dict[str, Any]:
    """spec: {"id", "config": full config layer, "resume": run folder or None} -> the final event."""
    job_id = spec["id"]

    def start(on_event: Callable[[Progress], None], stop: Callable[[], bool]) -> Any:
        if spec["resume"]:
            report({"job": job_id, "kind": "started", "run_dir": spec["resume"], "where": where})
            return api.resume(Path(spec["resume"]), on_event, stop)
        trainer = api.start(build_config(spec["config"]))
        report({"job": job_id, "kind": "started", "run_dir": str(trainer.run_dir), "where": where})
        return api.train(trainer, on_event, stop)

    outcome = job.run_job(start, _step_reporter(job_id, report), should_stop)
    final = {"job": job_id, "kind": outcome.state, "seconds": outcome.seconds}
    if outcome.state == job.FAILED:
        return {**final, "error": outcome.error, "retryable": outcome.retryable}
    if outcome.state == job.DONE:
        return {**final, "run_dir": str(outcome.result.run_dir), "train_seconds": outcome.result.summary.get("train_seconds")}
    return final


def use_threads(threads: int) -> None:
    """Caps torch's intra-op threads so that concurrent jobs do not oversubscribe the cores."""
    torch.set_num_threads(max(1, threads))


def describe_worker(slot: str) -> str:
    return f"{socket.gethostname()}:{slot}:pid{os.getpid()}"


def _step_reporter(job_id: str, report: Report) -> Callable[[Progress], None]:
    """Forwards step events, at most one per STEP_REPORT_SECONDS (the table needs no more)."""
    last = 0.0

    def on_event(event: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if event.kind == "step" and (now - last >= STEP_REPORT_SECONDS or event.step == event.total):
            last = now
            report({"job": job_id, "kind": "step", "step": event.step, "total": event.total})

    return on_event
