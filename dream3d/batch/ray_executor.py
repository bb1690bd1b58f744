"""The Ray executor: each job a Ray task (one GPU, or ``cpus_per_job`` CPUs on a CPU cluster).

Tasks write their run folders straight into the batch's output folder, so on a cluster
that folder must be shared storage mounted at the same path on every node. Progress and
the run folder come back through a Ray queue; the final event is the task's return value.
A stop request is a file (``.stop``) in the output folder, which every task checks between
steps: it reaches the workers on any node through the same shared storage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dream3d.batch import BatchError
from dream3d.batch.worker import describe_worker, run_job, use_threads
from dream3d.rundir.job import FAILED

# the local instance of `--ray auto` holds only small job specs and events
LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2


class RayNotAvailable(BatchError):
    """Ray is not installed, or the cluster cannot be reached; the message is one line."""


class RayExecutor:
    """Runs job specs as Ray tasks; ``poll`` returns their events."""

    def __init__(self, address: str, stop_file: Path, workers: int | None = None, cpus_per_job: int = 1) -> None:
        """address: "auto" starts a local Ray instance, anything else joins that cluster (an
        instance this process already runs is used as it is). workers caps concurrent jobs
        (default: what the cluster's GPUs, or CPUs / cpus_per_job, allow)."""
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise RayNotAvailable("--ray needs Ray: pip install 'dream3d[ray]'") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _connect(ray, address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.slots = workers or max(1, gpus or int(resources.get("CPU", 1)) // cpus_per_job)
        self._task = ray.remote(_ray_main).options(num_cpus=cpus_per_job, num_gpus=1 if gpus else 0, max_retries=0)
        self._events = Queue()
        self._cpus = cpus_per_job
        self._stop_file = stop_file
        self._running: dict[Any, str] = {}  # task ref -> job id

    def free(self) -> int:
        return self.slots - len(self._running)

    def busy(self) -> bool:
        return bool(self._running)

    def submit(self, spec: dict[str, Any]) -> None:
        ref = self._task.remote(spec, self._events, str(self._stop_file), self._cpus)
        self._running[ref] = spec["id"]

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """Progress events, then the final events of the tasks that ended within ``timeout``."""
        ready = []
        if self._running:
            ready, _ = self._ray.wait(list(self._running), num_returns=len(self._running), timeout=timeout)
        else:
            time.sleep(timeout)
        events = self._events.get_nowait_batch(self._events.qsize())
        for ref in ready:
            job_id = self._running.pop(ref)
            try:
                events.append(self._ray.get(ref))
            except self._ray.exceptions.RayError as e:  # the worker died or the node was lost
                message = " ".join(str(e).split())[:300]
                events.append({"job": job_id, "kind": FAILED, "seconds": 0.0, "retryable": True, "died": True,
                               "error": f"{type(e).__name__}: {message}"})
        return events

    def stop(self) -> None:
        self._stop_file.touch()

    def kill(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()

    def close(self) -> None:
        self.kill()
        if self._owns_ray:
            self._ray.shutdown()


def _connect(ray: Any, address: str) -> None:
    try:
        if address == "auto":
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayNotAvailable(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())}") from None


def _ray_main(spec: dict[str, Any], events: Any, stop_file: str, cpus: int) -> dict[str, Any]:
    use_threads(cpus)
    stop = Path(stop_file)
    return run_job(spec, events.put, stop.exists, describe_worker("ray"))
