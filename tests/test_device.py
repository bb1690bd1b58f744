"""One device for the whole run (issue 15): --device, and no tensor created off the run's device.

The leak test runs on the CPU: with ``torch.set_default_device("meta")`` around a training step,
any tensor the step creates without an explicit device lands on the meta device and mixing it
with the run's CPU tensors fails loudly, which is what would put it on the CPU in a CUDA run.
"""

import pytest
import torch

from dream3d import api, registry
from dream3d.config import build_config
from dream3d.run.device import DeviceError, resolve_device
from tests.support import dream3d
from tests.tiny_diffusers import build_tiny_sd

TINY = {
    "steps": 4, "resolution": 8, "checkpoint_every": 100, "preview_every": 100,
    "nerf": {"grid_resolutions": [8], "num_samples": 8, "occupancy_resolution": 8, "occupancy_every": 1},
    "gaussians": {"num_points": 64, "refine_start": 0, "refine_every": 1, "grow_grad2d": 0.0},
}
RULES = registry.RULES.names  # every registered rule
PRIORS = ("toy", "toy-unet", "sd")  # closed-form, pixel-space diffusers, latent diffusers


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


def test_device_names_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_config_refuses_an_unknown_device():
    with pytest.raises(ValueError, match="device: unknown device 'tpu'"):
        build_config({"prompt": "a red cube", "device": "tpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(device, monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--device", device, "--steps", 5,
                          "--out", tmp_path / "runs")
    assert status == 1
    assert err.startswith(f"error: --device {device}: no CUDA GPU") and "\n" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cpu_run_records_its_device(monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--device", "cpu", "--steps", 5, "--resolution", 8,
                          "nerf.grid_resolutions=[8]", "export.formats=[ply]", "export.video=false",
                          "export.mesh_resolution=16", "--out", tmp_path / "runs")
    assert status == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "device: cpu" in (run_dir / "config.yaml").read_text()


def _combinations():
    for prior in PRIORS:
        for rule in RULES:
            if prior == "toy" and rule in ("vsd", "esd"):
                continue  # closed-form prior: no UNet for the LoRA (a config error)
            for representation in ("nerf", "gaussians"):
                yield pytest.param(prior, rule, representation)


@pytest.mark.parametrize("prior,rule,representation", list(_combinations()))
def test_a_step_creates_no_tensor_off_the_run_device(prior, rule, representation, tiny_sd, tmp_path):
    layers = {**TINY, "prompt": "a red cube" if prior != "sd" else "a corgi", "prior": prior, "guidance": rule,
              "representation": representation, "device": "cpu", "out": str(tmp_path / "runs")}
    if prior == "sd":
        layers["model"] = tiny_sd
    trainer = api.start(build_config(layers))
    trainer.train_step()  # the first step creates the optimizers' state, outside the check
    with torch.device("meta"):
        record = trainer.train_step()
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert all(p.device.type == "cpu" for p in trainer.representation.parameters())


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
def test_a_repulsion_step_creates_no_tensor_off_the_run_device(representation, tmp_path):
    cfg = build_config({**TINY, "prompt": "a red cube", "prior": "toy", "representation": representation,
                        "particles": 3, "repulsion": {"weight": 100.0}, "device": "cpu", "out": str(tmp_path)})
    trainer = api.start(cfg)
    trainer.train_step()
    with torch.device("meta"):
        assert "loss_repulsion" in trainer.train_step()


def test_vae_posterior_sample_draws_from_the_run_generator(tiny_sd):
    """The posterior eps comes from the generator the run hands the prior, not the device's global RNG
    (on CUDA that global RNG is not in the checkpoint, so a resumed run would draw other latents)."""
    from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
    from dream3d.guidance.priors.sd import StableDiffusionPrior
    from dream3d.guidance.prompts import PromptConfig

    prior = StableDiffusionPrior(tiny_sd, DiffusersConfig(device="cpu"), PromptConfig())
    rgb = torch.rand(2, 3, 16, 16)
    latents = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        prior.use_generator(torch.Generator().manual_seed(5))
        latents.append(prior.encode(rgb))
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=0)
    posterior = prior.vae.encode(2 * rgb - 1).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    expected = (posterior.mean + posterior.std * eps) * prior.scaling_factor
    torch.testing.assert_close(latents[0], expected)


def test_resumed_sd_run_ends_where_an_uninterrupted_one_does(tiny_sd, tmp_path):
    """Two steps straight vs one step, a checkpoint round trip into a fresh Trainer and one more step: the
    same parameters bit for bit (the Gaussians densify every step, so the global RNG's state matters too)."""
    from dream3d.rundir import folder as rundir
    from dream3d.run.loop import Trainer

    layers = {**TINY, "prompt": "a corgi", "prior": "sd", "model": tiny_sd, "device": "cpu",
              "representation": "gaussians"}
    straight = api.start(build_config({**layers, "out": str(tmp_path / "a")}))
    straight.train_step()
    straight.train_step()
    first = api.start(build_config({**layers, "out": str(tmp_path / "b")}))
    first.train_step()
    state = rundir.load_checkpoint(first.save_checkpoint())
    resumed = Trainer(first.cfg, first.run_dir)
    torch.manual_seed(123)
    resumed.load_state_dict(state)
    resumed.train_step()
    for key, value in straight.representation.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed.representation.state_dict()[key], value, rtol=0, atol=0)


# the GPU check end to end on the CPU (its dry run): tests/test_bench_gpu.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_gpu_without_a_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "bench-gpu", "--out", tmp_path / "check")
    assert status == 1 and err.startswith("error: --device cuda: no CUDA GPU") and not (tmp_path / "check").exists()
