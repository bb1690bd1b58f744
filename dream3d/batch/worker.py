"""One job, run where an executor put it (a local process or a Ray task).

A job either starts fresh (a new run folder) or resumes the run folder of an interrupted
attempt with ``api.resume``, which finishes it exactly as an uninterrupted run would. It
reports through ``report`` (any picklable-dict sink: a multiprocessing queue, a Ray queue)
and returns its final event: done, stopped (checkpointed on a stop request) or failed.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dream3d import api
from dream3d.config import ConfigError, build_config
from dream3d.errors import one_line, user_errors
from dream3d.loop import Progress, RunInterrupted
from dream3d.guidance.base import GuidanceError
from dream3d.guidance.priors.base import PriorError
from dream3d.representations.splat_ply import PLYError

# errors of the job's own input: the same job fails the same way however often it is retried
INPUT_ERRORS = (ConfigError, PriorError, GuidanceError, PLYError)
STEP_REPORT_SECONDS = 0.5

Report = Callable[[dict[str, Any]], None]


def run_job(spec: dict[str, Any], report: Report, should_stop: Callable[[], bool], where: str) -> dict[str, Any]:
    """spec: {"id", "config": full config layer, "resume": run folder or None} -> the final event."""
    job_id = spec["id"]
    on_event = _step_reporter(job_id, report)
    tick = time.perf_counter()
    try:
        if spec["resume"]:
            report({"job": job_id, "kind": "started", "run_dir": spec["resume"], "where": where})
            result = api.resume(Path(spec["resume"]), on_event, should_stop)
        else:
            trainer = api.start(build_config(spec["config"]))
            report({"job": job_id, "kind": "started", "run_dir": str(trainer.run_dir), "where": where})
            result = api.train(trainer, on_event, should_stop)
    except RunInterrupted:
        return {"job": job_id, "kind": "stopped", "seconds": time.perf_counter() - tick}
    except Exception as e:  # one job's failure, whatever it is, must not end the batch
        return {
            "job": job_id, "kind": "failed", "seconds": time.perf_counter() - tick,
            "error": _one_line(e), "retryable": not isinstance(e, INPUT_ERRORS),
        }
    return {
        "job": job_id, "kind": "done", "run_dir": str(result.run_dir), "seconds": time.perf_counter() - tick,
        "train_seconds": result.summary.get("train_seconds"),
    }


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


def _one_line(error: Exception) -> str:
    # a user error is worded for users; anything else needs its type to make sense
    message = one_line(error)
    return message if isinstance(error, user_errors()) else f"{type(error).__name__}: {message}"
