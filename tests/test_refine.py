"""`dream3d refine`: the texture of a run's exported mesh optimised by the run's own prior and rule at small t, then
exported again; the mesh evaluation (`dream3d eval --mesh`); the bad inputs."""

import json

import numpy as np
import pytest
import trimesh

from dream3d.config import build_config
from dream3d.export.files import texture_image
from dream3d.export.refine import load_textured, refine_config
from tests.support import TINY, dream3d, run_cli


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture
def textured_run(monkeypatch, capsys, tmp_path):
    return run_cli(monkeypatch, capsys, tmp_path / "runs", "export.texture_size=64")


def test_refine_changes_the_texture_and_keeps_the_colour(monkeypatch, capsys, textured_run):
    export = textured_run / "export"
    before = np.asarray(texture_image(load_textured(export)))
    assert dream3d(monkeypatch, capsys, "eval", textured_run, "--mesh") == (0, "")
    scored = json.loads((textured_run / "summary.json").read_text())["eval_mesh"]
    status, err = dream3d(monkeypatch, capsys, "refine", textured_run, "--steps", 4)
    assert status == 0, err
    refined = load_textured(export)
    after = np.asarray(texture_image(refined))
    assert after.shape == before.shape and (after != before).any()
    assert len(refined.faces) > 0 and np.asarray(refined.visual.uv).shape == (len(refined.vertices), 2)
    glb = trimesh.load(export / "model.glb", force="mesh")
    assert texture_image(glb) is not None
    assert (export / "orbit.mp4").stat().st_size > 0
    summary = json.loads((textured_run / "summary.json").read_text())
    assert summary["refine"]["steps"] == 4
    assert dream3d(monkeypatch, capsys, "eval", textured_run, "--mesh") == (0, "")
    rescored = json.loads((textured_run / "summary.json").read_text())["eval_mesh"]
    assert rescored["iou"] == pytest.approx(scored["iou"])  # the geometry is the same
    assert rescored["colour_error"] <= scored["colour_error"] + 0.02


def test_refine_bad_input_writes_nothing(monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "refine", tmp_path)
    assert status == 1 and "is not a dream3d run folder" in err and len(err.splitlines()) == 1
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "export.texture=false")
    before = listing(run_dir)
    status, err = dream3d(monkeypatch, capsys, "refine", run_dir)
    assert status == 1 and "holds no UV-textured mesh" in err and len(err.splitlines()) == 1
    status, err = dream3d(monkeypatch, capsys, "eval", run_dir, "--mesh")
    assert status == 1 and "holds no UV-textured mesh" in err and len(err.splitlines()) == 1
    status, err = dream3d(monkeypatch, capsys, "refine", run_dir, "--steps", 0)
    assert status == 1 and "--steps must be at least 1, got 0" in err and len(err.splitlines()) == 1
    assert listing(run_dir) == before


@pytest.mark.parametrize("args, message", [
    (["--guidance", "cfd"], "consistent noise"),
    (["export.texture=false"], "textured export"),
    (["export.formats=[ply]"], "textured export"),
])
def test_run_refine_steps_refuses_before_the_run(monkeypatch, capsys, tmp_path, args, message):
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--refine-steps", 5, *args, "--out", tmp_path / "runs")
    assert status == 1 and "refine.steps" in err and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_refine_config_is_the_run_at_small_t():
    cfg = build_config({"prompt": "a red cube", **TINY, "resolution": [16, 32], "resolution_milestones": [6],
                        "loss": {"lambda_sparsity": 1.0}, "refine": {"max_step_percent": 0.4}})
    refined = refine_config(cfg, 7)
    assert refined.steps == 7 and refined.resolution == 256 and refined.loss.lambda_sparsity == 0
    assert refine_config(cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"resolution": None})}), 7).resolution == 32
    assert (refined.sds.min_step_percent, refined.sds.max_step_percent) == (0.02, 0.4)
    assert refined.camera == cfg.camera and refined.prior == cfg.prior and refined.guidance == cfg.guidance
    assert refine_config(cfg.model_copy(update={"refine": cfg.refine.model_copy(update={"resolution": 48})}), 7).resolution == 48
    ism = refine_config(build_config({"prompt": "a red cube", "guidance": "ism"}), 7).ism
    assert (ism.max_step_percent, ism.warmup_max_step_percent) == (0.5, 0.5)


def test_run_refine_steps_refines_after_the_export(monkeypatch, capsys, tmp_path):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--refine-steps", 2, "export.texture_size=64")
    assert json.loads((run_dir / "summary.json").read_text())["refine"]["steps"] == 2
    assert texture_image(load_textured(run_dir / "export")).size == (64, 64)
