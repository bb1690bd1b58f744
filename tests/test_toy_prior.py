"""The embedded toy prior: an exact posterior-mean denoiser over cached toy-world renders."""

from __future__ import annotations

import pytest
import torch

from dream3d.guidance.priors import toy_world
from dream3d.guidance.priors import toy
from dream3d.guidance.priors.base import Prior, PriorError, ddpm_alphas_cumprod
from dream3d.guidance.priors.diffusers_prior import DiffusersPrior
from dream3d.guidance.priors.toy import AZIMUTHS, ELEVATIONS, ToyPrior, build_toy_prior, load_shape_renders, toy_dataset
from dream3d.guidance.priors.toy_world import class_index, render_classes
from dream3d.representations.cameras import degrees_between, look_at_cameras

V = len(ELEVATIONS) * len(AZIMUTHS)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private cache dir for the whole session, so the dataset renders once."""
    root = tmp_path_factory.mktemp("dream3d-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAM3D_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def priors(cache):
    return ToyPrior(), ToyPrior(camera_conditioned=True)


def cameras_at(elevation, azimuth):
    n = len(elevation)
    return look_at_cameras(torch.tensor(elevation), torch.tensor(azimuth), torch.full((n,), 2.5), 45.0, 64, 64)


def dataset_image(cls: int, view: int) -> torch.Tensor:
    """x_i [3,64,64] in float64, as the prior defines it."""
    data = toy_dataset()
    return (data.mean.double() + data.images[cls * V + view].double()).view(3, 64, 64)


@pytest.fixture(scope="session")
def dataset64(cache) -> list[torch.Tensor]:
    """The dataset's images x_i in float64, in chunks of [648, D]."""
    data = toy_dataset()
    return [data.mean.double() + chunk.double() for chunk in data.images.split(648)]


def brute_force_eps(dataset64, x_t, t, masks, cameras, view_sigma_deg, view_window_deg) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon in float64 from the definitions, for toy (the exact posterior over every image the prompt
    allows) and toy-mv (the exact posterior over the classes at each view, mixed by the camera's kernel)."""
    data = toy_dataset()
    abar = ddpm_alphas_cumprod()[t].double()[:, None]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    q = x_t.double().flatten(1)
    sq_dist = torch.stack([torch.cat([((q[b] - a[b] * x) ** 2).sum(-1) for x in dataset64]) for b in range(len(q))])
    log_w = torch.log(masks.double()[:, data.class_of]) - sq_dist / (2 * s * s)
    angle = degrees_between(cameras.elevation.double()[:, None], cameras.azimuth.double()[:, None],
                            data.elevation[None], data.azimuth[None])  # [B, V]
    in_window = angle <= angle.amin(-1, keepdim=True) + view_window_deg
    view_w = torch.softmax(torch.where(in_window, -angle**2 / (2 * view_sigma_deg**2), -torch.inf), dim=1)
    per_view = torch.softmax(log_w.view(len(q), -1, V), dim=1).nan_to_num(0.0)  # [B, classes, V]
    out = []
    for w in (torch.softmax(log_w, dim=1), (per_view * view_w[:, None]).flatten(1)):
        x0 = sum(w_chunk @ x for w_chunk, x in zip(w.split(648, dim=1), dataset64))
        out.append(((q - a * x0) / s).view_as(x_t))
    return out[0], out[1]


def noisy(x0: torch.Tensor, t: int, prior: ToyPrior, seed: int) -> torch.Tensor:
    abar = prior.alphas_cumprod[t].double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float()


@pytest.mark.parametrize("t", [0, 3, 40, 400, 999])
def test_predict_noise_is_the_exact_posterior(priors, dataset64, t):
    prior, prior_mv = priors
    cone, cube = class_index("blue", "cone"), class_index("green", "cube")
    # near-duplicate views (a cone from every azimuth) make small t the numerically hard case
    x_t = torch.stack([noisy(dataset_image(cone, 30), t, prior, 0), noisy(dataset_image(cube, 77), t, prior, 1),
                       torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(2))])
    ts = torch.full((3,), t)
    masks = torch.stack([prior.embed("").cond, prior.embed("a cone").cond, prior.embed("a green shape").cond])
    cams = cameras_at([12.0, 30.0, -5.0], [90.0, 200.0, 333.0])
    expected = brute_force_eps(dataset64, x_t, ts, masks, cams, prior_mv.view_sigma_deg, prior_mv.view_window_deg)
    for p, c, exact in ((prior, None, expected[0]), (prior_mv, cams, expected[1])):
        eps = p.predict_noise(x_t, ts, masks, c)
        assert eps.shape == x_t.shape and eps.dtype == torch.float32
        assert torch.allclose(eps.double(), exact, atol=5e-5, rtol=0)


