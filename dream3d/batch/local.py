"""The local executor: each job in its own process, one at a time per GPU (or per CPU worker).

Processes come from a forkserver that has imported dream3d once, so a job starts in a
fraction of a second and no state leaks from one job into the next. With GPUs, worker
slot i sees only GPU i (CUDA_VISIBLE_DEVICES); on a CPU machine N slots split the cores.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from typing import Any

from dream3d.batch.worker import describe_worker, run_job, use_threads
from dream3d.rundir.job import FAILED, FINISHED
from dream3d.run.stop import SignalStop

DEAD_WORKER_GRACE_S = 1.0


class LocalExecutor:
    """Runs job specs in worker processes; ``poll`` returns their events."""

    def __init__(self, workers: int | None = None, gpus: int = 0) -> None:
        """workers: concurrent jobs (default: one per GPU, else one); gpus: GPUs to share out."""
        self.slots = workers or max(gpus, 1)
        self._gpus = gpus
        self._threads = max(1, (os.cpu_count() or 1) // self.slots)
        methods = mp.get_all_start_methods()
        self._context = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self._context.set_forkserver_preload(["dream3d.batch.worker"])
        self._events = self._context.Queue()
        # workers watch the read end: it reaches EOF when this process is gone, however it died
        self._alive, self._alive_writer = self._context.Pipe(duplex=False)
        self._running: dict[str, tuple[Any, int]] = {}  # job id -> (process, slot)

    def free(self) -> int:
        return self.slots - len(self._running)

    def busy(self) -> bool:
        return bool(self._running)

    def submit(self, spec: dict[str, Any]) -> None:
        slot = min(set(range(self.slots)) - {s for _, s in self._running.values()})
        env = {"CUDA_VISIBLE_DEVICES": str(slot % self._gpus)} if self._gpus else {}
        process = self._context.Process(
            target=_process_main, args=(spec, self._events, self._alive, env, self._threads, slot), name=f"dream3d-job-{slot}"
        )
        process.start()
        self._running[spec["id"]] = (process, slot)

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """Events that arrived within ``timeout`` seconds; a worker that died without a final
        event (killed, out of memory) yields a failed event for its job."""
        events = self._drain(timeout)
        for job_id, (process, _) in list(self._running.items()):
            if process.exitcode is not None and not any(e["job"] == job_id and e["kind"] in FINISHED for e in events):
                events += self._drain(DEAD_WORKER_GRACE_S)  # its last words may still be in the pipe
                if not any(e["job"] == job_id and e["kind"] in FINISHED for e in events):
                    events.append({"job": job_id, "kind": FAILED, "seconds": 0.0, "retryable": True, "died": True,
                                   "error": f"the worker process exited with status {process.exitcode}"})
        for event in events:
            if event["kind"] in FINISHED and event["job"] in self._running:
                self._running.pop(event["job"])[0].join()
        return events

    def stop(self) -> None:
        """Asks every running job to checkpoint and stop (they report "stopped")."""
        for process, _ in self._running.values():
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)

    def kill(self) -> None:
        for process, _ in self._running.values():
            process.kill()
            process.join()
        self._running.clear()

    def close(self) -> None:
        self.kill()
        self._events.close()
        self._alive_writer.close()

    def _drain(self, timeout: float) -> list[dict[str, Any]]:
        events = []
        try:
            events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            return events


class _StopRequest(SignalStop):
    """True once SIGINT/SIGTERM arrived, or once the batch that started this worker is gone
    (killed): the loop then checkpoints, so a re-run resumes instead of two processes sharing
    a run folder."""

    def __init__(self, batch_alive: Any) -> None:
        super().__init__()
        self._batch_alive = batch_alive

    def __call__(self) -> bool:
        # poll() is true at EOF, which is the only thing this pipe ever says
        return self.requested or self._batch_alive.poll()


def _process_main(
    spec: dict[str, Any], events: Any, batch_alive: Any, env: dict[str, str], threads: int, slot: int
) -> None:
    stop = _StopRequest(batch_alive)
    os.environ.update(env)
    use_threads(threads)
    events.put(run_job(spec, events.put, stop, describe_worker(f"slot{slot}")))
