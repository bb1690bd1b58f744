"""What many test modules share: the in-process CLI, small run settings, a prior with a known epsilon,
test cameras, and readers of a run folder. A helper module, not a test module: tests import it,
never each other."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from dream3d import api, cli
from dream3d.config import build_config
from dream3d.run.loop import RunInterrupted
from dream3d.guidance.priors.base import Embeddings, ddpm_alphas_cumprod
from dream3d.representations.cameras import look_at_cameras

REPO = Path(__file__).resolve().parent.parent

# Small settings that keep an end-to-end run to seconds.
TINY = {
    "steps": 12,
    "resolution": 16,
    "checkpoint_every": 5,
    "preview_every": 5,
    "nerf": {"grid_resolutions": [8, 16], "num_samples": 24, "occupancy_resolution": 16, "occupancy_every": 4},
    "gaussians": {"num_points": 256},
    "export": {"mesh_resolution": 32, "video_frames": 4, "video_resolution": 32, "texture_size": 64},
}


def dream3d(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["dream3d", *map(str, args)])
    try:
        cli.main()
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.strip()


TINY_FLAGS = ["--steps", 6, "--resolution", 16, "checkpoint_every=3", "preview_every=3", "nerf.grid_resolutions=[8,16]",
              "nerf.num_samples=24", "nerf.occupancy_resolution=16", "gaussians.num_points=256",
              "export.mesh_resolution=32", "export.video_frames=4", "export.video_resolution=32", "export.texture_size=64"]


def run_cli(monkeypatch, capsys, out, *args, check_export=True):
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--out", out, *args, *TINY_FLAGS)
    assert status == 0, err
    (run_dir,) = out.iterdir()
    if check_export:
        assert (run_dir / "export" / "model.glb").stat().st_size > 0 and (run_dir / "export" / "orbit.mp4").is_file()
    return run_dir


def interrupt_and_resume(layers, out):
    """Runs the config of ``layers`` with a stop after 6 steps, resumes it to the end; returns its run folder
    (the newest in ``out``)."""
    stop = iter([False] * 6 + [True])
    with pytest.raises(RunInterrupted):
        api.run(build_config(*layers), should_stop=lambda: next(stop))
    interrupted = max(Path(out).iterdir(), key=lambda p: p.stat().st_mtime)
    api.resume(interrupted)
    return interrupted


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in lines]


def final_params(run_dir):
    _, rep = api.load_representation(run_dir)
    return rep.state_dict()


def assert_same(a, b):
    """Equal checkpointed state: tensors bit for bit, through nested dicts (e.g. strategy state)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


class AnalyticPrior:
    """A prior whose epsilon is a known function: 0.5 x_t + e + t / 1000, e = len(prompt) / 10 (uncond -0.2)."""

    name, resolution, num_train_timesteps, unet = "analytic", 8, 1000, None

    def __init__(self):
        self.alphas_cumprod = ddpm_alphas_cumprod()

    def encode(self, rgb):
        return 2 * rgb - 1

    def embed(self, prompt):
        return Embeddings(prompt, torch.tensor([len(prompt) / 10]), torch.tensor([-0.2]))

    def predict_noise(self, x_t, t, embeddings, cameras=None):
        return 0.5 * x_t + embeddings.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000

    def eps(self, x_t, t, prompt_value):
        return 0.5 * x_t + prompt_value + torch.as_tensor(t).view(-1, 1, 1, 1) / 1000


def cameras(batch, size=8):
    az = torch.linspace(0, 270, batch)
    return look_at_cameras(torch.full((batch,), 15.0), az, torch.full((batch,), 2.5), 45.0, size, size)


def image_gradient(guidance, rgb, step, seed, prompt="a prompt"):
    """d loss / d rgb and the output of one guidance call."""
    rgb = rgb.clone().requires_grad_()
    out = guidance(rgb, prompt, cameras(len(rgb)), step=step, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    return rgb.grad, out


def replay_noising(prior, rgb, seed):
    """What a rule with the timestep range [20, 980] drew from ``Generator(seed)`` for images rgb [B,H,W,C]:
    t, then the noise. Returns (t [B], noise [B,C,H,W], abar [B,1,1,1], x_t), x = 2 rgb - 1 noised to t."""
    replay = torch.Generator().manual_seed(seed)
    B, H, W, C = rgb.shape
    t = torch.randint(20, 981, (B,), generator=replay)
    noise = torch.randn(B, C, H, W, generator=replay)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = 2 * rgb.detach().permute(0, 3, 1, 2) - 1
    return t, noise, abar, abar.sqrt() * x + (1 - abar).sqrt() * noise


def as_image_gradient(g, batch):
    """x = 2 rgb - 1 and d loss / d x = g / B (the one surrogate convention)."""
    return (2 * g / batch).permute(0, 2, 3, 1)


def validate_glb(path: Path) -> None:
    """Runs the Khronos glTF validator on a GLB and asserts it reports no errors (skips without it)."""
    node = shutil.which("node")
    module = REPO / ".cache" / "node" / "node_modules" / "gltf-validator"
    if node is None:
        pytest.skip("node is not installed")
    if not module.is_dir():
        pytest.skip(f"gltf-validator not installed at {module} (npm install --prefix .cache/node gltf-validator@2.0.0-dev.3.10)")
    done = subprocess.run(
        [node, str(REPO / "tests" / "gltf_validate.mjs"), str(path)], capture_output=True, text=True, timeout=120
    )
    report = json.loads(done.stdout)
    issues = report["issues"]
    assert issues["numErrors"] == 0, json.dumps(issues["messages"], indent=1)
    assert done.returncode == 0, done.stderr
    assert report["info"]["totalTriangleCount"] > 0