def test_mixed_timesteps_in_one_batch(priors):
    prior, _ = priors
    x_t = torch.stack([noisy(dataset_image(c, v), t, prior, c) for c, v, t in ((3, 5, 2), (20, 100, 500))])
    ts = torch.tensor([2, 500])
    masks = torch.ones(2, 36)
    both = prior.predict_noise(x_t, ts, masks)
    for b in range(2):
        assert torch.allclose(both[b:b + 1], prior.predict_noise(x_t[b:b + 1], ts[b:b + 1], masks[b:b + 1]), atol=1e-5)


def test_small_t_denoises_to_the_image(priors):
    prior, prior_mv = priors
    cls, view = class_index("orange", "pyramid"), 2 * 24 + 1
    x0 = dataset_image(cls, view)
    x_t = noisy(x0, 0, prior, 3)[None]
    t = torch.tensor([0])
    mask = prior.embed("").cond[None]
    # toy-mv at the image's own view singles it out; plain toy also averages the pyramid's
    # four-fold symmetric twins, which differ only in a few anti-aliased edge pixels.
    cam = cameras_at([ELEVATIONS[2]], [AZIMUTHS[1]])
    assert torch.allclose(prior_mv.posterior_mean(x_t, t, mask, cam)[0].double(), x0, atol=1e-4)
    x0_hat = prior.posterior_mean(x_t, t, mask)[0].double()
    assert (x0_hat - x0).abs().mean() < 1e-3 and (x0_hat - x0).abs().max() < 0.1


def test_toy_mv_does_not_take_a_view_from_another_elevation_ring(priors):
    """At small t the image distances swamp any kernel weight: with a kernel alone, a render that looks
    like the view from 12 degrees came back as that view for a camera at 1 degree, so SDS kept whatever
    made it look so (a cone's skirt under its base). The window admits only the views around the camera."""
    _, prior_mv = priors
    cone = class_index("yellow", "cone")
    above = dataset_image(cone, 2 * 24)  # elevation 12, azimuth 0
    x_t = noisy(above, 100, prior_mv, 5)[None]
    camera = cameras_at([ELEVATIONS[1]], [AZIMUTHS[0]])  # elevation 1, azimuth 0
    mask = prior_mv.embed("a yellow cone").cond[None]
    x0 = prior_mv.posterior_mean(x_t, torch.tensor([100]), mask, camera)[0].double()
    at_camera = dataset_image(cone, 1 * 24)
    assert (x0 - at_camera).abs().max() < 1e-3
    assert (x0 - above).abs().max() > 0.5


def test_toy_mv_takes_the_view_from_the_camera_not_from_the_image(priors):
    """Between two dataset views the camera decides how much of each the denoised image holds. When the
    posterior weighed the views by the image too, a cone render from elevation 4 whose base hung low came
    back, at small t, as the view from 12 degrees alone (the nearer view is at 1), and SDS kept the skirt."""
    _, prior_mv = priors
    cone = class_index("yellow", "cone")
    at_1, at_12 = dataset_image(cone, 1 * 24), dataset_image(cone, 2 * 24)  # azimuth 0
    mask = prior_mv.embed("a yellow cone").cond[None]
    camera = cameras_at([4.0], [0.0])
    kernel = torch.tensor([-(3.0**2), -(8.0**2)], dtype=torch.float64) / (2 * prior_mv.view_sigma_deg**2)
    w_1, w_12 = torch.softmax(kernel, 0).tolist()
    for t, seed in ((20, 6), (100, 7), (400, 8)):
        x0 = prior_mv.posterior_mean(noisy(at_12, t, prior_mv, seed)[None], torch.tensor([t]), mask, camera)[0].double()
        assert (x0 - (w_1 * at_1 + w_12 * at_12)).abs().max() < 1e-3


