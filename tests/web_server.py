"""``dream3d web`` in a subprocess on a free loopback port, and the headless chromium that drives it:
shared by the browser test and docs/make_pictures.py, so the page is screenshotted as it is tested."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_web(port: int, options: list[str], log: IO | int = subprocess.DEVNULL, timeout_s: float = 180) -> subprocess.Popen:
    """Starts ``dream3d web --port PORT OPTIONS`` and returns once the page answers; raises RuntimeError
    (the server killed) when it exits or does not answer within timeout_s."""
    command = [sys.executable, "-m", "dream3d", "web", "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=5)
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("dream3d web did not start")
            time.sleep(0.5)
