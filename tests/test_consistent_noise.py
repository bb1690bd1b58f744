"""Consistent noise (docs/guidance-math.md#consistent-noise-and-cfd) and the cfd preset: the noise a representation
gives is N(0,1) per pixel and the same for a surface point seen from two cameras; SDS and ISM use it;
the per-Gaussian values follow densification; a consistent-noise run resumes exactly; the CLI runs."""

import math

import pytest
import torch

from dream3d import api
from dream3d.config import ConfigError, build_config
from dream3d.guidance.ism import ISMConfig, ISMGuidance
from dream3d.guidance.base import RuleContext
from dream3d.guidance.sds import CFDConfig, SDSConfig, SDSGuidance
from dream3d.representations.cameras import look_at_cameras
from dream3d.representations.gaussians import Gaussians, GaussiansConfig
from dream3d.representations.nerf import NeRF, NeRFConfig
from dream3d.representations.noise import NoiseFieldConfig
from tests.support import AnalyticPrior, as_image_gradient, cameras, run_cli
from tests.support import assert_same, final_params, interrupt_and_resume, metrics


def two_cameras(size):
    return look_at_cameras(torch.tensor([10.0, 25.0]), torch.tensor([0.0, 50.0]), torch.full((2,), 2.5), 45.0, size, size)


def assert_standard_normal(samples):
    """samples [n, ...]: per-entry mean 0 and variance 1 within 5 standard errors."""
    n = samples.shape[0]
    mean, var = samples.mean(0), samples.var(0)
    assert mean.abs().max() < 5 / math.sqrt(n), float(mean.abs().max())
    assert (var - 1).abs().max() < 5 * math.sqrt(2 / n), float((var - 1).abs().max())


def sphere_nerf(noise):
    """A NeRF whose density is a hard sphere of radius 0.6 (no blob)."""
    nerf = NeRF(NeRFConfig(grid_resolutions=[32], num_samples=128, blob_density=0.0, occupancy_resolution=16), noise)
    axis = torch.linspace(-1, 1, 32)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")  # grid_sample's (x, y, z) index (W, H, D)
    with torch.no_grad():
        nerf.grids[0][0, 0] = torch.where((x**2 + y**2 + z**2).sqrt() < 0.6, 200.0, -50.0)
    nerf.update_occupancy()
    return nerf


def surface_points(cams, out):
    origins, dirs = cams.rays()
    return origins + out.depth / out.alpha.clamp_min(1e-6) * dirs


# -- standard normal per pixel -------------------------------------------------------

def test_nerf_noise_is_standard_normal_per_pixel():
    nerf = sphere_nerf(NoiseFieldConfig(channels=3, grid_resolution=16, background_resolution=16))
    cams = two_cameras(24)
    out = nerf.render(cams, torch.ones(3))
    foreground = out.alpha > 0.5
    assert foreground.any() and (~foreground).any()  # surface and background pixels are both tested
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(400):
        nerf.refresh_noise(1.0, gen)  # gamma = 1: a fresh field
        samples.append(nerf.consistent_noise(cams, out, (3, 16, 16)))  # resized from 24^2 to the prior's 16^2
    assert_standard_normal(torch.stack(samples))


def test_gaussian_noise_is_standard_normal_per_pixel():
    rep = Gaussians(GaussiansConfig(num_points=48, init_opacity=0.6), noise=NoiseFieldConfig(channels=3))
    cams = two_cameras(12)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(300):
        rep.refresh_noise(1.0, gen)
        samples.append(rep.consistent_noise(cams, None, (3, 12, 12)))
    assert_standard_normal(torch.stack(samples))


def test_refresh_keeps_the_field_and_renews_it_slowly():
    rep = Gaussians(GaussiansConfig(num_points=10000), noise=NoiseFieldConfig(channels=1))
    before = rep.noise_values.clone()
    rep.refresh_noise(0.19, torch.Generator().manual_seed(1))
    corr = torch.corrcoef(torch.stack([before[:, 0], rep.noise_values[:, 0]]))[0, 1]
    assert corr == pytest.approx(0.9, abs=0.01)  # sqrt(1 - gamma)
    assert rep.noise_values.std() == pytest.approx(1.0, abs=0.02)


# -- the same surface point from two cameras ---------------------------------------

def test_nerf_noise_agrees_where_two_cameras_see_the_same_surface_point():
    nerf = sphere_nerf(NoiseFieldConfig(channels=3, grid_resolution=8))
    cams = two_cameras(32)
    out = nerf.render(cams, torch.ones(3))
    noise = nerf.consistent_noise(cams, out, (3, 32, 32)).permute(0, 2, 3, 1)  # [2,32,32,3]
    hit = out.alpha[..., 0] > 0.5
    points = surface_points(cams, out)
    assert (points[hit].norm(dim=-1) - 0.6).abs().max() < 0.05  # the render found the sphere
    a, b = points[0][hit[0]], points[1][hit[1]]
    distance = torch.cdist(a, b)
    same = (distance < 0.02).nonzero()
    far = (distance > 0.5).nonzero()
    assert len(same) > 20
    agree = lambda pairs: (noise[0][hit[0]][pairs[:, 0]] == noise[1][hit[1]][pairs[:, 1]]).all(-1).float().mean()  # noqa: E731
    assert agree(same) > 0.8  # the rest straddle a voxel face (8^3 voxels of 0.25)
    assert agree(far) == 0


