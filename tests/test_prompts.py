"""View-dependent prompts (threestudio's azimuth/elevation rules) and Perp-Neg (docs/guidance-math.md#perp-neg)."""

import math

import pytest
import torch

from dream3d.guidance.base import GuidanceError, RuleContext
from dream3d.guidance.perp_neg import perp_neg_embeddings, perpendicular_component
from dream3d.guidance.priors.base import Embeddings, ddpm_alphas_cumprod
from dream3d.guidance.prompts import VIEWS, view_index, view_prompts
from dream3d.guidance.sds import SDSConfig, SDSGuidance
from dream3d.representations.cameras import look_at_cameras


def f(a, b, c, r):
    return a * math.exp(-b * r) + c


@pytest.mark.parametrize("azimuth,elevation,view", [
    (0, 0, "front"), (44.9, 10, "front"), (-44.9, 0, "front"), (350, 0, "front"), (45, 0, "side"), (90, 0, "side"),
    (-90, 30, "side"), (135, 0, "side"), (135.1, 0, "back"), (180, 0, "back"), (-170, 0, "back"), (200, 45, "back"),
    (0, 60.5, "overhead"), (180, 89, "overhead"), (90, 60, "side"),
])
def test_view_at_known_angles(azimuth, elevation, view):
    index = view_index(torch.tensor([float(elevation)]), torch.tensor([float(azimuth)]))
    assert VIEWS[int(index)] == view


def test_view_prompts():
    assert view_prompts("a cat") == ["a cat, front view", "a cat, side view", "a cat, back view", "a cat, overhead view"]


def test_perp_neg_interpolation_and_weights():
    views, uncond = torch.randn(4, 3, 2), torch.randn(3, 2)
    front, side, back, overhead = views
    elevation = torch.tensor([0.0, 0.0, 0.0, 0.0, 70.0])
    pos, negatives, weights = perp_neg_embeddings(views, uncond, elevation, torch.tensor([0.0, 45.0, 135.0, 180.0, 30.0]))
    torch.testing.assert_close(pos, torch.stack([front, (front + side) / 2, (side + back) / 2, back, overhead]))
    for i in range(2):
        torch.testing.assert_close(negatives[i], torch.stack([front, side]))
    for i in (2, 3):
        torch.testing.assert_close(negatives[i], torch.stack([side, front]))
    torch.testing.assert_close(negatives[4], torch.stack([uncond, uncond]))
    expected = [
        [-f(4, 0.5, -2.426, 1.0), -f(4, 0.5, -2.426, 0.0)],
        [-f(4, 0.5, -2.426, 0.5), -f(4, 0.5, -2.426, 0.5)],
        [-f(1, 0.5, -0.606, 0.5), -f(1, 0.5, 0.967, 0.5)],
        [-f(1, 0.5, -0.606, 0.0), -f(1, 0.5, 0.967, 0.0)],
        [0.0, 0.0],
    ]
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_perpendicular_component():
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    p = perpendicular_component(a, b)
    assert (p * b).flatten(1).sum(-1).abs().max() < 1e-4
    along = a - p  # a multiple of b, per sample
    ratio = (along.flatten(1) / b.flatten(1))
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-3)


class ViewPrior:
    """A stand-in prior with view embeddings; its epsilon is nonlinear in the embedding, so the
    Perp-Neg differences are not parallel."""

    name, resolution, num_train_timesteps, unet = "views", 4, 1000, None
    P, Q = torch.linspace(-1, 1, 48).view(3, 4, 4), torch.cos(torch.arange(48.0)).view(3, 4, 4)

    def __init__(self, with_views=True):
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.views = torch.tensor([[0.9], [0.4], [-0.3], [0.1]]) if with_views else None

    def encode(self, rgb):
        return 2 * rgb - 1

    def embed(self, prompt):
        return Embeddings(prompt, torch.tensor([0.5]), torch.tensor([-0.2]), self.views)

    def predict_noise(self, x_t, t, embeddings, cameras=None):
        e = embeddings.view(-1, 1, 1, 1)
        return 0.5 * x_t + e * self.P + e**2 * self.Q


def test_sds_with_perp_neg_equals_formula():
    prior, B, omega = ViewPrior(), 3, 7.5
    guidance = SDSGuidance(prior, SDSConfig(guidance_scale=omega, perp_neg=True),
                            RuleContext(steps=100, guidance_scale=100.0))
    azimuth, elevation = torch.tensor([10.0, 100.0, 200.0]), torch.tensor([0.0, 20.0, 5.0])
    cams = look_at_cameras(elevation, azimuth, torch.full((B,), 2.5), 45.0, 4, 4)
    rgb = torch.rand(B, 4, 4, 3, requires_grad=True)
    guidance(rgb, "p", cams, step=0, generator=torch.Generator().manual_seed(3)).loss.backward()

    replay = torch.Generator().manual_seed(3)
    t = torch.randint(20, 981, (B,), generator=replay)
    noise = torch.randn(B, 3, 4, 4, generator=replay)
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * (2 * rgb.detach().permute(0, 3, 1, 2) - 1) + (1 - abar).sqrt() * noise
    pos, negatives, weights = perp_neg_embeddings(prior.views, torch.tensor([-0.2]), elevation, azimuth)
    eps_u = prior.predict_noise(x_t, t, torch.full((B, 1), -0.2))
    e_pos = prior.predict_noise(x_t, t, pos) - eps_u
    eps_hat = eps_u + omega * e_pos
    for i in range(2):
        e_i = prior.predict_noise(x_t, t, negatives[:, i]) - eps_u
        dot = (e_i * e_pos).flatten(1).sum(-1) / e_pos.flatten(1).pow(2).sum(-1)
        eps_hat = eps_hat + omega * weights[:, i].view(-1, 1, 1, 1) * (e_i - dot.view(-1, 1, 1, 1) * e_pos)
    g = (1 - abar) * (eps_hat - noise)
    torch.testing.assert_close(rgb.grad, (2 * g / B).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-6)


def test_perp_neg_needs_view_embeddings():
    guidance = SDSGuidance(ViewPrior(with_views=False), SDSConfig(perp_neg=True),
                            RuleContext(steps=100, guidance_scale=100.0))
    cams = look_at_cameras(torch.zeros(1), torch.zeros(1), torch.full((1,), 2.5), 45.0, 4, 4)
    with pytest.raises(GuidanceError, match="perp_neg needs a prior with view-dependent prompts"):
        guidance(torch.rand(1, 4, 4, 3), "p", cams, step=0, generator=torch.Generator())
