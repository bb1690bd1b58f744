"""The loop end to end: run folder, resume equality, NaN handling."""

import json
from pathlib import Path

import pytest
import torch
import trimesh
import yaml

from dream3d import api
from dream3d.config import build_config
from dream3d.run.loop import RunError, RunInterrupted, Trainer
from dream3d.rundir.folder import checkpoint_paths
from tests.support import assert_same, final_params, interrupt_and_resume, metrics


def test_run_writes_the_run_folder(tiny):
    result = api.run(build_config({"prompt": "a red cube"}, tiny))
    d = result.run_dir
    assert (d / "config.yaml").is_file() and (d / "summary.json").is_file()
    assert [p.name for p in checkpoint_paths(d)] == ["step_000010.pt", "step_000012.pt"]
    assert len(list((d / "previews").glob("*.png"))) == 3
    assert [m["step"] for m in metrics(d)] == list(range(1, 13))
    summary = json.loads((d / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["seed"] == 0 and "torch" in summary["versions"]
    mesh = trimesh.load(result.files["glb"], force="mesh", skip_materials=True)
    assert len(mesh.faces) > 0
    # the saved config re-runs the same job
    again = api.run(build_config(yaml.safe_load((d / "config.yaml").read_text())))
    for k, v in final_params(d).items():
        assert torch.equal(v, final_params(again.run_dir)[k])


def test_resume_equals_uninterrupted(tiny):
    straight = api.run(build_config({"prompt": "a cone"}, tiny)).run_dir

    class StopAt:
        def __init__(self, step):
            self.step, self.seen = step, 0

        def event(self, e):
            self.seen = e.step

        def __call__(self):
            return self.seen >= self.step

    stop = StopAt(7)
    with pytest.raises(RunInterrupted, match="dream3d resume"):
        api.run(build_config({"prompt": "a cone"}, tiny), stop.event, stop)
    interrupted = sorted(Path(tiny["out"]).glob("a-cone-*"))[-1]
    assert [p.name for p in checkpoint_paths(interrupted)] == ["step_000005.pt", "step_000007.pt"]
    api.resume(interrupted)
    assert metrics(interrupted) == metrics(straight)
    for k, v in final_params(straight).items():
        assert torch.equal(v, final_params(interrupted)[k]), k


def test_resume_after_a_crash_drops_steps_after_the_checkpoint(tiny):
    cfg = build_config({"prompt": "a cone"}, tiny)
    straight = api.run(cfg).run_dir
    stop = iter([False] * 8 + [True])
    with pytest.raises(RunInterrupted):
        api.run(cfg, should_stop=lambda: next(stop))
    crashed = sorted(Path(tiny["out"]).glob("a-cone-*"))[-1]
    checkpoint_paths(crashed)[-1].unlink()  # as if killed before the stop checkpoint: latest is step 5
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a line cut short by the crash
    api.resume(crashed)
    assert metrics(crashed) == metrics(straight)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny, tmp_path, monkeypatch):
    cfg = build_config({"prompt": "a red cube", "max_nan_steps": 3}, tiny)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    trainer = Trainer(cfg, run_dir)
    before = {k: v.clone() for k, v in trainer.representation.state_dict().items()}
    real = trainer.guidance.forward

    def nan_guidance(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.guidance, "forward", nan_guidance)
    record = trainer.train_step()
    assert record["skipped"] and trainer.skipped_steps == 1
    for k, v in trainer.representation.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(RunError, match="NaN/Inf for 3 steps in a row"):
        trainer.run()
    assert checkpoint_paths(run_dir)


def test_gaussians_run_exports_splats_and_resumes_exactly(tiny, tmp_path):
    from dream3d.representations.splat_ply import read_splat_ply, write_splat_ply

    points = tmp_path / "points.ply"
    write_splat_ply(points, torch.rand(64, 3) - 0.5, torch.full((64, 3), -3.0), torch.tensor([[1.0, 0, 0, 0]]).repeat(64, 1),
                    torch.zeros(64), torch.zeros(64, 3))
    # densify from step 2 every 3 steps, reset opacities at step 6, cap at 80 Gaussians
    gaussians = {"init_points": str(points), "refine_start": 2, "refine_every": 3, "reset_every": 6,
                 "refine_stop": 9, "max_gaussians": 80}
    # after the reset the splats are faint: a low iso-level still finds their surface
    layers = [tiny, {"prompt": "a red sphere", "representation": "gaussians", "gaussians": gaussians,
                     "export": {"threshold": 1e-3}}]
    result = api.run(build_config(*layers))
    splats = read_splat_ply(result.files["splats"])
    assert 64 < len(splats["means"]) <= 80
    assert trimesh.load(result.files["glb"], force="mesh", skip_materials=True).faces.shape[0] > 0

    interrupted = interrupt_and_resume(layers, tiny["out"])
    assert metrics(interrupted) == metrics(result.run_dir)
    assert_same(final_params(result.run_dir), final_params(interrupted))