def test_gaussian_noise_is_its_value_at_its_centre_from_two_cameras():
    rep = Gaussians(GaussiansConfig(num_points=1), noise=NoiseFieldConfig(channels=4))
    with torch.no_grad():
        rep.params["means"].zero_()
        rep.params["scales"].fill_(0.0)
        rep.params["opacities"].fill_(20.0)  # opaque: its value fills its centre
    rep.noise_values = torch.tensor([[1.7, -0.4, 0.3, 2.0]])
    cams = two_cameras(8)
    noise = rep.consistent_noise(cams, rep.render(cams, torch.ones(3)), (3, 16, 16))  # latent size != render size
    assert noise.shape == (2, 3, 16, 16)
    torch.testing.assert_close(noise[0, :, 8, 8], noise[1, :, 8, 8])
    # its alpha is capped at 0.999: a thousandth of the background noise mixes in
    torch.testing.assert_close(noise[0, :, 8, 8], torch.tensor([1.7, -0.4, 0.3]), atol=0.02, rtol=0)


def test_prior_input_larger_than_the_noise_state_is_refused():
    rep = Gaussians(GaussiansConfig(num_points=4), noise=NoiseFieldConfig(channels=3, background_resolution=8))
    with pytest.raises(ValueError, match="holds 3 channels and a 8\\^2 background; the prior's input is 4x8x8"):
        rep.consistent_noise(two_cameras(8), None, (4, 8, 8))


# -- the rules use the supplied noise ---------------------------------------------

def test_sds_uses_the_supplied_noise():
    prior, B, step, omega = AnalyticPrior(), 2, 0, 2.0
    eps_c = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    shapes = []

    def source(shape):
        shapes.append(tuple(shape))
        return eps_c

    guidance = SDSGuidance(prior, SDSConfig(guidance_scale=omega), RuleContext(steps=100, guidance_scale=1.0))
    rgb = torch.rand(B, 8, 8, 3, requires_grad=True)
    gen = torch.Generator().manual_seed(4)
    guidance(rgb, "a prompt", cameras(B), step, generator=gen, noise=source).loss.backward()
    assert shapes == [(B, 3, 8, 8)]

    t = torch.randint(20, 981, (B,), generator=torch.Generator().manual_seed(4))
    x = 2 * rgb.detach().permute(0, 3, 1, 2) - 1
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps_c
    cond = prior.eps(x_t, t, len("a prompt") / 10)
    eps_hat = cond + omega * (cond - prior.eps(x_t, t, -0.2))
    g = (1 - abar) * (eps_hat - eps_c)
    torch.testing.assert_close(rgb.grad, as_image_gradient(g, B), rtol=1e-5, atol=1e-6)


def cfd_t(step, steps):
    """CFD's t = round(1000 (0.02 + 0.96 (1 - p))), p through 0, 0.3, 0.6, 0.8 at 0, 10%, 50%, 100% of the run."""
    points = [(0.0, 0.0), (0.1, 0.3), (0.5, 0.6), (1.0, 0.8)]
    f = step / steps
    p = next(p0 + (p1 - p0) * (f - f0) / (f1 - f0) for (f0, p0), (f1, p1) in zip(points, points[1:]) if f <= f1)
    return round(1000 * (0.02 + 0.96 * (1 - p)))


def test_cfd_is_sds_with_sigma_over_alpha_and_descending_t():
    prior, B, steps, step, omega = AnalyticPrior(), 2, 200, 70, 3.0
    guidance = SDSGuidance(prior, CFDConfig(guidance_scale=omega), RuleContext(steps=steps, guidance_scale=1.0))
    schedule = [int(guidance.sample_timesteps(B, k, torch.Generator())[0]) for k in range(steps + 1)]
    assert schedule == [cfd_t(k, steps) for k in range(steps + 1)]
    assert schedule[0] == 980 and schedule[-1] == 212 and all(a >= b for a, b in zip(schedule, schedule[1:]))

    eps_c = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    rgb = torch.rand(B, 8, 8, 3, requires_grad=True)
    out = guidance(rgb, "a prompt", cameras(B), step, generator=torch.Generator(), noise=lambda shape: eps_c)
    out.loss.backward()
    t = cfd_t(step, steps)
    abar = prior.alphas_cumprod[t]
    x_t = abar.sqrt() * (2 * rgb.detach().permute(0, 3, 1, 2) - 1) + (1 - abar).sqrt() * eps_c
    cond = prior.eps(x_t, t, len("a prompt") / 10)
    g = ((1 - abar) / abar).sqrt() * (cond + omega * (cond - prior.eps(x_t, t, -0.2)) - eps_c)
    torch.testing.assert_close(rgb.grad, as_image_gradient(g, B), rtol=1e-5, atol=1e-6)
    assert out.info["t"] == t


