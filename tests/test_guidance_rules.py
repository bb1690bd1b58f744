"""CSD, ISM, VSD and ESD: the gradient reaching the image equals docs/guidance-math.md's formula
(sections 4-7) on priors with known outputs; VSD's fake score learns and checkpoints; rules
that need a UNet are refused with closed-form priors; every rule runs end to end."""

import pytest
import torch

from dream3d.config import ConfigError, build_config
from dream3d.guidance.base import GuidanceError, RuleContext
from dream3d.guidance.csd import CSDConfig, CSDGuidance
from dream3d.guidance.ism import ISMConfig, ISMGuidance
from dream3d.guidance.priors.base import Embeddings
from dream3d.guidance.prompts import view_index
from dream3d.representations.cameras import look_at_cameras
from tests.support import (
    AnalyticPrior, as_image_gradient, cameras, dream3d, image_gradient, replay_noising, run_cli,
)


# -- CSD ----------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_csd_gradient_equals_formula(normalize):
    prior, B, step, omega = AnalyticPrior(), 3, 2500, 2.0
    cfg = CSDConfig(guidance_scale=omega, negative_prompt="ugly", weighting="sds", grad_normalize=normalize)
    rgb = torch.rand(B, 8, 8, 3)
    grad, out = image_gradient(CSDGuidance(prior, cfg), rgb, step, seed=3)

    t, _, abar, x_t = replay_noising(prior, rgb, seed=3)  # max 0.98 until step 5000
    eps_y, eps_0, eps_neg = (prior.eps(x_t, t, v) for v in (len("a prompt") / 10, -0.2, len("ugly") / 10))
    beta = 0.5  # [0, 1, 5000] at step 2500
    g = (1 - abar) * omega * ((eps_y - eps_0) - beta * (eps_neg - eps_0))
    if normalize:
        g = g / (g.norm() + 1e-8)
    torch.testing.assert_close(grad, as_image_gradient(g, B), rtol=1e-5, atol=1e-7)
    assert out.info["beta"] == pytest.approx(beta)


def test_csd_without_negative_prompt_is_pure_classifier_score():
    prior, B = AnalyticPrior(), 2
    rgb = torch.rand(B, 8, 8, 3)
    grad, _ = image_gradient(CSDGuidance(prior, CSDConfig(grad_normalize=False)), rgb, 0, seed=0)
    # uniform weight, omega 1: g = eps_y - eps_0 = 0.8 - (-0.2), whatever x_t
    torch.testing.assert_close(grad, as_image_gradient(torch.full((B, 3, 8, 8), 1.0), B))


class ViewPrior(AnalyticPrior):
    """AnalyticPrior with view prompts: front/side/back/overhead embed as 0.3/0.5/0.7/0.9."""

    VIEWS = torch.tensor([[0.3], [0.5], [0.7], [0.9]])

    def embed(self, prompt):
        return Embeddings(prompt, torch.tensor([len(prompt) / 10]), torch.tensor([-0.2]), self.VIEWS)


def blended_view(azimuth):
    """interpolate_views for ViewPrior at elevation 15: front-side blend on the front half, side-back behind."""
    a = abs((azimuth + 180) % 360 - 180)
    r = 1 - a / 90 if a < 90 else 2 - a / 90
    return r * 0.3 + (1 - r) * 0.5 if a < 90 else r * 0.5 + (1 - r) * 0.7


def test_csd_perp_neg_term_equals_formula():
    """g = w omega [(eps_y - eps_0) - beta (eps_neg - eps_0)] + w s_pn sum_i w_i perp(e_i, e_pos), y the azimuth blend."""
    from dream3d.guidance.perp_neg import perp_neg_embeddings, perpendicular_component

    prior, B, step = ViewPrior(), 2, 2500
    cfg = CSDConfig(guidance_scale=2.0, negative_prompt="ugly", weighting="sds", grad_normalize=False, perp_neg_scale=3.0)
    rgb = torch.rand(B, 8, 8, 3)
    grad, out = image_gradient(CSDGuidance(prior, cfg), rgb, step, seed=3)

    t, _, abar, x_t = replay_noising(prior, rgb, seed=3)
    cams = cameras(B)
    pos = torch.tensor([blended_view(float(a)) for a in cams.azimuth])
    eps = lambda value: torch.cat([prior.eps(x_t[i:i + 1], t[i:i + 1], float(v)) for i, v in enumerate(value)])  # noqa: E731
    eps_y, eps_0, eps_neg = eps(pos), eps([-0.2] * B), eps([len("ugly") / 10] * B)
    _, negatives, weights = perp_neg_embeddings(ViewPrior.VIEWS, torch.tensor([-0.2]), cams.elevation, cams.azimuth)
    e_pos = eps_y - eps_0
    perp = sum(weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(eps(negatives[:, i, 0]) - eps_0, e_pos)
               for i in range(2))
    w = 1 - abar
    g = w * 2.0 * ((eps_y - eps_0) - 0.5 * (eps_neg - eps_0)) + w * 3.0 * perp
    assert perp.abs().sum() > 0
    torch.testing.assert_close(grad, as_image_gradient(g, B), rtol=1e-4, atol=1e-6)


