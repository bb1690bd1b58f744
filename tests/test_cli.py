"""Bad input: one line on stderr, a non-zero exit, no traceback and nothing written."""

import subprocess
import sys

import pytest

from dream3d import api
from dream3d.config import build_config
from tests.support import dream3d


BAD_RUNS = [
    (["a red banana"], 1, "does not know 'banana'"),
    (["a cube sphere"], 1, "names more than one shape"),
    ([""], 1, "prompt is empty"),
    (["a red cube", "--guidance", "magic"], 1, "unknown guidance 'magic'; valid: sds"),
    (["a red cube", "--representation", "mesh"], 1, "unknown representation 'mesh'; valid: nerf, gaussians"),
    (["a red cube", "--representation", "gaussians", "loss.lambda_orient=1"], 1, "does not render"),
    (["a red cube", "--representation", "gaussians", "--init-points", "/no/such.ply"], 1, "does not exist"),
    (["a red cube", "gaussians.max_gaussians=10"], 1, "max_gaussians (10) is below the initial count"),
    (["a red cube", "--prior", "sd9"], 1, "unknown prior 'sd9'; valid: toy, toy-mv"),
    (["a red cube", "--steps", "abc"], 2, "Invalid value for '--steps'"),
    (["a red cube", "--steps", "0"], 1, "steps: Input should be greater than 0"),
    (["a red cube", "--resolution", "0"], 1, "resolution must be positive"),
    (["a red cube", "--resolution", "-3"], 1, "resolution must be positive"),
    (["a red cube", "nerf.colour=3"], 1, "nerf.colour: unknown key"),
    (["a red cube", "steps"], 1, "override 'steps' is not key=value"),
    (["a red cube", "sds.max_step_percent=[500,0.98,0.5,100]"], 1, "sds.max_step_percent: a schedule is"),
]


@pytest.mark.parametrize("args,code,message", BAD_RUNS)
def test_bad_run_input(monkeypatch, capsys, tmp_path, args, code, message):
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", *args, "--out", out)
    assert status == code
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unreadable_init_points(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_text("garbage\n")
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--representation", "gaussians",
                          "--init-points", bad, "--out", out)
    assert status == 1 and "not a PLY file" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_init_points_without_positions(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "nopos.ply"
    bad.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float red\nend_header\n0.5\n")
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--representation", "gaussians",
                          "--init-points", bad, "--out", tmp_path / "runs")
    assert status == 1 and "no x, y, z" in err and len(err.splitlines()) == 1


def test_unknown_word_lists_the_vocabulary(monkeypatch, capsys, tmp_path):
    _, err = dream3d(monkeypatch, capsys, "run", "a red banana", "--out", tmp_path)
    for word in ("red", "purple", "cube", "torus", "shape"):
        assert word in err


def test_unwritable_out(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--out", blocker / "runs")
    assert status == 1 and "cannot write to output folder" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "text,message",
    [("steps: [1, 2\n", "does not parse as YAML at line 2"), ("stepz: 3\n", "stepz: unknown key"),
     ("- 1\n- 2\n", "must be a mapping")],
)
def test_bad_config_file(monkeypatch, capsys, tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--config", config, "--out", tmp_path / "runs")
    assert status == 1 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["resume", "export", "eval"])
def test_not_a_run_folder(monkeypatch, capsys, tmp_path, command):
    status, err = dream3d(monkeypatch, capsys, command, tmp_path)
    assert status == 1 and "is not a dream3d run folder" in err and len(err.splitlines()) == 1


def test_export_options(monkeypatch, capsys, tiny):
    run_dir = api.run(build_config({"prompt": "a red sphere"}, tiny)).run_dir
    status, err = dream3d(monkeypatch, capsys, "export", run_dir, "--formats", "glb,fbx")
    assert status == 1 and "unknown export format 'fbx'" in err
    status, err = dream3d(monkeypatch, capsys, "export", run_dir, "--threshold", "1e9")
    assert status == 1 and "empty" in err and len(err.splitlines()) == 1
    status, _ = dream3d(monkeypatch, capsys, "export", run_dir, "--formats", "ply", "--resolution", "24")
    assert status == 0


def test_entry_point_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from dream3d.cli import main; main()", "run", "a red banana", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "does not know 'banana'" in proc.stderr


def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    import signal
    import time

    import yaml

    from tests.support import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 100000, "checkpoint_every": 100000}))
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dream3d", "run", "a red cube", "--config", str(config), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/metrics.jsonl")):  # the first step is logged
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped at step")
    run_dir = next(out.glob("a-red-cube-*"))
    checkpoint = next((run_dir / "checkpoints").glob("step_*.pt"))
    step = int(checkpoint.stem.split("_")[1])
    assert step > 0 and not (run_dir / "export").exists()
    # resume finishes the run (shortened through its config) and exports
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "steps": step + 3}))
    result = api.resume(run_dir)
    assert (result.run_dir / "export" / "model.glb").is_file()
