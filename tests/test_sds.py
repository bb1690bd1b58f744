"""SDS: the gradient reaching the image equals the formula of docs/guidance-math.md#sds."""

import pytest
import torch

from dream3d.guidance.base import RuleContext, surrogate_loss
from dream3d.guidance.diffusion import sds_weight, timestep_range
from dream3d.guidance.sds import SDSConfig, SDSGuidance
from tests.support import AnalyticPrior, as_image_gradient, cameras, image_gradient, replay_noising


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_gradient_equals_formula(weighting):
    prior, B, omega = AnalyticPrior(), 3, 7.0
    guidance = SDSGuidance(prior, SDSConfig(guidance_scale=omega, weighting=weighting),
                            RuleContext(steps=100, guidance_scale=100.0))
    rgb = torch.rand(B, 8, 8, 3)
    grad, out = image_gradient(guidance, rgb, step=0, seed=1, prompt="a prompt")  # embeds as 0.8, uncond -0.2

    t, noise, abar, x_t = replay_noising(prior, rgb, seed=1)
    eps_y, eps_u = 0.5 * x_t + 0.8 + t.view(-1, 1, 1, 1) / 1000, 0.5 * x_t - 0.2 + t.view(-1, 1, 1, 1) / 1000
    w = {"sds": 1 - abar, "uniform": torch.ones_like(abar), "fantasia3d": abar.sqrt() * (1 - abar)}[weighting]
    g = w * (eps_y + omega * (eps_y - eps_u) - noise)
    torch.testing.assert_close(grad, as_image_gradient(g, B), rtol=1e-5, atol=1e-6)
    assert out.info["t"] == pytest.approx(float(t.float().mean()))


class BrokenPrior(AnalyticPrior):
    def predict_noise(self, x_t, t, embeddings, cameras=None):
        eps = super().predict_noise(x_t, t, embeddings, cameras)
        eps[:, :, 0, 0] = float("nan")
        return eps


def test_clip_and_nan_handling():
    prior = BrokenPrior()
    guidance = SDSGuidance(prior, SDSConfig(guidance_scale=float("inf"), grad_clip=0.01),
                            RuleContext(steps=100, guidance_scale=100.0))
    rgb = torch.rand(2, 8, 8, 3, requires_grad=True)
    out = guidance(rgb, "p", cameras(2), step=0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all()
    assert rgb.grad.abs().max() <= 0.01 * (1 + 1e-6)  # 2 * clip / B
    assert (rgb.grad[:, 0, 0] == 0).all()  # NaN became 0


def test_surrogate_loss_gradient_is_g_over_batch():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    surrogate_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / 4)


def test_timestep_range_and_sqrt_anneal():
    assert timestep_range(0.02, 0.98, 1000) == (20, 980)
    guidance = SDSGuidance(AnalyticPrior(), SDSConfig(sqrt_anneal=True), RuleContext(steps=100, guidance_scale=1.0))
    gen = torch.Generator()
    assert guidance.sample_timesteps(2, 0, gen).tolist() == [980, 980]
    assert guidance.sample_timesteps(1, 25, gen).item() == int(980 - 960 * 0.5)
    assert guidance.sample_timesteps(1, 100, gen).item() == 20


def test_schedule_on_t_range():
    guidance = SDSGuidance(AnalyticPrior(), SDSConfig(max_step_percent=[10, 0.98, 0.5, 11]),
                            RuleContext(steps=100, guidance_scale=1.0))
    gen = torch.Generator().manual_seed(0)
    assert guidance.sample_timesteps(500, 20, gen).max() <= 500
    assert guidance.sample_timesteps(500, 0, gen).max() > 500


def test_weights():
    abar = torch.tensor([0.25])
    assert sds_weight(abar, "sds").item() == pytest.approx(0.75)
    assert sds_weight(abar, "fantasia3d").item() == pytest.approx(0.5 * 0.75)