def test_open_vocabulary_priors_get_the_references_negative_prompts_and_perp_neg():
    from dream3d.run.build import build_guidance

    for prior, expected in (("sd", True), ("if", True), ("toy-unet-mv", False), ("toy", False)):
        for rule in ("csd", "ism", "nfsd"):
            guidance = build_guidance(build_config({"prompt": "a cat", "prior": prior, "guidance": rule}), ViewPrior())
            assert (guidance.negative is not None) == expected, (prior, rule)
            if rule == "csd":
                assert guidance.perp_neg_scale == (3.0 if expected else 0.0)
    off = CSDGuidance(ViewPrior(), CSDConfig(negative_prompt="", perp_neg_scale=0), RuleContext(open_vocabulary=True))
    assert off.negative is None and off.perp_neg_scale == 0


# -- NFSD (the rule added through one module and one registry line) -------------------

@pytest.mark.parametrize("negative", [None, "ugly"])
def test_nfsd_gradient_equals_formula(negative):
    """g = w(t) (delta_D + s (eps_y - eps_0)), delta_D = eps_0 below small_t, else eps_0 - eps_neg (eps_0 without one)."""
    from dream3d.guidance.nfsd import NFSDConfig, NFSDGuidance

    prior, B, s = AnalyticPrior(), 4, 7.5
    cfg = NFSDConfig(negative_prompt=negative, small_t=500)
    rgb = torch.rand(B, 8, 8, 3)
    grad, _ = image_gradient(NFSDGuidance(prior, cfg), rgb, 0, seed=2)

    t, _, abar, x_t = replay_noising(prior, rgb, seed=2)
    eps_y, eps_0 = prior.eps(x_t, t, len("a prompt") / 10), prior.eps(x_t, t, -0.2)
    eps_neg = eps_0 if negative is None else prior.eps(x_t, t, len(negative) / 10)
    delta_d = torch.where((t < 500).view(-1, 1, 1, 1), eps_0, eps_0 - eps_neg)
    g = (1 - abar) * (delta_d + s * (eps_y - eps_0))
    assert (t < 500).any() and (t >= 500).any()
    torch.testing.assert_close(grad, as_image_gradient(g, B), rtol=1e-4, atol=1e-6)


# -- ISM ----------------------------------------------------------------------------

