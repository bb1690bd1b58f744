"""Stopping a run from outside: SIGINT/SIGTERM end any phase within seconds, leaving what was reached.

The code marks what it is doing with ``stage(what, left, polled)``. In a polled stage (the training and
refine loops, which ask ``should_stop`` between steps) a signal only sets the flag: the step finishes and
the loop checkpoints or keeps what it has. In any other stage (loading an ``--init-points`` file, building
the prior, exporting) the signal raises ``RunInterrupted`` at once, whose one line says which stage it
ended and what is left. A second signal exits the process at once. Used by the CLI and the batch runner's
workers; the web app stops its jobs with a ``threading.Event``, which the same loops poll.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class RunInterrupted(RuntimeError):
    """A stop request ended the run; the message is one line saying where and what was kept."""


@dataclass(frozen=True)
class _Stage:
    what: str  # "loading the prior": the line says "stopped while loading the prior"
    left: str  # what the stop leaves behind
    polled: bool


# Python runs signal handlers in the main thread only, so the stages of the main thread are all it reads;
# other threads (the web app's worker) stop through their own should_stop
_stages: list[_Stage] = []
_STARTING = _Stage("starting", "nothing was written", polled=False)
_installed: list["SignalStop"] = []  # the handler of this process, once one is installed


@contextmanager
def stage(what: str, left: str, polled: bool = False) -> Iterator[None]:
    """Marks a phase for the signal handler: what it is, what a stop leaves behind, and whether its code
    polls ``should_stop`` itself (then a signal waits for the current step).

    Entering a stage that does not poll after a signal arrived (during the last step of a polled one)
    raises RunInterrupted at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not polled and signalled():
        raise RunInterrupted(f"stopped before {what}; {left}")
    _stages.append(_Stage(what, left, polled))
    try:
        yield
    finally:
        _stages.pop()


def current_stage() -> tuple[str, str, bool]:
    """(what, left, polled) of the innermost stage; before any, the run is starting and nothing was written."""
    top = _stages[-1] if _stages else _STARTING
    return top.what, top.left, top.polled


def signalled() -> bool:
    """Whether this process's handler (if one is installed) received SIGINT or SIGTERM."""
    return bool(_installed) and _installed[-1].requested


def exit_after_signal(code: int = EXIT_INTERRUPTED) -> None:
    """Ends a signalled process now, skipping the interpreter's teardown (seconds once torch and a prior are
    loaded): the stop must end the process within seconds, and every file is already whole (atomic writes, a
    lock the kernel releases). Without a signal it returns, and the caller exits as usual."""
    if signalled():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class SignalStop:
    """A ``should_stop`` callable that turns true once SIGINT or SIGTERM arrived (installs the handlers).

    Outside a polled stage the first signal raises RunInterrupted where the main thread is; a second
    signal ends the process at once with exit code 130."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request)
        _installed[:] = [self]  # the latest handlers are the ones installed

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested:
            sys.stderr.write(f"interrupted: a second {signal.Signals(signum).name}; exiting at once\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)  # a step that never returns must not keep the process alive
        self.requested = True
        what, left, polled = current_stage()
        if not polled:
            raise RunInterrupted(f"stopped while {what}; {left}")

    def __call__(self) -> bool:
        return self.requested
