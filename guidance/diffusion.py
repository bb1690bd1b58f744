"""The diffusion arithmetic every rule shares (docs/guidance-math.md#conventions).

Timestep ranges and sampling, forward noising, the weights w(t), batched prior calls,
and the two classifier-free-guidance conventions, which stay two named functions so
that no rule mixes them up: omega_DF = omega_DIFF - 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dream3d.guidance.priors.base import Prior
from dream3d.guidance.schedule import Schedule, evaluate
from dream3d.representations.cameras import Cameras, to_device


def timestep_range(min_percent: float, max_percent: float, num_train_timesteps: int) -> tuple[int, int]:
    """threestudio's integer bounds: min_step = int(T * min%), max_step = int(T * max%)."""
    return int(num_train_timesteps * min_percent), int(num_train_timesteps * max_percent)


def grouped_randint(lo: int, high: int, batch: int, views: int, generator: torch.Generator) -> Tensor:
    """t [B] long on the generator's device, uniform in [lo, high), one draw per group of ``views`` consecutive
    items (a multi-view prior denoises a group at one t); ``views`` = 1 draws as ``torch.randint`` does."""
    t = torch.randint(lo, high, (batch // views,), generator=generator, device=generator.device)
    return t.repeat_interleave(views)


def sample_timesteps(min_percent: Schedule, max_percent: Schedule, num_train_timesteps: int, batch: int, step: int,
                     generator: torch.Generator, sqrt_anneal_progress: float | None = None, views: int = 1) -> Tensor:
    """t [B] long on the generator's device: uniform in [min_step, max_step] per item, or with
    ``sqrt_anneal_progress`` p in [0, 1] HiFA's deterministic t = max - (max - min) sqrt(p) for the whole batch.
    ``views`` > 1: one t per group of that many consecutive items (a prior that denoises a group at one t)."""
    lo, hi = timestep_range(evaluate(min_percent, step), evaluate(max_percent, step), num_train_timesteps)
    if sqrt_anneal_progress is not None:
        return torch.full((batch,), int(hi - (hi - lo) * math.sqrt(sqrt_anneal_progress)), dtype=torch.long,
                          device=generator.device)
    return grouped_randint(lo, hi + 1, batch, views, generator)


def alpha_bar(prior: Prior, t: Tensor, device: torch.device) -> Tensor:
    """abar_t [B,1,1,1] on ``device`` for integer timesteps t [B] (drawn on the host): t goes to the table, which a
    diffusers prior keeps on its device, in a non-blocking copy."""
    table = prior.alphas_cumprod
    return to_device(table[to_device(t, table.device)], device).view(-1, 1, 1, 1)


def add_noise(x: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """x_t = alpha_t x + sigma_t eps for x, noise [B,C,h,w] and abar [B,1,1,1] (x is detached)."""
    return abar.sqrt() * x.detach() + (1 - abar).sqrt() * noise


def sds_weight(alphas_cumprod_t: Tensor, weighting: str) -> Tensor:
    """w(t) for a batch of cumulative alphas [B]: sigma^2 ("sds"), 1 ("uniform"), alpha * sigma^2 ("fantasia3d"),
    or sigma / alpha ("sigma_over_alpha", CFD's and ISM's)."""
    if weighting == "sds":
        return 1 - alphas_cumprod_t
    if weighting == "sigma_over_alpha":
        return ((1 - alphas_cumprod_t) / alphas_cumprod_t).sqrt()
    if weighting == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    if weighting == "fantasia3d":
        return alphas_cumprod_t.sqrt() * (1 - alphas_cumprod_t)
    raise ValueError(f"unknown weighting {weighting!r}; valid: sds, uniform, fantasia3d, sigma_over_alpha")


def cfg_df(eps_cond: Tensor, eps_uncond: Tensor, omega: float) -> Tensor:
    """DreamFusion's convention: eps_y + omega (eps_y - eps_u)."""
    return eps_cond + omega * (eps_cond - eps_uncond)


def cfg_diff(eps_cond: Tensor, eps_uncond: Tensor, omega: float) -> Tensor:
    """The diffusers convention: eps_u + omega (eps_y - eps_u)."""
    return eps_uncond + omega * (eps_cond - eps_uncond)


def batch_of(embedding: Tensor, batch: int) -> Tensor:
    """One embedding [...] repeated for a batch: [B, ...] (a view, no copy)."""
    return embedding.expand(batch, *embedding.shape)


def predict_each(prior: Prior, x_t: Tensor, t: Tensor, embeddings: list[Tensor], cameras: Cameras | None
                 ) -> list[Tensor]:
    """The prior's epsilon [B,C,h,w] for x_t [B,C,h,w] under each of K embeddings [B, ...], in one batch of K*B."""
    k = len(embeddings)
    eps = prior.predict_noise(
        torch.cat([x_t] * k), torch.cat([t] * k), torch.cat(embeddings),
        None if cameras is None else Cameras.cat([cameras] * k),
    )
    return list(eps.chunk(k))


def forward_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    """Fresh eps ~ N(0, I) shaped like x, drawn on the CPU generator (checkpointed with the run) and moved to x's device."""
    return to_device(torch.randn(x.shape, generator=generator, device=generator.device), x.device)


def to_epsilon(output: Tensor, x_t: Tensor, alphas_cumprod_t: Tensor, prediction_type: str) -> Tensor:
    """The UNet's output [B,C,h,w] as epsilon, for x_t [B,C,h,w] and abar_t [B,1,1,1].

    v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps give eps = alpha v + sigma x_t.
    """
    if prediction_type == "v_prediction":
        return alphas_cumprod_t.sqrt() * output + (1 - alphas_cumprod_t).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - alphas_cumprod_t.sqrt() * output) / (1 - alphas_cumprod_t).sqrt()
    return output
