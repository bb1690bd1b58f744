"""Particles (--particles N) and kernel repulsion (--repulsion W, docs/guidance-math.md#particles-and-repulsion)."""

import math

import pytest
import torch

from dream3d import api
from dream3d.run.build import build_representation
from dream3d.config import ConfigError, build_config
from dream3d.run.loop import Trainer
from dream3d.guidance.base import GuidanceError, GuidanceOutput, surrogate_loss
from dream3d.guidance.repulsion import DinoFeatures, RepulsionConfig, build_features, pixel_features, repulsion_loss
from dream3d.representations.particles import Particles
from tests.support import assert_same, final_params, interrupt_and_resume, metrics


def test_particle_i_is_the_single_representation_of_seed_plus_i(tiny):
    layers = [tiny, {"prompt": "a cube", "representation": "gaussians"}]
    particles = build_representation(build_config(*layers, {"particles": 3, "seed": 4}))
    assert isinstance(particles, Particles) and particles.count == 3
    for i, member in enumerate(particles.members):
        alone = build_representation(build_config(*layers, {"seed": 4 + i}))
        assert_same(member.state_dict(), alone.state_dict())
    first, second = (m.params["means"] for m in particles.members[:2])
    assert not torch.equal(first, second)


def test_each_particle_gets_the_guidance_gradient_it_would_get_alone(tiny, tmp_path):
    """Two identical particles under one guidance call: each takes the step of a single run (splats render
    deterministically, so the only difference could be the batch the guidance averages over)."""
    layers = [tiny, {"prompt": "a red cube", "representation": "gaussians", "gaussians": {"densify": False}}]
    single = Trainer(build_config(*layers), tmp_path / "a")
    particles = build_representation(build_config(*layers, {"particles": 2}))
    for member in particles.members:
        member.load_state_dict(single.representation.state_dict())
    pair = Trainer(build_config(*layers, {"particles": 2}), tmp_path / "b", representation=particles)

    def constant_push(rgb, prompt, cameras, step, generator, noise=None):  # g = 1: d loss / d x = 1 / batch
        return GuidanceOutput(surrogate_loss(rgb, torch.ones_like(rgb)))

    for trainer in (single, pair):
        trainer.guidance.forward = constant_push
        trainer.train_step()
    expected = single.representation.params["means"].grad
    for member in pair.representation.members:  # gradients, since Adam's first step ignores their scale
        torch.testing.assert_close(member.params["means"].grad, expected)
    assert expected.abs().sum() > 0


def test_particles_export_each_and_evaluate_each(tiny):
    result = api.run(build_config(tiny, {"prompt": "a red cube", "particles": 2, "export": {"formats": ["glb"], "video": False}}))
    for i in range(2):
        assert (result.run_dir / "export" / f"p{i}" / "model.glb").is_file()
        assert result.files[f"p{i}/glb"] == result.run_dir / "export" / f"p{i}" / "model.glb"
    scores = api.evaluate(result.run_dir)
    assert len(scores["particles"]) == 2 and all(p["matched_class"] == "red cube" for p in scores["particles"])
    assert scores["iou"] == pytest.approx(sum(p["iou"] for p in scores["particles"]) / 2)


def test_gaussian_particles_densify_apart_and_resume_exactly(tiny):
    gaussians = {"num_points": 64, "refine_start": 2, "refine_every": 3, "refine_stop": 9, "max_gaussians": 100}
    layers = [tiny, {"prompt": "a red sphere", "representation": "gaussians", "gaussians": gaussians, "particles": 2,
                     "repulsion": {"weight": 0.0}}]
    straight = api.run(build_config(*layers))
    interrupted = interrupt_and_resume(layers, tiny["out"])
    assert metrics(interrupted) == metrics(straight.run_dir)
    params = final_params(straight.run_dir)
    assert_same(params, final_params(interrupted))
    assert 64 < len(params["members.0.params.means"]) <= 100 and 64 < len(params["members.1.params.means"]) <= 100


# -- repulsion -------------------------------------------------------------------------


