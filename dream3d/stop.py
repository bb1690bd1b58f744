"""Stopping a run from outside: SIGINT/SIGTERM ask the loop to stop after the current step (it then
checkpoints, so the run can be resumed). Used by the CLI and the batch runner's workers; the web app
stops its jobs with a ``threading.Event``."""

from __future__ import annotations

import signal
from typing import Any


class SignalStop:
    """A ``should_stop`` callable that turns true once SIGINT or SIGTERM arrived (installs the handlers)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested
