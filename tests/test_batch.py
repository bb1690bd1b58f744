"""dream3d batch: jobs from a file, the manifest, re-runs after a kill, local and Ray executors."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import dream3d
from dream3d.batch.batch_file import read_jobs
from dream3d.batch.manifest import Manifest, ManifestError
from dream3d.batch.scheduler import Batch, Coordinator, _resumable
from dream3d.rundir.job import DONE, STATES, Job
from dream3d.rundir.folder import checkpoint_paths
from tests.support import TINY
from tests.support import dream3d as dream3d_cli

REPO = Path(__file__).resolve().parent.parent


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def tiny_config(tmp_path, **changes):
    return write(tmp_path / "tiny.yaml", [yaml.safe_dump({**TINY, **changes})])


def records(out):
    return list(Manifest.load(out).records.values())


def run_dirs(out, job_id):
    return [p.parent for p in (out / job_id).glob("*/config.yaml")]


def test_generate_makes_an_asset_and_reports_progress(tmp_path):
    events = []
    result = dream3d.generate("a red cube", on_event=events.append, **{**TINY, "out": str(tmp_path / "runs")})
    assert result.files["glb"].is_file() and result.summary["steps"] == TINY["steps"]
    assert [e.step for e in events if e.kind == "step"] == list(range(1, TINY["steps"] + 1))
    assert events[-1].kind == "done"


def test_one_bad_prompt_does_not_stop_the_others(monkeypatch, capsys, tmp_path):
    prompts = write(tmp_path / "prompts.txt", ["# four jobs", "a red cube", "a blue sphere", "", "a red banana", "a cone"])
    out = tmp_path / "out"
    status, err = dream3d_cli(monkeypatch, capsys, "batch", prompts, "--out", out, "--config", tiny_config(tmp_path),
                              "--workers", "2")
    assert status == 1  # a job failed
    by_prompt = {r.prompt: r for r in records(out)}
    assert [r.line for r in by_prompt.values()] == [2, 3, 5, 6]
    assert {p for p, r in by_prompt.items() if r.state == "done"} == {"a red cube", "a blue sphere", "a cone"}
    bad = by_prompt["a red banana"]
    assert bad.state == "failed" and "does not know 'banana'" in bad.error
    assert bad.attempts == 1 and not bad.retryable  # an input error is not retried
    for record in by_prompt.values():
        if record.state == "done":
            assert (Path(record.run_dir) / "export" / "model.glb").is_file() and record.seconds > 0
    assert "3 done, 1 failed" in err and "does not know 'banana'" in err
    assert (out / "contact_sheet.png").is_file()

    # --status reads the manifest back and runs nothing
    status, err = dream3d_cli(monkeypatch, capsys, "batch", prompts, "--out", out, "--status")
    assert status == 1 and "4 jobs: 3 done, 1 failed" in err
    assert records(out) == list(by_prompt.values())


def test_a_manifest_written_before_the_record_was_one_job_type_still_loads(tmp_path):
    # a line exactly as the pydantic JobRecord of the earlier manifest wrote it
    old = {"id": "a-cube-1234abcd", "prompt": "a cube", "line": 2, "state": "done", "attempts": 1, "resumes": 0,
           "run_dir": "out/a-cube", "started_at": 1.0, "finished_at": 2.5, "seconds": 1.5, "train_seconds": 1.2,
           "error": None, "retryable": True, "where": "host:slot0:pid7"}
    write(tmp_path / "batch.jsonl", [json.dumps(old)])
    manifest = Manifest.load(tmp_path)
    assert manifest.records == {old["id"]: Job(**old)}
    manifest.save()
    assert json.loads((tmp_path / "batch.jsonl").read_text()) == old  # and it writes it back the same way


@pytest.mark.parametrize("line", ['{"id": "x", "prompt": "p", "state": "waiting"}', '{"id": "x", "prompt": "p", "nope": 1}'])
def test_a_manifest_line_that_is_no_job_record_is_one_line(tmp_path, line):
    write(tmp_path / "batch.jsonl", [line])
    with pytest.raises(ManifestError, match=r"batch.jsonl:1: not a batch job record$"):
        Manifest.load(tmp_path)


def test_the_web_queue_and_the_batch_keep_the_same_job_record(tmp_path):
    from dream3d.config import build_config
    from dream3d.rundir.result import Result
    from dream3d.web.queue import JobQueue

    queue = JobQueue(lambda cfg, on_event, should_stop: Result(tmp_path))
    web_job = queue.submit(build_config({"prompt": "a cube"}))
    (batch_job,) = read_jobs(write(tmp_path / "p.txt", ["a cube"]))
    assert type(web_job) is type(batch_job) is Job
    assert queue.wait(web_job, 5) and (web_job.state, web_job.run_dir) == (DONE, str(tmp_path))
    manifest = Manifest(tmp_path / "batch.jsonl")
    manifest.add(batch_job)
    manifest.save()
    assert set(STATES) == {"queued", "running", "stopped", "done", "failed"}
    assert Manifest.load(tmp_path).records[batch_job.id] == replace(batch_job, settings={})


class ScriptedExecutor:
    """Ends each submitted job with the next scripted outcome: "done", "crash" (retryable) or "bad"."""

    def __init__(self, outcomes):
        self.outcomes, self.pending = list(outcomes), []

    def free(self):
        return 1 - len(self.pending)

    def busy(self):
        return bool(self.pending)

    def submit(self, spec):
        self.pending.append(spec)

    def poll(self, timeout):
        events = []
        for spec in self.pending:
            outcome = self.outcomes.pop(0)
            events.append({"job": spec["id"], "kind": "started", "run_dir": f"r{len(self.outcomes)}", "where": "here"})
            final = {"job": spec["id"], "seconds": 1.0}
            if outcome == "done":
                events.append({**final, "kind": "done", "run_dir": f"r{len(self.outcomes)}", "train_seconds": 1.0})
            else:
                events.append({**final, "kind": "failed", "error": outcome, "retryable": outcome == "crash"})
        self.pending = []
        return events

    def stop(self):
        pass


@pytest.mark.parametrize("retries,outcomes,state,attempts", [
    (1, ["crash", "done"], "done", 2),
    (0, ["crash"], "failed", 1),
    (2, ["crash", "crash", "crash"], "failed", 3),
    (3, ["bad"], "failed", 1),
])
def test_failed_jobs_are_retried_up_to_k_times(tmp_path, retries, outcomes, state, attempts):
    prompts = write(tmp_path / "p.txt", ["a cube"])
    batch = Batch(tmp_path / "out", read_jobs(prompts), retries=retries)
    coordinator = Coordinator(batch, ScriptedExecutor(outcomes), Manifest.load(batch.out))
    coordinator.plan()
    assert coordinator.run(lambda: 0, lambda c: None, poll_s=0) is False
    (record,) = records(batch.out)
    assert (record.state, record.attempts, record.seconds) == (state, attempts, float(attempts))
    # a re-run with the same budget starts nothing more
    again = Coordinator(batch, ScriptedExecutor([]), Manifest.load(batch.out))
    again.plan()
    again.run(lambda: 0, lambda c: None, poll_s=0)
    assert records(batch.out) == [record]


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def pid_of(record):
    return int(record.where.rsplit("pid", 1)[1])


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is no longer running
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_batch_continues_where_it_stopped(monkeypatch, capsys, tmp_path, sig):
    steps = 24
    prompts = write(tmp_path / "prompts.txt", ["a red cube", "a blue sphere", "a cone"])
    out = tmp_path / "out"
    args = ["batch", prompts, "--out", out, "--config", tiny_config(tmp_path, steps=steps), "--workers", "1"]
    batch = subprocess.Popen([sys.executable, "-m", "dream3d", *map(str, args)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def second_job_checkpointed():
        done = [r for r in records(out) if r.state == "done"] if (out / "batch.jsonl").exists() else []
        running = [r for r in records(out) if r.state == "running" and r.run_dir] if done else []
        return running and checkpoint_paths(Path(running[0].run_dir))

    wait_for(second_job_checkpointed, 300, "one job done and the next checkpointed")
    batch.send_signal(sig)
    batch.wait(timeout=60)
    assert batch.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    killed = {r.prompt: r for r in records(out)}
    interrupted = next(r for r in killed.values() if r.state != "done" and r.run_dir)
    assert interrupted.state == ("running" if sig == signal.SIGKILL else "stopped")
    # the orphaned worker notices that its batch is gone, checkpoints and exits
    wait_for(lambda: not alive(pid_of(interrupted)), 60, "the interrupted job's worker to exit")

    status, err = dream3d_cli(monkeypatch, capsys, *args)
    assert status == 0, err
    final = {r.prompt: r for r in records(out)}
    assert all(r.state == "done" and r.attempts == 1 for r in final.values())
    for prompt, record in final.items():
        assert len(run_dirs(out, record.id)) == 1  # every job ran in exactly one run folder
        if killed[prompt].state == "done":
            assert record == killed[prompt]  # finished before the kill: not touched
    resumed = final[interrupted.prompt]
    assert resumed.resumes == 1 and resumed.run_dir == interrupted.run_dir
    logged = [json.loads(line)["step"] for line in (Path(resumed.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # each step once: resumed, not restarted


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_runs_a_batch(monkeypatch, capsys, tmp_path, local_ray):
    prompts = write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "a red cube"}),
                                                  json.dumps({"prompt": "a green sphere", "seed": 3})])
    out = tmp_path / "out"
    status, err = dream3d_cli(monkeypatch, capsys, "batch", prompts, "--out", out, "--config", tiny_config(tmp_path),
                              "--ray", "auto")
    assert status == 0, err
    final = records(out)
    assert [r.state for r in final] == ["done", "done"] and all(":ray:" in r.where for r in final)
    assert yaml.safe_load((Path(final[1].run_dir) / "config.yaml").read_text())["seed"] == 3
    assert local_ray.is_initialized()  # the batch used the test's instance and left it running


def test_jsonl_settings_override_the_defaults(tmp_path):
    prompts = write(tmp_path / "p.jsonl", ['{"prompt": "a cone", "seed": 3, "sds.weighting": "uniform", "nerf": {"lr": 0.5}}'])
    (job,) = read_jobs(prompts)
    assert job.settings == {"prompt": "a cone", "seed": 3, "sds": {"weighting": "uniform"}, "nerf": {"lr": 0.5}}
    config = Batch(tmp_path / "out", [job], {"seed": 1, "steps": 7}).job_config(job)
    assert (config["seed"], config["steps"], config["out"]) == (3, 7, str(tmp_path / "out" / job.id))


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a cone", "seed": ', "p.jsonl:3: not valid JSON"),
    ('["a cone"]', "p.jsonl:3: a line must be a JSON object"),
    ('{"seed": 3}', 'p.jsonl:3: the object has no "prompt" string'),
])
def test_a_malformed_jsonl_line_is_reported_with_its_number(monkeypatch, capsys, tmp_path, line, message):
    prompts = write(tmp_path / "p.jsonl", ['{"prompt": "a red cube"}', "# the next line is broken", line])
    out = tmp_path / "out"
    status, err = dream3d_cli(monkeypatch, capsys, "batch", prompts, "--out", out)
    assert status == 1 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_an_invalid_job_config_fails_that_job_only(tmp_path):
    prompts = write(tmp_path / "p.jsonl", ['{"prompt": "a cone"}', '{"prompt": "a cube", "steps": 0}'])
    batch = Batch(tmp_path / "out", read_jobs(prompts))
    coordinator = Coordinator(batch, ScriptedExecutor(["done"]), Manifest.load(batch.out))
    coordinator.plan()
    coordinator.run(lambda: 0, lambda c: None, poll_s=0)
    good, bad = records(batch.out)
    assert good.state == "done"
    assert (bad.state, bad.error, bad.attempts) == ("failed", "line 2: steps: Input should be greater than 0", 0)


def test_an_interrupted_job_resumes_its_newest_run_folder_unless_that_one_failed(tmp_path):
    job_dir = tmp_path / "job"
    old, new = job_dir / "a-cone-1", job_dir / "a-cone-2"
    for age, run in enumerate((new, old)):  # new is written last
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "step_000005.pt").touch()
        (run / "config.yaml").touch()
        os.utime(run / "config.yaml", (1000 - age, 1000 - age))
    assert _resumable(job_dir, None) == new
    assert _resumable(job_dir, new) is None  # a retry killed before it made its own folder starts afresh
    (new / "checkpoints" / "step_000005.pt").unlink()
    assert _resumable(job_dir, None) is None  # killed before its first checkpoint


class DyingExecutor(ScriptedExecutor):
    """The first attempt starts in a run folder with a checkpoint, then its worker dies; the next ends as scripted."""

    def __init__(self, run_dir, outcomes):
        super().__init__(outcomes)
        self.run_dir, self.specs = run_dir, []

    def poll(self, timeout):
        self.specs += self.pending
        if len(self.specs) > 1:
            return super().poll(timeout)
        (spec,) = self.pending
        self.pending = []
        return [{"job": spec["id"], "kind": "started", "run_dir": str(self.run_dir), "where": "here"},
                {"job": spec["id"], "kind": "failed", "seconds": 1.0, "retryable": True, "died": True,
                 "error": "the worker process exited with status -9"}]


@pytest.mark.parametrize("checkpointed, resumed", [(True, True), (False, False)])
def test_a_dead_workers_retry_resumes_its_checkpoint(tmp_path, checkpointed, resumed):
    prompts = write(tmp_path / "p.txt", ["a cube"])
    batch = Batch(tmp_path / "out", read_jobs(prompts), retries=1)
    run_dir = batch.out / batch.jobs[0].id / "a-cube-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    if checkpointed:
        (run_dir / "checkpoints" / "step_000005.pt").touch()
    executor = DyingExecutor(run_dir, ["done"])
    coordinator = Coordinator(batch, executor, Manifest.load(batch.out))
    coordinator.plan()
    coordinator.run(lambda: 0, lambda c: None, poll_s=0)
    assert executor.specs[1]["resume"] == (str(run_dir) if resumed else None)
    (record,) = records(batch.out)
    assert record.state == "done" and record.attempts == 2  # the death counts against the retries


def test_a_worker_that_keeps_dying_is_not_retried_forever(tmp_path):
    prompts = write(tmp_path / "p.txt", ["a cube"])
    batch = Batch(tmp_path / "out", read_jobs(prompts), retries=2)
    run_dir = batch.out / batch.jobs[0].id / "a-cube-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000005.pt").touch()

    class AlwaysDying(DyingExecutor):
        def poll(self, timeout):
            self.specs += self.pending
            spec, self.pending = self.pending[0], []
            return [{"job": spec["id"], "kind": "started", "run_dir": str(self.run_dir), "where": "here"},
                    {"job": spec["id"], "kind": "failed", "seconds": 1.0, "retryable": True, "died": True, "error": "killed"}]

    executor = AlwaysDying(run_dir, [])
    coordinator = Coordinator(batch, executor, Manifest.load(batch.out))
    coordinator.plan()
    coordinator.run(lambda: 0, lambda c: None, poll_s=0)
    (record,) = records(batch.out)
    assert (record.state, record.attempts, len(executor.specs)) == ("failed", 3, 3)
