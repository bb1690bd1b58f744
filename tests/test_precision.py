"""Mixed precision (issue 15): half-precision prior weights, float32 renders, gradients that survive.

CPU half kernels stand in for the GPU's: the gradient that reaches the render through a float16 VAE
encoder must match the float32 one, which it does only with the loss scale (without it the small
SDS-sized gradients flush to zero in float16).
"""

import pytest
import torch

from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
from dream3d.guidance.priors.precision import LossScale
from dream3d.guidance.priors.sd import StableDiffusionPrior
from dream3d.guidance.prompts import PromptConfig
from tests.tiny_diffusers import build_tiny_sd

GRAD_SIZE = 1e-6  # per-latent gradient: SDS's w(t) (eps_hat - eps) / B is of this order late in a run


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


def grad_at_render(prior: StableDiffusionPrior, dtype: torch.dtype, init_scale: float = 2.0**16) -> torch.Tensor:
    """d (latents . g) / d rgb [2,3,16,16] float32 with the VAE in ``dtype`` (same posterior sample, same g)."""
    prior.vae.to(dtype)
    prior.dtype = dtype
    prior.loss_scale = LossScale(dtype, prior.device, init_scale=init_scale)
    prior.use_generator(torch.Generator().manual_seed(3))
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    latents = prior.encode(rgb)
    assert latents.dtype == torch.float32
    g = GRAD_SIZE * torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
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
    (scale.leave(scale.enter(x) * 2) * 1e4).sum().backward()  # 1e4 * 2^14 overflows float16
    assert not torch.isfinite(x.grad).all() and float(scale.scale) == 2.0**13
    for _ in range(2):
        x.grad = None
        scale.leave(scale.enter(x) * 2).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    assert float(scale.scale) == 2.0**14