def test_ism_uses_the_supplied_noise_in_place_of_its_draw(monkeypatch):
    prior, B = AnalyticPrior(), 2
    guidance = ISMGuidance(prior, ISMConfig(inversion_stride=100, inversion_steps=2))
    eps_c = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    rgb = torch.rand(B, 8, 8, 3)

    def grad(**kwargs):
        image = rgb.clone().requires_grad_()
        guidance(image, "a prompt", cameras(B), 10, generator=torch.Generator().manual_seed(3), **kwargs).loss.backward()
        return image.grad

    supplied = grad(noise=lambda shape: eps_c)
    monkeypatch.setattr(guidance, "noise", lambda x, generator: eps_c)
    torch.testing.assert_close(supplied, grad())


def test_a_rule_that_draws_its_own_noise_refuses_supplied_noise():
    from dream3d.guidance.base import GuidanceError
    from dream3d.guidance.csd import CSDConfig, CSDGuidance

    with pytest.raises(GuidanceError, match="CSDGuidance draws its own noise"):
        CSDGuidance(AnalyticPrior(), CSDConfig())(torch.rand(1, 8, 8, 3), "a prompt", cameras(1), 0,
                                                   generator=torch.Generator(), noise=lambda shape: torch.zeros(shape))


# -- state: densification and resume ------------------------------------------------

def test_noise_values_follow_densification_and_load_back():
    cfg = GaussiansConfig(num_points=32, refine_start=0, refine_every=1, grow_grad2d=0.0, prune_opa=0.05)
    rep = Gaussians(cfg, noise=NoiseFieldConfig(channels=2))
    with torch.no_grad():
        rep.params["opacities"][:8] = -6.0  # opacity 0.0025 < prune_opa: pruned
        rep.params["opacities"][8:] = 0.0
        rep.params["scales"][8:16] = math.log(0.005)  # small: duplicated (the rest split)
    before = rep.noise_values.clone()
    optimizers = {g["name"]: torch.optim.Adam([g]) for g in rep.param_groups()}
    out = rep.render(two_cameras(32), torch.ones(3))
    rep.before_backward(1, out)
    out.rgb.sum().backward()
    rep.after_step(1, out, optimizers)

    values = rep.noise_values
    assert len(values) == len(rep) > 32 and "noise_source" not in rep.strategy_state
    kept = (values[:, None] == before[None]).all(-1)  # [N', 32]: which rows keep an old value
    assert kept[:, :8].sum() == 0 and (kept[:, 8:].sum(0) == 1).all()  # pruned gone; each survivor exactly once
    assert len(values.unique(dim=0)) == len(values)  # clones and second children drew fresh values

    fresh = Gaussians(cfg, noise=NoiseFieldConfig(channels=2))
    fresh.load_state_dict(rep.state_dict())
    assert torch.equal(fresh.noise_values, values) and len(fresh.noise_values) == len(fresh)


@pytest.fixture
def one_thread():
    """With two threads, two fresh Gaussian runs with consistent noise already differ in the last
    float bits (a threaded CPU reduction), which says nothing about resume: compare on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
def test_consistent_noise_run_resumes_exactly(representation, tiny, one_thread):
    layers = [tiny, {"prompt": "a red cube", "guidance": "cfd", "representation": representation, "steps": 8,
                     "gaussians": {"refine_start": 2, "refine_every": 3, "max_gaussians": 400},
                     "noise_field": {"refresh": 0.01, "grid_resolution": 16}}]
    straight = api.run(build_config(*layers)).run_dir
    assert "noise_values" in final_params(straight) or "noise_grid" in final_params(straight)
    interrupted = interrupt_and_resume(layers, tiny["out"])
    assert metrics(interrupted) == metrics(straight)
    assert_same(final_params(straight), final_params(interrupted))


# -- config and end to end ----------------------------------------------------------

def test_consistent_noise_with_a_rule_that_cannot_take_it_is_refused():
    with pytest.raises(ConfigError, match="^--noise consistent works with the guidance rules sds, ism, cfd, not csd$"):
        build_config({"prompt": "a red cube", "guidance": "csd", "noise": "consistent"})
    assert build_config({"prompt": "a red cube", "guidance": "cfd"}).consistent_noise


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
def test_cli_cfd_runs_and_exports(representation, monkeypatch, capsys, tmp_path, rule_mechanism):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--guidance", "cfd", "--representation", representation)
    rule_mechanism("cfd", run_dir)


def test_cli_ism_with_consistent_noise_runs(monkeypatch, capsys, tmp_path, rule_mechanism):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--guidance", "ism", "--noise", "consistent")
    rule_mechanism("ism", run_dir)
    state = torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert any(k.endswith("noise_grid") for k in state["representation"])