def test_repulsion_gradient_is_the_reference_kernel_direction():
    """d loss / d f_i = -r_i, r_i = sum_j 2 k_ij (f_i - f_j) / h / sum_j k_ij
    (docs/guidance-math.md#particles-and-repulsion)."""
    torch.manual_seed(0)
    N, B, D = 5, 2, 7
    f = torch.randn(N, B, D, requires_grad=True)
    repulsion_loss(f).backward()
    for b in range(B):
        fb = f.detach()[:, b]
        d2 = torch.cdist(fb, fb) ** 2
        off = ~torch.eye(N, dtype=torch.bool)
        h_all = torch.stack([d2[off].view(N, N - 1)[i].median() for i in range(N)]).view(1, N)
        h = torch.cat([torch.cdist(f.detach()[:, c], f.detach()[:, c]).pow(2)[off].view(N, N - 1) for c in range(B)]
                      ).median(-1).values.median() / math.log(N - 1)
        assert h_all.numel() == N
        k = torch.exp(-d2 / h) * off
        r = (2 * k[..., None] * (fb[:, None] - fb[None])).sum(1) / h / k.sum(1, keepdim=True)
        torch.testing.assert_close(f.grad[:, b], -r / B)


def test_repulsion_pushes_two_identical_but_for_noise_particles_apart():
    torch.manual_seed(0)
    base = torch.rand(1, 3, 16, 16)
    images = torch.cat([base, base + 1e-3 * torch.randn_like(base), torch.rand(1, 3, 16, 16)]).requires_grad_(True)
    start = (images[0] - images[1]).norm().item()
    optimizer = torch.optim.SGD([images], lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        repulsion_loss(pixel_features(images).unsqueeze(1)).backward()
        optimizer.step()
    assert (images[0] - images[1]).norm().item() > 5 * start


def test_repulsion_in_a_run_separates_the_particles(tiny, tmp_path):
    """Guidance off, repulsion on: the renders of the particles grow apart (in pixel features)."""
    def spread(trainer):
        from dream3d.run.camera_sampling import orbit_cameras

        with torch.no_grad():
            rgb = trainer.representation.render(orbit_cameras(2, 16), trainer.background).rgb
        f = pixel_features(rgb.permute(0, 3, 1, 2)).view(3, 2, -1)
        return torch.cdist(f.transpose(0, 1), f.transpose(0, 1)).mean().item()

    cfg = build_config(tiny, {"prompt": "a red cube", "particles": 3, "repulsion": {"weight": 10.0},
                              "loss": {"lambda_guidance": 0.0}})
    trainer = Trainer(cfg, tmp_path / "r")
    before = spread(trainer)
    for _ in range(10):
        record = trainer.train_step()
    assert "loss_repulsion" in record and spread(trainer) > 1.5 * before


def test_repulsion_needs_three_particles(tiny):
    with pytest.raises(ConfigError, match="particles 3 or more"):
        build_config(tiny, {"prompt": "a cube", "particles": 2, "repulsion": {"weight": 1.0}})


def test_dino_features_from_a_local_vit_folder_and_its_errors(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    features = build_features(RepulsionConfig(weight=1.0, features="dino", dino_model=str(tmp_path / "vit")))
    assert isinstance(features, DinoFeatures)
    images = torch.rand(3, 3, 20, 20, requires_grad=True)
    out = features(images)
    assert out.shape == (3, 32)
    repulsion_loss(out.unsqueeze(1)).backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(GuidanceError, match="dino_model"):
        build_features(RepulsionConfig(features="dino"))
    with pytest.raises(GuidanceError, match="no local ViT model"):
        build_features(RepulsionConfig(features="dino", dino_model=str(tmp_path / "missing")))


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
def test_particles_carry_their_own_consistent_noise(representation, tiny, tmp_path):
    cfg = build_config(tiny, {"prompt": "a red cube", "guidance": "cfd", "particles": 2,
                              "representation": representation})
    trainer = Trainer(cfg, tmp_path / "r")
    trainer.train_step()
    first, second = (m.state_dict() for m in trainer.representation.members)
    noise = [k for k in first if "noise" in k]
    assert noise and all(not torch.equal(first[k], second[k]) for k in noise)
