"""Every command fed hostile input: exactly one line on stderr, exit 1 (2 for a malformed command
line), and nothing written, neither under --out nor anywhere else in the working folder.

The commands run in-process through ``cli.main`` (as the ``dream3d`` script does); every case is
refused before any training starts, so the whole table takes seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dream3d import api, cli
from dream3d.config import build_config
from dream3d.rundir.result import Result
from tests.support import TINY, TINY_FLAGS

HUGE = str(10**26)
BINARY = bytes(range(256)) * 4  # not UTF-8, NUL bytes
PLY_XYZ = b"property float x\nproperty float y\nproperty float z\n"
# --init-points files with hostile headers: each must be one line, none may hang or fill the memory
PLYS = {
    "no-end-header": b"ply\nformat ascii 1.0\nelement vertex 1\n" + PLY_XYZ,
    "count-abc": b"ply\nformat ascii 1.0\nelement vertex abc\n" + PLY_XYZ + b"end_header\n0 0 0\n",
    "unknown-type": b"ply\nformat ascii 1.0\nelement vertex 1\nproperty quad x\nend_header\n0\n",
    "negative-count": b"ply\nformat binary_little_endian 1.0\nelement vertex -5\n" + PLY_XYZ + b"end_header\n",
    "huge-count": b"ply\nformat binary_little_endian 1.0\nelement vertex 99999999999999\n" + PLY_XYZ + b"end_header\n"
    + bytes(12),
    "non-utf8": b"ply\nformat ascii 1.0\nelement vertex 1\n\xff\xfe\xfd\n" + PLY_XYZ + b"end_header\n0 0 0\n",
    "too-few-rows": b"ply\nformat ascii 1.0\nelement vertex 3\n" + PLY_XYZ + b"end_header\n0.0000001 0.0000002 0.0000003\n",
    "no-format": b"ply\nelement vertex 1\n" + PLY_XYZ + b"end_header\n0 0 0\n",
    "short-rows": b"ply\nformat ascii 1.0\nelement vertex 2\n" + PLY_XYZ + b"end_header\n0.00000 0.00000\n1.00000 1.00000\n",
    "few-bytes": b"ply\nformat ascii 1.0\nelement vertex 3\n" + PLY_XYZ + b"end_header\n0 0 0\n",
    "long-header": b"ply\nformat ascii 1.0\n" + b"comment " + b"x" * 2_000_000 + b"\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with one finished tiny run and the hostile files the cases name."""
    root = tmp_path_factory.mktemp("hostile")
    quick = {"steps": 5, "checkpoint_every": 5, "export": {**TINY["export"], "video": False, "formats": ["glb"]}}
    api.run(build_config(TINY, quick, {"prompt": "a red cube", "out": str(root / "runs")}))
    (run,) = (root / "runs").iterdir()
    run = run.rename(root / "run")
    (root / "runs").rmdir()
    (root / "binary.bin").write_bytes(BINARY)
    (root / "a-folder").mkdir()
    (root / "prompts.txt").write_text("a red cube\n")
    (root / "nan.yaml").write_text("optim:\n  lr_scale: .nan\n")
    (root / "unknown.yaml").write_text("nope: 1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "bad.jsonl").write_text('{"prompt": "a red cube", "steps": 1e400}\n')
    (root / "deep.jsonl").write_text('{"prompt": "a red cube", "seed": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (root / "deep.yaml").write_text("seed: " + "[" * 20_000 + "]" * 20_000 + "\n")
    for name, content in PLYS.items():
        (root / f"{name}.ply").write_bytes(content)
    (root / "dino").mkdir()
    (root / "dino" / "config.json").write_text('{"model_type": "vit", "image_size": 16, "patch_size": 8}')
    (root / "dino" / "pytorch_model.bin").write_bytes(b"cposix\nsystem\n(S'true'\ntR.")  # a pickle that calls a function
    for name, change in {"binary-config": None, "no-config": "", "no-checkpoint": "checkpoints", "deep-config": "deep"}.items():
        shutil.copytree(run, root / name)
        if change is None:
            (root / name / "config.yaml").write_bytes(BINARY)
        elif change == "deep":
            (root / name / "config.yaml").write_text((root / "deep.yaml").read_text())
        elif change == "":
            (root / name / "config.yaml").unlink()
        else:
            shutil.rmtree(root / name / change)
    return root


RUN_FLAGS = [
    (["--seed", HUGE], 1, "seed: the seed must lie in"),
    (["--seed", "-" + HUGE], 1, "seed: the seed must lie in"),
    (["--resolution", "100000"], 1, "would need about"),
    (["--resolution", "0"], 1, "resolution must be positive"),
    (["--steps", HUGE], 1, "at most 999999 steps"),
    (["--steps", "-5"], 1, "steps: Input should be greater than 0"),
    (["--steps", "1.5"], 2, "Invalid value for '--steps'"),
    (["--steps", "nan"], 2, "Invalid value for '--steps'"),
    (["--particles", "100000"], 1, "particles: Input should be less than or equal to 64"),
    (["--particles", "0"], 1, "particles: Input should be greater than or equal to 1"),
    (["--repulsion", "nan", "--particles", "3"], 1, "repulsion.weight: "),
    (["--repulsion", "inf", "--particles", "3"], 1, "must be a finite number, got inf"),
    (["optim.lr_scale=.nan"], 1, "optim.lr_scale: must be a finite number, got nan"),
    (["optim.lr_scale=-.inf"], 1, "optim.lr_scale: must be a finite number, got -inf"),
    (["sds.guidance_scale=.nan"], 1, "must be a finite number, got nan"),
    (["background=[.nan, 1, 1]"], 1, "background[0]: must be a finite number, got nan"),
    (["export.video_resolution=33"], 1, "export.video_resolution: the video resolution must be even"),
    (["export.video_resolution=1000000"], 1, "would need about"),
    (["export.mesh_resolution=2000"], 1, "export.mesh_resolution: a mesh resolution of 2000 would need about"),
    (["camera.batch_size=100000", "--resolution", "512"], 1, "would need about"),
    (["export.formats=[stl]"], 1, "unknown export format 'stl'"),
    (["export.texture_size=100000"], 1, "export.texture_size: Input should be less than or equal to 4096"),
    (["no.such.key=1"], 1, "no: unknown key"),
    (["steps"], 1, "is not key=value"),
    (["--config", "{world}/binary.bin"], 1, "is not UTF-8 text"),
    (["--config", "{world}/a-folder"], 1, "cannot read config"),
    (["--config", "{world}/missing.yaml"], 1, "cannot read config"),
    (["--config", "{world}/nan.yaml"], 1, "optim.lr_scale: must be a finite number, got nan"),
    (["--config", "{world}/unknown.yaml"], 1, "nope: unknown key"),
    (["--config", "{world}/list.yaml"], 1, "must be a mapping"),
    (["--init-points", "{world}/prompts.txt"], 1, "--init-points (gaussians.init_points) starts the gaussians"),
    (["--init-points", "{world}/missing.ply", "--representation", "gaussians"], 1, "does not exist"),
    (["--init-points", "{world}/a-folder", "--representation", "gaussians"], 1, "does not exist"),
    (["--no-such-flag"], 2, "No such option"),
    *[(["--init-points", f"{{world}}/{name}.ply", "--representation", "gaussians"], 1, text) for name, text in [
        ("no-end-header", "no end_header"), ("count-abc", "vertex count 'abc' is not a whole number"),
        ("unknown-type", "unknown property type 'quad'"), ("negative-count", "vertex count -5 is negative"),
        ("huge-count", "99999999999999 vertices need"), ("few-bytes", "3 vertices need at least 18 bytes"), ("non-utf8", "header is not ASCII text"),
        ("too-few-rows", "holds 1 of its 3 vertex rows"), ("no-format", "no format line"),
        ("short-rows", "has 2 values, not 3"), ("long-header", "header is longer than"),
    ]],
    (["--particles", "3", "repulsion.weight=1", "repulsion.features=dino", "repulsion.dino_model={world}/dino"], 1,
     "repulsion features 'dino': no local ViT model"),
    (["seed=" + "[" * 20_000 + "]" * 20_000], 1, "nested more than"),
    (["--config", "{world}/deep.yaml"], 1, "nested more than"),
]

CASES = [
    *[(["run", "a red cube", "--out", "{out}", *flags], code, text) for flags, code, text in RUN_FLAGS],
    (["run", "zq" * 1_000_000, "--out", "{out}"], 1, "the prompt is 2000000 characters long; the limit is 1000"),
    (["run", "a red zq" + "q" * 900, "--out", "{out}"], 1, "does not know"),
    (["run", "   ", "--out", "{out}"], 1, "the prompt is empty"),
    (["run", "a red cube", "--out", "{world}/binary.bin/x"], 1, "cannot write to output folder"),
    (["resume", "{world}/missing"], 1, "is not a dream3d run folder"),
    (["resume", "{world}/binary.bin"], 1, "is not a dream3d run folder"),
    (["resume", "{world}/no-config"], 1, "is not a dream3d run folder"),
    (["resume", "{world}/binary-config"], 1, "is not UTF-8 text"),
    (["resume", "{world}/no-checkpoint"], 1, "has no checkpoint"),
    (["export", "{world}/run", "--resolution", "2000"], 1, "a mesh resolution of 2000 would need about"),
    (["export", "{world}/run", "--resolution", HUGE], 1, "would need about"),
    (["export", "{world}/run", "--resolution", "4"], 1, "mesh_resolution: Input should be greater than 8"),
    (["export", "{world}/run", "--formats", "glb,stl"], 1, "unknown export format 'stl'"),
    (["export", "{world}/run", "--threshold", "nan"], 1, "--threshold must be a finite number"),
    (["export", "{world}/binary-config"], 1, "is not UTF-8 text"),
    (["export", "{world}/no-checkpoint"], 1, "has no checkpoint"),
    (["export", "{world}/missing"], 1, "is not a dream3d run folder"),
    (["eval", "{world}/binary-config"], 1, "is not UTF-8 text"),
    (["eval", "{world}/no-config"], 1, "is not a dream3d run folder"),
    (["eval", "{world}/no-checkpoint"], 1, "has no checkpoint"),
    (["batch", "{world}/binary.bin", "--out", "{out}"], 1, "cannot read batch file"),
    (["batch", "{world}/missing.txt", "--out", "{out}"], 1, "cannot read batch file"),
    (["batch", "{world}/a-folder", "--out", "{out}"], 1, "cannot read batch file"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--workers", "0"], 1, "--workers must be at least 1"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--retries", "-1"], 1, "--retries must be 0 or more"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--config", "{world}/binary.bin"], 1, "is not UTF-8 text"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--status"], 1, "no batch has run"),
    (["bench", "--seeds", "x", "--out", "{out}"], 1, "seeds must be comma-separated integers, got 'x'"),
    (["bench", "--seeds", HUGE, "--out", "{out}"], 1, "seed: the seed must lie in"),
    (["bench", "--out", "{out}", "optim.lr_scale=.nan"], 1, "optim.lr_scale: must be a finite number"),
    (["bench", "--out", "{out}", "nope=1"], 1, "nope: unknown key"),
    (["bench-guidance", "--seeds", "x", "--out", "{out}"], 1, "seeds must be comma-separated integers"),
    (["bench-guidance", "--rules", "magic", "--out", "{out}"], 1, "magic"),
    (["bench-guidance", "--representations", "mesh", "--out", "{out}"], 1, "mesh"),
    (["bench-guidance", "--steps", "0", "--out", "{out}"], 1, "steps"),
    (["bench-guidance", "--steps", HUGE, "--out", "{out}"], 1, "steps"),
    (["bench-guidance", "--particles", "0", "--out", "{out}"], 1, "particles"),
    (["bench-guidance", "--out", "{out}", "optim.lr_scale=.nan"], 1, "must be a finite number"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--n", "0"], 1, "n: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--n", HUGE], 1, "n: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--steps", "0"], 1, "steps: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--steps", HUGE], 1, "steps: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--seed", HUGE], 1, "seed: the seed must lie in"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--elevation", "nan"], 1, "elevation: Input should be a finite number"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--guidance-scale", "inf"], 1, "finite number"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--prior", "sd"], 1, "not in the Hugging Face cache"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--model", "{world}/a-folder"], 1, ""),
    (["sample", "a red cube", "--out", "{out}/s.png", "--model", "{world}/binary.bin"], 1, ""),
    (["train-prior", "--out", "{out}/m", "--steps", "0"], 1, "steps: "),
    (["train-prior", "--out", "{out}/m", "--steps", HUGE], 1, "steps: "),
    (["train-prior", "--out", "{out}/m", "--seed", HUGE], 1, "seed: the seed must lie in"),
    (["train-prior", "--out", "{out}/m", "--threads", "0"], 1, "--threads must be at least 1"),
    (["eval-prior", "--views", "0", "--out", "{out}/r.json"], 1, "views: "),
    (["eval-prior", "--views", HUGE, "--out", "{out}/r.json"], 1, "samples would need about"),
    (["eval-prior", "--steps", "-1", "--out", "{out}/r.json"], 1, "steps: "),
    (["eval-prior", "--guidance-scale", "nan", "--out", "{out}/r.json"], 1, "finite number"),
    (["eval-prior", "--seed", HUGE, "--out", "{out}/r.json"], 1, "seed: the seed must lie in"),
    (["eval-prior", "--model", "{world}/binary.bin", "--out", "{out}/r.json"], 1, ""),
    (["resume", "{world}/deep-config"], 1, "nested more than"),
    (["export", "{world}/deep-config"], 1, "nested more than"),
    (["eval", "{world}/deep-config"], 1, "nested more than"),
    (["batch", "{world}/deep.jsonl", "--out", "{out}"], 1, "nested more than"),
    (["sample", "a red cube", "--out", "{world}/a-folder"], 1, "is a folder"),
    (["sample", "a red cube", "--out", "/proc/1/s.png"], 1, "cannot write"),
    (["sample", "a red cube", "--out", "{world}/binary.bin/s.png"], 1, "cannot write"),
    (["train-prior", "--out", "/proc/1/m", "--steps", "1"], 1, "cannot write"),
    (["train-prior", "--out", "{out}/m", "--checkpoints", "{world}/binary.bin", "--steps", "1"], 1, "is not a folder"),
    (["bench-gpu", "--device", "cpu", "--parts-only", "--batch", "-3"], 1, "--batch must be at least 1, got -3"),
    (["bench-gpu", "--device", "cpu", "--parts-only", "--batch", "0"], 1, "--batch must be at least 1, got 0"),
    (["web", "--port", "99999"], 1, "--port must lie in 1..65535, got 99999"),
    (["web", "--port", "-1"], 1, "--port must lie in 1..65535, got -1"),
    (["web", "--max-prompt-chars", "0"], 1, "--max-prompt-chars must be at least 1, got 0"),
    (["web", "--out", "{world}/binary.bin"], 1, "is not a folder"),
    (["web", "--host", "999.1.1.1"], 1, "--host 999.1.1.1 is not an address of this machine"),
    (["bench-guidance", "--faithful", "a dog", "--out", "{out}"], 1, "does not know 'dog'"),
    (["no-such-command"], 2, "No such command"),
]


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("args, code, text", CASES, ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else None)
def test_hostile_input_is_one_line_and_writes_nothing(world, tmp_path, monkeypatch, capsys, args, code, text):
    monkeypatch.chdir(tmp_path)  # defaults such as runs/, bench/, samples.png would land here
    out = tmp_path / "out"
    argv = [a.replace("{world}", str(world)).replace("{out}", str(out)) for a in args]
    before = _listing(world)
    monkeypatch.setattr(sys, "argv", ["dream3d", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == code, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000, err[-2000:]
    assert text in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "wrote into the working folder or under --out"
    assert _listing(world) == before, "changed the run folders it was given"


FORMS = [
    (dict(steps=10**12), "steps: "),
    (dict(steps=5000), "this server runs at most 2000 steps"),
    (dict(steps=-1), "steps: Input should be greater than 0"),
    (dict(steps=float("nan")), "steps: must be a whole number, got nan"),
    (dict(seed=10**26), "seed: the seed must lie in"),
    (dict(seed=float("inf")), "seed: must be a whole number, got inf"),
    (dict(resolution="100000"), "resolution 100000 would need about"),
    (dict(resolution="[16, 100000]"), "resolution 100000 would need about"),
    (dict(resolution="{a: 1}"), "resolution"),
    (dict(resolution="[16"), "is neither a number nor a list of numbers"),
    (dict(lr_scale=float("nan")), "optim.lr_scale: must be a finite number, got nan"),
    (dict(guidance_scale=float("-inf")), "must be a finite number, got -inf"),
    (dict(particles=10**9, guidance="vsd", prior="toy-unet-mv"), "particles"),
    (dict(prompt="x" * 10**6), "the prompt is 1000000 characters long"),
    (dict(prompt=""), "the prompt is empty"),
    (dict(prior="sd9"), "unknown prior 'sd9'"),
    (dict(overrides="export.video_resolution=33"), "export.video_resolution: the video resolution must be even"),
    (dict(overrides="export.mesh_resolution=100000"), "export.mesh_resolution: a mesh resolution of 100000"),
    (dict(overrides="optim.lr_scale=.inf"), "optim.lr_scale: must be a finite number, got inf"),
    (dict(overrides="gaussians.init_points=/etc/passwd"), "--init-points (gaussians.init_points) starts the gaussians"),
    (dict(overrides="no.such=1"), "no: unknown key"),
    (dict(overrides="\x00=1"), "unknown key"),
]


@pytest.mark.parametrize("values, text", FORMS, ids=lambda v: str(v)[:60] if isinstance(v, dict) else None)
def test_hostile_form_is_one_line(tmp_path, values, text):
    from dream3d.config import ConfigError
    from dream3d.web.app import WebSettings
    from dream3d.web.form import FormValues, config_from_form

    settings = WebSettings(out=str(tmp_path / "runs"))
    form = FormValues(**{"prompt": "a red cube", "prior": "toy", "guidance": "sds", "representation": "nerf", **values})
    with pytest.raises(ConfigError) as error:
        config_from_form(form, settings.base_layer(), settings.out, 10**7, settings.max_steps)
    assert text in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) < 1000
    assert list(tmp_path.iterdir()) == []


# -- stopping: a signal ends any phase within seconds --------------------------------------------------------


def _dream3d_process(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "dream3d", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_until(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the phase to interrupt never began"
        time.sleep(0.02)


def _opened(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # a descriptor closed while we looked
        return False


def _terminate(process: subprocess.Popen) -> tuple[int, str, float]:
    """SIGTERM; (exit code, stderr, seconds until the process ended)."""
    tick = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, err, time.monotonic() - tick


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches /proc/PID/fd for the open PLY")
def test_sigterm_ends_an_init_points_load_within_5_s(tmp_path):
    points = tmp_path / "points.ply"
    rows = 6_000_000  # an ASCII PLY whose load takes seconds
    points.write_bytes(b"ply\nformat ascii 1.0\nelement vertex %d\n" % rows + PLY_XYZ + b"end_header\n"
                       + b"0.1 0.2 0.3\n" * rows)
    process = _dream3d_process(tmp_path, "run", "a red cube", "--representation", "gaussians", "--init-points",
                               str(points), "--out", str(tmp_path / "runs"))
    _wait_until(lambda: _opened(process.pid, points), process)
    code, err, seconds = _terminate(process)
    assert seconds < 5 and code == 130, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "stopped while" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sigterm_ends_the_refine_stage_within_5_s(tmp_path):
    flags = [str(f) for f in TINY_FLAGS]
    process = _dream3d_process(tmp_path, "run", "a red cube", "--out", str(tmp_path / "runs"), *flags,
                               "export.video=false", "--refine-steps", "100000", "refine.resolution=16")

    def refining() -> bool:
        return any("export_seconds" in path.read_text() for path in tmp_path.glob("runs/*/summary.json"))

    _wait_until(refining, process)
    time.sleep(0.5)  # into refine's steps
    code, err, seconds = _terminate(process)
    assert seconds < 5 and code == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "refine stopped at step" in last and "Traceback" not in err, err[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "export" / "model.glb").stat().st_size > 0  # the unrefined export is kept


def test_a_second_sigint_exits_at_once(tmp_path):
    script = ("import time\nfrom dream3d.run.stop import SignalStop, stage\nstop = SignalStop()\n"
              "with stage('training', 'the checkpoint is kept', polled=True):\n"
              "    print('ready', flush=True)\n    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "ready"
    tick = time.monotonic()
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    assert process.poll() is None  # the first asks the step to finish
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=5)
    finally:
        process.kill()
    assert process.returncode == 130 and time.monotonic() - tick < 3, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "second" in err


def test_web_stop_ends_a_refining_job_and_the_next_visitor_starts(tiny):
    from dream3d.web.queue import JobQueue, run_and_export

    def runner(cfg, on_event, should_stop):
        def stop_in_refine(event):
            on_event(event)
            if event.kind == "step" and event.total == 300 and event.step == 2:
                jobs.stop(job.id)

        return run_and_export(cfg, stop_in_refine, should_stop)

    jobs = JobQueue(runner)
    quick = {"steps": 3, "export": {**TINY["export"], "video": False}}
    job = jobs.submit(build_config(tiny, quick, {"prompt": "a red cube", "refine": {"steps": 300, "resolution": 16}}))
    second = jobs.submit(build_config(tiny, quick, {"prompt": "a red cube"}))
    assert jobs.wait(job, 120)
    assert job.state == "stopped", job.error
    summary = Result.load(Path(job.run_dir)).summary
    assert summary["stopped"] is True and "refine" not in summary
    assert jobs.wait(second, 120) and second.state == "done", second.error


def test_web_limit_covers_every_stage(tmp_path):
    from dream3d.config import ConfigError
    from dream3d.web.form import FormValues, config_from_form

    form = FormValues(prompt="a red cube", prior="toy", guidance="sds", representation="nerf", steps=1,
                      overrides="refine.steps=999999")
    with pytest.raises(ConfigError, match="this server runs at most 2000 steps"):
        config_from_form(form, {}, str(tmp_path), 200, 2000)
    form.overrides = "refine.steps=1000"
    form.steps = 1000
    assert config_from_form(form, {}, str(tmp_path), 200, 2000).refine.steps == 1000


def test_a_nan_guidance_scale_through_the_web_api_is_a_message_on_the_page(tmp_path):
    import asyncio

    from dream3d.web.app import WebSettings, build_app
    from dream3d.web.queue import JobQueue
    from dream3d.web.runs import RunsFolder

    demo = build_app(WebSettings(out=str(tmp_path)), JobQueue(), RunsFolder(tmp_path))
    generate = next(fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "on_generate")
    form = ["a red cube", "toy", "sds", "nerf", 12, 0, "16", float("nan"), None, None, "", "(none)"]
    output = asyncio.run(demo.process_api(generate, form, state=None))
    assert "must be a finite number, got nan" in " ".join(map(str, output["data"]))
    assert list(tmp_path.iterdir()) == []
