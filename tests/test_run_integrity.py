"""The run folder as untrusted input and as the only record of work: checkpoints load weights-only
(a pickled payload never runs), one process at a time trains or exports into a run, an
unreadable latest checkpoint falls back to an older one, and a full disk or a read-only
folder ends in one line that names the last good checkpoint."""

import errno
import os
import pickle
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from dream3d import api
from dream3d.rundir import folder as rundir
from dream3d.config import build_config
from dream3d.run.loop import RunError, RunInterrupted, Trainer
from tests.support import TINY
from tests.support import dream3d

QUICK_EXPORT = {"export": {**TINY["export"], "formats": ["ply"], "video": False}}


class Payload:
    """Pickles as a call of os.system: what a crafted checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cli(*args, fsize=None, timeout=300):
    """``python -m dream3d ARGS`` in a fresh process: (exit status, stderr lines). fsize: RLIMIT_FSIZE in bytes."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    proc = subprocess.run([sys.executable, "-m", "dream3d", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)
    return proc.returncode, proc.stderr.strip().splitlines()


@contextmanager
def file_size_limit(limit):
    """RLIMIT_FSIZE in this process (Python ignores SIGXFSZ: a write past it fails with EFBIG, as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def stop_at(step):
    seen = []
    return seen.append, lambda: bool(seen) and seen[-1].step >= step


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny NeRF run stopped at step 7 (checkpoints 5 and 7), kept pristine: tests use copies."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.raises(RunInterrupted):
        api.run(build_config({"prompt": "a red cube"}, TINY, QUICK_EXPORT, {"out": str(out)}), *stop_at(7))
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture
def run_dir(stopped, tmp_path):
    copy = tmp_path / stopped.name
    shutil.copytree(stopped, copy)
    return copy


def steps_logged(run_dir):
    return [yaml.safe_load(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(lines, *fragments):
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines


# -- item 1: weights only -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["resume", "export", "eval"])
@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(run_dir, tmp_path, monkeypatch, capsys, command,
                                                                   form):
    marker = tmp_path / "payload-ran"
    crafted = run_dir / "checkpoints" / "step_000099.pt"
    state = {"step": 99, "representation": Payload(marker)}
    if form == "torch.save":
        torch.save(state, crafted)
    else:
        crafted.write_bytes(pickle.dumps(state))
    status, err = dream3d(monkeypatch, capsys, command, run_dir)
    assert status == 1
    one_error_line(err.splitlines(), f"refusing {crafted}")
    assert not marker.exists()
    assert steps_logged(run_dir) == list(range(1, 8))  # nothing trained, nothing written


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.tiny_diffusers import build_tiny_sd

    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


KINDS = {
    "nerf": {},
    "gaussians-densified": {"representation": "gaussians", "gaussians": {
        "num_points": 256, "refine_start": 1, "refine_every": 2, "refine_stop": 6, "grow_grad2d": 0.0}},
    "particles": {"particles": 2},
    "vsd": {"prior": "sd", "guidance": "vsd", "prompt": "a cat"},
    "esd": {"prior": "sd", "guidance": "esd", "prompt": "a cat"},
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_loads_weights_only(kind, tmp_path, monkeypatch, request):
    layers = {"prompt": "a red cube", "steps": 4, "checkpoint_every": 2, **KINDS[kind], "out": str(tmp_path)}
    if layers.get("prior") == "sd":
        layers["model"] = request.getfixturevalue("tiny_sd")
        monkeypatch.setenv("DREAM3D_CACHE", str(tmp_path / "cache"))
    cfg = build_config(TINY, QUICK_EXPORT, layers)
    with pytest.raises(RunInterrupted):
        api.run(cfg, *stop_at(2))
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name != "cache"]
    state = rundir.load_checkpoint(rundir.checkpoint_paths(run_dir)[-1])
    if kind == "gaussians-densified":
        assert len(state["representation"]["params.means"]) != 256  # densification changed the count
    if kind in ("vsd", "esd"):
        assert state["guidance"]  # the LoRA and its AdamW state
    api.resume(run_dir)
    assert steps_logged(run_dir) == [1, 2, 3, 4]


# -- item 4: one process at a time --------------------------------------------------------------------

@contextmanager
def held_by_another_thread(run_dir):
    taken, release = threading.Event(), threading.Event()

    def hold():
        with rundir.locked(run_dir):
            taken.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(timeout=60), "the holder thread could not take the lock"
    try:
        yield
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("command", ["resume", "export", "eval"])
def test_a_locked_run_is_refused_naming_the_holder(run_dir, monkeypatch, capsys, command):
    before = (run_dir / "metrics.jsonl").read_bytes()
    with held_by_another_thread(run_dir):
        status, err = dream3d(monkeypatch, capsys, command, run_dir)
    assert status == 1
    one_error_line(err.splitlines(), f"{run_dir} is in use by pid {os.getpid()} (")
    assert (run_dir / "metrics.jsonl").read_bytes() == before and not (run_dir / "export").exists()


def test_a_run_locked_by_this_process_is_refused_to_the_cli(run_dir):
    with rundir.locked(run_dir):
        status, err = cli("resume", run_dir)
    assert status == 1
    one_error_line(err, f"{run_dir} is in use by pid {os.getpid()} (")
    assert steps_logged(run_dir) == list(range(1, 8))


def test_two_concurrent_resumes_exactly_one_trains(run_dir, tmp_path):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "steps": 999_999, "checkpoint_every": 999_999}))
    logs = [tmp_path / f"err{i}" for i in range(2)]
    logged = len(steps_logged(run_dir))
    procs = [subprocess.Popen([sys.executable, "-m", "dream3d", "resume", str(run_dir)], stdout=subprocess.PIPE,
                              stderr=log.open("w")) for log in logs]
    try:
        # the refused one exits at once (its stdout closes); the other trains until told to stop
        with selectors.DefaultSelector() as sel:
            for proc in procs:
                sel.register(proc.stdout, selectors.EVENT_READ, proc)
            first = sel.select(timeout=180)[0][0].data
        refused = procs.index(first)
        assert first.wait(timeout=60) == 1
        trainer = procs[1 - refused]
        # a signal while the run loads ends it at once ("stopped while starting"); this one is for the loop
        deadline = time.monotonic() + 180
        while len(steps_logged(run_dir)) <= logged and time.monotonic() < deadline:
            time.sleep(0.2)
        assert trainer.poll() is None
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=120) == 130
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    one_error_line(logs[refused].read_text().strip().splitlines(), "is in use by pid", "dream3d resume")
    assert logs[1 - refused].read_text().strip().splitlines()[-1].startswith("interrupted: stopped at step")
    steps = steps_logged(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # no step logged twice


def test_a_killed_holder_leaves_no_stale_lock(run_dir):
    code = "import sys; from dream3d.rundir.lock import folder_lock\nwith folder_lock(sys.argv[1]): print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(rundir.RunDirError, match=f"in use by pid {holder.pid}"):
            with rundir.locked(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    with rundir.locked(run_dir):
        assert f"pid {os.getpid()}" in (run_dir / ".lock").read_text()


def test_the_lock_is_reentrant_within_a_thread(run_dir):
    with rundir.locked(run_dir), rundir.locked(run_dir):
        assert f"pid {os.getpid()}" in (run_dir / ".lock").read_text()
    assert (run_dir / ".lock").read_text() == ""


def test_a_folder_that_cannot_hold_a_lock_file_is_one_line(tmp_path):
    with pytest.raises(rundir.RunDirError, match=f"cannot lock {tmp_path / 'gone'}: No such file or directory"):
        with rundir.locked(tmp_path / "gone"):
            pass


# -- item 5: an unreadable latest checkpoint -------------------------------------------------------------

def test_resume_from_an_empty_latest_checkpoint_falls_back_and_says_so(run_dir, monkeypatch, capsys, caplog):
    (run_dir / "checkpoints" / "step_000007.pt").write_bytes(b"")
    status, err = dream3d(monkeypatch, capsys, "resume", run_dir)
    assert status == 0, err  # not 130: an EOFError never becomes click's Abort
    assert caplog.messages == [f"warning: {run_dir}/checkpoints/step_000007.pt is empty; using step_000005.pt instead"]
    assert steps_logged(run_dir) == list(range(1, 13))


def test_the_fallback_warning_is_one_line_on_stderr(run_dir):
    (run_dir / "checkpoints" / "step_000007.pt").write_bytes(b"")
    status, err = cli("export", run_dir)
    assert status == 0
    assert err[0] == f"warning: {run_dir}/checkpoints/step_000007.pt is empty; using step_000005.pt instead"
    assert not any(line.startswith("warning:") for line in err[1:])


@pytest.mark.parametrize("command", [api.export, api.evaluate])
def test_export_and_eval_fall_back_past_a_truncated_checkpoint(run_dir, caplog, command):
    latest = run_dir / "checkpoints" / "step_000007.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    command(run_dir)
    assert f"{latest} is truncated; using step_000005.pt instead" in caplog.text


def test_no_readable_checkpoint_is_one_line(run_dir, monkeypatch, capsys):
    for path in rundir.checkpoint_paths(run_dir):
        path.write_bytes(path.read_bytes()[:100])
    status, err = dream3d(monkeypatch, capsys, "export", run_dir)
    assert status == 1
    one_error_line(err.splitlines(), f"{run_dir} has no readable checkpoint", "step_000005.pt is truncated")


@pytest.mark.parametrize("command", ["resume", "export", "eval"])
def test_a_checkpoint_of_another_representation_is_one_line(run_dir, tmp_path, monkeypatch, capsys, command):
    gaussians = build_config({"prompt": "a red cube", "representation": "gaussians"}, TINY, {"out": str(tmp_path)})
    trainer = Trainer(gaussians, tmp_path)
    trainer.step = 8
    shutil.copy(trainer.save_checkpoint(), run_dir / "checkpoints" / "step_000008.pt")
    status, err = dream3d(monkeypatch, capsys, command, run_dir)
    assert status == 1
    one_error_line(err.splitlines(), "step_000008.pt is not a checkpoint of a nerf run")
    assert not (run_dir / "export").exists() and steps_logged(run_dir) == list(range(1, 8))


# -- item 6: a full disk, a read-only folder ---------------------------------------------------------------

def test_a_full_disk_at_the_first_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, **QUICK_EXPORT}))
    with file_size_limit(100_000):  # the config, log and previews fit, a 240 kB checkpoint does not
        status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--config", config, "--out", tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert status == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: File too large: {run_dir}/checkpoints/step_000005.pt; no checkpoint of this run was written")
    assert list((run_dir / "checkpoints").iterdir()) == []  # no temporary file left behind


def test_a_full_disk_before_the_config_is_written_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    with file_size_limit(1000):  # a config.yaml is about 3 kB
        status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--out", tmp_path / "runs")
    assert status == 1
    one_error_line(err.splitlines(), "config.yaml: File too large")
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_full_disk_mid_run_keeps_the_last_good_checkpoint(run_dir, monkeypatch, capsys):
    good = (run_dir / "checkpoints" / "step_000007.pt").read_bytes()
    with file_size_limit(100_000):  # the log and previews fit, a 240 kB checkpoint does not
        status, err = dream3d(monkeypatch, capsys, "resume", run_dir)
    assert status == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: File too large: {run_dir}/checkpoints/step_000010.pt; the last good checkpoint is "
        f"{run_dir}/checkpoints/step_000007.pt (`dream3d resume {run_dir}` once it can be written)")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000005.pt", "step_000007.pt"]
    assert (run_dir / "checkpoints" / "step_000007.pt").read_bytes() == good
    assert steps_logged(run_dir) == list(range(1, 11))
    api.resume(run_dir)  # with room again, it finishes
    assert steps_logged(run_dir) == list(range(1, 13))


def test_a_folder_that_turns_read_only_mid_run_is_one_line(tiny, monkeypatch):
    real_open = os.open
    read_only = []

    def open_(path, flags, *args, **kwargs):
        if read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(read_only[0]):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def on_event(event):
        if event.kind == "checkpoint" and not read_only:
            read_only.append(str(next(Path(tiny["out"]).iterdir())))

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(RunError) as failure:
        api.run(build_config({"prompt": "a red cube"}, tiny), on_event)
    run_dir = Path(read_only[0])
    assert str(failure.value).startswith(f"Read-only file system: {run_dir}/metrics.jsonl; the last good checkpoint "
                                         f"is {run_dir}/checkpoints/step_000005.pt")


def test_a_metrics_append_that_fails_part_way_is_cut_back(tmp_path):
    rundir.append_metrics(tmp_path, {"step": 1})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with file_size_limit(len(before) + 10), pytest.raises(OSError) as failure:
        rundir.append_metrics(tmp_path, {"step": 2, "loss": "x" * 100})
    assert failure.value.errno == errno.EFBIG and failure.value.filename == str(tmp_path / "metrics.jsonl")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_a_failed_atomic_write_keeps_the_previous_file(tmp_path):
    from dream3d.rundir.atomic import write_bytes

    write_bytes(tmp_path / "f.bin", b"old")
    with file_size_limit(100), pytest.raises(OSError, match="File too large") as failure:
        write_bytes(tmp_path / "f.bin", b"n" * 1000)
    assert failure.value.filename == str(tmp_path / "f.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"old"


# -- item 7: the prior cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated", "pickle"])
def test_an_unloadable_prior_cache_file_is_rebuilt(tmp_path, monkeypatch, caplog, damage):
    from dream3d.guidance.priors import toy_world
    from dream3d.guidance.priors import toy
    from dream3d.guidance.priors.cache import load_cached

    path = tmp_path / "toy-prior" / toy._dataset_key() / "shapes.pt"
    path.parent.mkdir(parents=True)
    fake = {"mask": torch.ones(3, 2, 2, 1), "shade": torch.zeros(3, 2, 2, 1)}
    torch.save({"mask": torch.zeros(1000)}, path)
    path.write_bytes({"empty": b"", "truncated": path.read_bytes()[:500], "pickle": pickle.dumps(Payload(tmp_path / "ran"))}[damage])
    monkeypatch.setattr(toy_world, "render_shapes", lambda cams, shapes, ss: fake)
    renders = toy.load_shape_renders(tmp_path)
    assert torch.equal(renders["mask"], torch.ones(6, 3, 2, 2, 1))
    assert torch.equal(load_cached(path)["mask"], renders["mask"])  # replaced by a good file
    assert "does not load" in caplog.text and not (tmp_path / "ran").exists()


def test_an_unwritable_cache_is_a_warning(tmp_path, caplog):
    from dream3d.guidance.priors.cache import save_cached

    (tmp_path / "file").write_text("")
    save_cached(torch.zeros(2), tmp_path / "file" / "x.pt")  # its folder cannot be made
    assert "cannot write cache file" in caplog.text


# -- train-prior ----------------------------------------------------------------------------------------

def test_train_prior_resume_refuses_a_crafted_checkpoint(tmp_path):
    from dream3d.toy.train_unet import TrainPriorConfig, train_prior

    work = tmp_path / "ck"
    work.mkdir()
    torch.save({"step": 1, "config": Payload(tmp_path / "ran")}, work / "step-0000001.pt")
    with pytest.raises(rundir.CheckpointRefused, match="refusing"):
        train_prior(TrainPriorConfig(steps=2), tmp_path / "m", work, True, "x")  # before any training work
    assert not (tmp_path / "ran").exists()
