"""One job, the same way for every front end: the web app's queue and the batch manifest keep the same
``Job`` record, and the web app's queue and the batch runner's workers start a run through
``run_job`` and get one ``Outcome`` back.

A job's states, in every front end: queued -> running -> done | stopped | failed. A user error
(``dream3d.errors``) fails the job with its one line; anything else is a bug, logged with its
traceback and summed up in one line. A job fails the same way on a retry when its input is at fault
(``input_errors``), so only the other failures are worth retrying.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, get_args

from dream3d.errors import one_line, user_errors

if TYPE_CHECKING:
    from dream3d.api import EventHandler, Result, StopCheck

log = logging.getLogger(__name__)

State = Literal["queued", "running", "stopped", "done", "failed"]
STATES: tuple[str, ...] = get_args(State)  # in the order the reports count them
QUEUED, RUNNING, STOPPED, DONE, FAILED = STATES
FINISHED = (STOPPED, DONE, FAILED)  # the end of an attempt (a batch resumes a stopped job)

Start = Callable[["EventHandler", "StopCheck"], "Result"]


@dataclass
class Job:
    """One job's record, in the web app's queue and in the batch manifest (``batch.jsonl``, a line each).

    settings: the config layer it runs, prompt included (the manifest leaves it out: the batch file
    holds it, and the job's id is its hash). line: its line in the batch file (0 for a web job).
    Times are Unix seconds; seconds is the wall time of all its work (resumes added up); attempts
    counts fresh starts (a new run folder each) and retries (which resume the checkpoint of a worker
    that died), resumes the continuations of an interrupted run; where: the host and worker slot of
    the last attempt. A stopped job may go on (the batch resumes it); the others in FINISHED are final.
    """

    __pydantic_config__ = {"extra": "forbid"}  # a manifest line with an unknown field is not a job record

    id: str
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    state: State = QUEUED
    error: str | None = None
    retryable: bool = True
    run_dir: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = 0.0
    train_seconds: float | None = None
    attempts: int = 0
    resumes: int = 0
    where: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass
class Outcome:
    """How a job ended: state (done, stopped or failed), the run's result when it finished, the
    one-line error of a failure, whether trying again could help, and the wall time."""

    state: str
    result: Result | None = None
    error: str | None = None
    retryable: bool = False
    seconds: float = 0.0


def input_errors() -> tuple[type[Exception], ...]:
    """The errors of a job's own input (its config, prompt, model or files): a retry fails the same way."""
    from dream3d.config import ConfigError
    from dream3d.guidance.base import GuidanceError
    from dream3d.guidance.priors.base import PriorError
    from dream3d.representations.splat_ply import PLYError

    return ConfigError, PriorError, GuidanceError, PLYError


def run_job(start: Start, on_event: EventHandler, should_stop: StopCheck, bug_details: bool = True) -> Outcome:
    """Runs ``start(on_event, should_stop)`` and says how it ended; never raises for the job's own failure.

    ``bug_details``: whether a bug's message reaches the outcome (False for a public web page, which
    shows only the exception's type and points at the server log)."""
    from dream3d.run.loop import RunInterrupted

    tick = time.perf_counter()
    try:
        result = start(on_event, should_stop)
    except RunInterrupted:
        return Outcome(STOPPED, seconds=time.perf_counter() - tick)
    except Exception as e:  # one job's failure, whatever it is, must not end the queue or the batch
        if isinstance(e, user_errors()):
            error = one_line(e)
        else:
            log.exception("a job failed")
            error = (f"internal error ({type(e).__name__}: {one_line(e)})" if bug_details
                     else f"internal error ({type(e).__name__}); see the server log")
        return Outcome(FAILED, error=error, retryable=not isinstance(e, input_errors()),
                       seconds=time.perf_counter() - tick)
    state = STOPPED if result.summary.get("stopped") else DONE
    return Outcome(state, result, seconds=time.perf_counter() - tick)