def test_prompt_restricts_the_posterior_to_its_classes(priors):
    prior, _ = priors
    # a noisy green sphere, asked for "a red cube": the posterior is red cubes only, i.e. pixels are
    # blends of white and shaded red, whose green and blue channels are equal.
    x_t = noisy(dataset_image(class_index("green", "sphere"), 40), 400, prior, 4)[None]
    for prompt, equal in (("a red cube", True), ("", False)):
        x0 = prior.posterior_mean(x_t, torch.tensor([400]), prior.embed(prompt).cond[None])[0]
        assert ((x0[1] - x0[2]).abs().max() < 1e-5) == equal
    red_cube = prior.embed("a red cube").cond
    assert red_cube.sum() == 1 and red_cube[class_index("red", "cube")] == 1


def test_embed(priors):
    prior, _ = priors
    e = prior.embed("a red shape")
    assert e.cond.shape == (36,) and e.cond.sum() == 6 and torch.equal(e.uncond, torch.ones(36))
    assert prior.embed("a red shape") is e
    with pytest.raises(PriorError, match="fluffy"):
        prior.embed("a fluffy cube")


def test_toy_mv_needs_cameras(priors):
    _, prior_mv = priors
    with pytest.raises(ValueError, match="camera"):
        prior_mv.predict_noise(torch.zeros(1, 3, 64, 64), torch.tensor([10]), torch.ones(1, 36))


def test_interface_and_factory(cache):
    p, p_mv = build_toy_prior("toy"), build_toy_prior("toy-mv")
    assert (p.name, p_mv.name) == ("toy", "toy-mv") and p_mv.camera_conditioned
    assert p.resolution == 64 and p.num_train_timesteps == 1000 and p.unet is None
    assert p.alphas_cumprod.shape == (1000,)
    with pytest.raises(PriorError):
        build_toy_prior("toy-xl")


def test_encode_decode(priors):
    prior, _ = priors
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    x = prior.encode(rgb)
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    x.square().sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    same = torch.rand(1, 3, 64, 64)
    assert torch.equal(prior.encode(same), 2 * same - 1)
    assert torch.allclose(prior.decode(prior.encode(same)), same, atol=1e-6)
    assert prior.decode(torch.full((1, 3, 4, 4), 3.0)).max() == 1


def test_predict_noise_with_grad_input(priors):
    prior, _ = priors
    x_t = torch.zeros(1, 3, 64, 64, requires_grad=True)
    eps = prior.predict_noise(x_t, torch.tensor([500]), torch.ones(1, 36))
    assert torch.isfinite(eps).all() and not eps.requires_grad


def test_dataset_is_the_toy_world(cache):
    cls, view = class_index("purple", "torus"), 4 * 24 + 7
    rgb = render_classes(cameras_at([ELEVATIONS[4]], [AZIMUTHS[7]]), [cls])["rgb"]
    assert torch.allclose(dataset_image(cls, view).float(), (2 * rgb - 1)[0].permute(2, 0, 1), atol=1e-6)


def test_disk_cache_is_reused(cache, priors, monkeypatch):
    def no_render(*args, **kwargs):
        raise AssertionError("rendered again despite the disk cache")

    monkeypatch.setattr(toy_world, "render_shapes", no_render)
    renders = load_shape_renders()
    assert renders["mask"].shape == (6, V, 64, 64, 1)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["shapes.pt"]  # no temp files left behind
    toy._dataset_at.cache_clear()  # a fresh process: rebuilt from disk, not rendered
    assert torch.equal(toy_dataset().images, priors[0]._data[torch.device("cpu")].images)


def test_every_prior_takes_the_runs_generator_so_the_loop_need_not_ask():
    """The loop calls use_generator on any prior; the toy prior, which draws nothing, inherits the base's no-op."""
    assert Prior in ToyPrior.__mro__ and Prior in DiffusersPrior.__mro__
    prior = ToyPrior()
    before = torch.random.get_rng_state()
    assert prior.use_generator(torch.Generator().manual_seed(0)) is None
    assert torch.equal(torch.random.get_rng_state(), before)
