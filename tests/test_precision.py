"""Mixed precision (issue 15): half-precision prior weights, float32 renders, gradients that survive.

CPU half kernels stand in for the GPU's: the gradient that reaches the render through a float16 VAE
encoder must match the float32 one, which it does only with the loss scale (without it the small
SDS-sized gradients flush to zero in float16).
"""

import pytest
import torch

from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
from dream3d.guidance.priors.precision import INIT_SCALE, LossScale
from dream3d.guidance.priors.sd import StableDiffusionPrior
from dream3d.guidance.prompts import PromptConfig
from tests.tiny_diffusers import build_tiny_sd

GRAD_SIZE = 1e-6  # per-latent gradient: SDS's w(t) (eps_hat - eps) / B is of this order late in a run


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


def grad_at_render(prior: StableDiffusionPrior, dtype: torch.dtype, init_scale: float = INIT_SCALE,
                   grad_size: float = GRAD_SIZE) -> torch.Tensor:
    """d (latents . g) / d rgb [2,3,16,16] float32 with the VAE in ``dtype`` (same posterior sample, same g)."""
    prior.vae.to(dtype)
    prior.dtype = dtype
    prior.loss_scale = LossScale(dtype, prior.device, init_scale=init_scale)
    prior.use_generator(torch.Generator().manual_seed(3))
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    latents = prior.encode(rgb)
    assert latents.dtype == torch.float32
    g = grad_size * torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    (latents * g).sum().backward()
    assert rgb.grad.dtype == torch.float32
    return rgb.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_float16_gradient_matches_float32_with_the_loss_scale(tiny_sd):
    prior = StableDiffusionPrior(tiny_sd, DiffusersConfig(device="cpu"), PromptConfig())
    reference = grad_at_render(prior, torch.float32)
    assert relative_error(grad_at_render(prior, torch.float16), reference) < 1e-2
    # the same backward unscaled: most of the gradient flushes to zero
    assert relative_error(grad_at_render(prior, torch.float16, init_scale=1.0), reference) > 0.1


def test_bfloat16_gradient_matches_float32_without_a_scale(tiny_sd):
    prior = StableDiffusionPrior(tiny_sd, DiffusersConfig(device="cpu"), PromptConfig())
    reference = grad_at_render(prior, torch.float32)
    assert not LossScale(torch.bfloat16, prior.device).enabled
    assert relative_error(grad_at_render(prior, torch.bfloat16), reference) < 5e-2


def test_overflow_halves_the_scale_and_finite_steps_grow_it():
    scale = LossScale(torch.float16, torch.device("cpu"), init_scale=2.0**14, growth_interval=2)
    x = torch.ones(3, requires_grad=True)
    # the gradient enters at 1 (scaled to 2^10, the headroom cap) and a layer multiplies it by 2^8: overflow
    scale.leave(scale.enter(x) * 2.0**8).sum().backward()
    assert not torch.isfinite(x.grad).all() and float(scale.scale) == 2.0**13
    for _ in range(2):
        x.grad = None
        scale.leave(scale.enter(x) * 2).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    assert float(scale.scale) == 2.0**14


def test_cfg_100_sized_gradients_do_not_overflow_on_the_first_step(tiny_sd):
    """SDS at CFG 100 puts gradients of 10-100 on the latents: times a fixed 2^16 they overflow float16 (65504)
    and the first steps were skipped; the headroom cap scales them by at most 2^10 / max|g|."""
    prior = StableDiffusionPrior(tiny_sd, DiffusersConfig(device="cpu"), PromptConfig())
    reference = grad_at_render(prior, torch.float32, grad_size=50.0)
    half = grad_at_render(prior, torch.float16, grad_size=50.0)
    assert torch.isfinite(half).all() and float(prior.loss_scale.scale) == INIT_SCALE  # no overflow, no halving
    assert relative_error(half, reference) < 1e-2


# -- the LoRA path: VSD/ESD's fake-score loss back-propagated through a float16 UNet -----------------------

LATENT = 64  # SD's 64x64 latents at batch 1: the mean squared error's gradient is about 1e-4 per element
OUTPUT_SHRINK = 2.0**-12  # a UNet whose output layer is this small passes the LoRA ~1e-9 gradients: below
# float16's smallest subnormal (6e-8), so unscaled every one of them flushes to zero


def lora_gradient(tiny_sd: str, dtype: torch.dtype) -> torch.Tensor:
    """The LoRA's (and camera MLP's) gradient [P] float32 after one fake-score step of a UNet in ``dtype``; the
    same weights, draws and LoRA as in float32."""
    from dream3d.guidance.vsd import VSDConfig, VSDGuidance
    from tests.support import cameras

    prior = StableDiffusionPrior(tiny_sd, DiffusersConfig(device="cpu"), PromptConfig())
    with torch.no_grad():
        prior.unet.conv_out.weight.mul_(OUTPUT_SHRINK)
    prior.unet.to(dtype)  # float32 on the CPU by default: a GPU's float16 UNet, in CPU half kernels
    guidance = VSDGuidance(prior, VSDConfig(camera_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; a non-zero LoRA reads the layers' gradient through both factors
        for p in guidance.lora:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(1, 4, LATENT, LATENT, generator=gen)
    guidance.train_fake_score(x, prior.embed("a cat"), cameras(1), gen)
    return torch.cat([p.grad.flatten() for group in guidance.optimizer.param_groups for p in group["params"]])


def test_float16_lora_gradient_matches_float32_with_the_loss_scale(tiny_sd, monkeypatch, tmp_path):
    """Unscaled, the LoRA learns nothing (every gradient flushed); scaled, its gradient is float32's within 1%."""
    monkeypatch.setenv("DREAM3D_CACHE", str(tmp_path / "cache"))
    reference = lora_gradient(tiny_sd, torch.float32)
    assert reference.abs().max() > 0
    assert relative_error(lora_gradient(tiny_sd, torch.float16), reference) < 1e-2
    monkeypatch.setattr(LossScale, "leave", lambda self, y: y.float())  # the backward as it was: no scale
    assert torch.count_nonzero(lora_gradient(tiny_sd, torch.float16)) == 0