def ddim(x, eps, abar_from, abar_to):
    return abar_to.sqrt() * (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt() + (1 - abar_to).sqrt() * eps


@pytest.mark.parametrize("steps", [3, 1])
def test_ism_gradient_equals_formula(steps):
    prior, B, step = AnalyticPrior(), 2, 50
    cfg = ISMConfig(guidance_scale=3.0, lambda_guidance=0.5, negative_prompt="blurry", warmup_steps=100,
                    inversion_stride=60, inversion_steps=steps, delta_t=40, delta_t_start=100)
    rgb = torch.rand(B, 8, 8, 3)
    grad, out = image_gradient(ISMGuidance(prior, cfg), rgb, step, seed=5)

    replay = torch.Generator().manual_seed(5)
    r = 1 - step / 100
    t = int(torch.randint(20, 500 + int(480 * r), (1,), generator=replay))
    s = max(t - int(40 + r * 60), 0)
    offset = torch.randn(1, 3, 1, 1, generator=replay)
    noise = torch.randn(B, 3, 8, 8, generator=replay) + 0.1 * offset
    abar = lambda k: prior.alphas_cumprod[k]  # noqa: E731
    x = 2 * rgb.permute(0, 3, 1, 2) - 1
    # LucidDreamer: noise to max(s - stride * steps, 0), invert in strides (the last one lands on s), one more to t
    tau = max(s - 60 * steps, 0)
    x_tau = abar(tau).sqrt() * x + (1 - abar(tau)).sqrt() * noise
    for _ in range(steps):
        nxt = min(tau + 60, s)
        x_tau = ddim(x_tau, prior.eps(x_tau, tau, -0.2), abar(tau), abar(nxt))
        tau = nxt
        if tau == s:
            break
    assert tau == s or steps == 1
    target = prior.eps(x_tau, s, -0.2)
    x_t = ddim(x_tau, target, abar(s), abar(t))
    eps_hat = prior.eps(x_t, t, len("blurry") / 10) + 3.0 * (prior.eps(x_t, t, 0.8) - prior.eps(x_t, t, len("blurry") / 10))
    g = 0.5 * ((1 - abar(t)) / abar(t)).sqrt() * (eps_hat - target)
    torch.testing.assert_close(grad, as_image_gradient(g, B), rtol=1e-4, atol=1e-6)
    assert (out.info["t"], out.info["s"]) == (t, s)


def test_ism_blends_the_view_prompts_by_azimuth():
    """With view prompts, y is interpolate_views' blend (LucidDreamer), not the nearest view's prompt."""
    cfg = dict(guidance_scale=3.0, warmup_steps=100, inversion_stride=60, inversion_steps=2)
    cams = look_at_cameras(torch.full((2,), 15.0), torch.tensor([30.0, 200.0]), torch.full((2,), 2.5), 45.0, 8, 8)

    def gradient(**extra):
        rgb = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
        guidance = ISMGuidance(ViewPrior(), ISMConfig(**cfg, **extra))
        guidance(rgb, "a prompt", cams, step=50, generator=torch.Generator().manual_seed(5)).loss.backward()
        return rgb.grad

    blended, nearest = gradient(), gradient(view_interpolation=False)
    # eps is affine in the prompt value, so g differs by lambda sigma/alpha omega (y_blend - y_nearest)
    y_blend = torch.tensor([blended_view(float(a)) for a in cams.azimuth])
    y_near = ViewPrior.VIEWS[:, 0][view_index(cams.elevation, cams.azimuth)]
    ratio = (blended - nearest).mean(dim=(1, 2, 3)) / (y_blend - y_near)
    assert (y_blend - y_near).abs().min() > 0.01
    torch.testing.assert_close(ratio[0], ratio[1], rtol=1e-3, atol=1e-6)


def test_ism_interval_anneals():
    guidance = ISMGuidance(AnalyticPrior(), ISMConfig())
    gen = torch.Generator().manual_seed(0)
    early = [guidance.interval(0, gen) for _ in range(300)]
    late = [guidance.interval(1500, gen) for _ in range(300)]
    assert all(t - s == 100 or s == 0 for t, s in early) and max(t for t, _ in early) > 900
    assert all(t - s == 80 or s == 0 for t, s in late) and max(t for t, _ in late) < 500


def test_ism_runs_on_the_closed_form_toy_prior():
    from dream3d.guidance.priors.toy import build_toy_prior

    guidance = ISMGuidance(build_toy_prior("toy"), ISMConfig(inversion_stride=400, inversion_steps=2))
    grad, out = image_gradient(guidance, torch.rand(1, 16, 16, 3), 0, seed=0, prompt="a red cube")
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0 and out.info["t"] > out.info["s"]


# -- refusals -----------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["vsd", "esd"])
def test_vsd_and_esd_refused_with_closed_form_priors(rule, monkeypatch, capsys, tmp_path):
    with pytest.raises(ConfigError, match=f"guidance {rule} .* prior toy is closed-form .*; use one of the priors .*sd"):
        build_config({"prompt": "a red cube", "guidance": rule, "prior": "toy"})
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--guidance", rule, "--prior", "toy-mv", "--out", out)
    assert status == 1 and len(err.splitlines()) == 1 and "closed-form (no UNet)" in err
    assert not out.exists()


@pytest.mark.parametrize("rule", ["csd", "ism"])
def test_negative_prompt_the_prior_cannot_take_fails_before_the_run_folder(rule, monkeypatch, capsys, tmp_path):
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--guidance", rule, "--prior", "toy", "--out", out,
                          f"{rule}.negative_prompt=ugly")
    assert status == 1 and len(err.splitlines()) == 1 and "does not know 'ugly'" in err
    assert not out.exists()


def test_vsd_refused_by_the_rule_itself_without_a_unet():
    from dream3d.guidance.vsd import VSDConfig, VSDGuidance

    with pytest.raises(GuidanceError, match="prior analytic has none"):
        VSDGuidance(AnalyticPrior(), VSDConfig())


def test_esd_is_vsd_with_half_camera_guidance():
    cfg = build_config({"prompt": "a cat", "guidance": "esd", "prior": "sd", "esd": {"lora_lr": 1e-3}})
    assert cfg.esd.camera_guidance_scale == 0.5 and cfg.esd.lora_lr == 1e-3 and cfg.vsd.camera_guidance_scale == 1.0
    with pytest.raises(ConfigError, match="only camera_dropout > 0 trains"):
        build_config({"prompt": "a cat", "guidance": "esd", "prior": "sd", "esd": {"camera_dropout": 0}})


# -- end to end ---------------------------------------------------------------------

@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
@pytest.mark.parametrize("rule", ["csd", "ism"])
def test_cli_runs_on_the_toy_prior(rule, representation, monkeypatch, capsys, tmp_path, rule_mechanism):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--guidance", rule, "--prior", "toy",
                      "--representation", representation)
    rule_mechanism(rule, run_dir)
