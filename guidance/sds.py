"""Score Distillation Sampling (DreamFusion), as in guidance-math.md section 1.

g = w(t) * (eps_hat(x_t) - eps), with eps_hat in the DreamFusion CFG convention
eps_hat = eps_y + omega * (eps_y - eps_u), x_t = alpha_t x + sigma_t eps fresh each call.
With ``perp_neg`` eps_hat is Perp-Neg's (guidance-math.md section 2; diffusers CFG
convention with the same omega, as threestudio does).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from guidance.base import GuidanceError, GuidanceOutput, clean_gradient, surrogate_loss
from guidance.perp_neg import perp_neg_combine, perp_neg_embeddings
from guidance.priors.base import Embeddings, Prior
from guidance.schedule import CheckedSchedule, evaluate
from representations.cameras import Cameras


class SDSConfig(BaseModel):
    """SDS settings. ``guidance_scale`` None means the prior's recommended scale (100 for SD, 20 for IF)."""

    model_config = ConfigDict(extra="forbid")

    guidance_scale: CheckedSchedule | None = None
    weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
    min_step_percent: CheckedSchedule = 0.02
    max_step_percent: CheckedSchedule = 0.98
    sqrt_anneal: bool = False
    grad_clip: CheckedSchedule | None = None
    perp_neg: bool = False


def sds_weight(alphas_cumprod_t: Tensor, weighting: str) -> Tensor:
    """w(t) for a batch of cumulative alphas [B]: sigma^2, 1, or alpha * sigma^2."""
    if weighting == "sds":
        return 1 - alphas_cumprod_t
    if weighting == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    return alphas_cumprod_t.sqrt() * (1 - alphas_cumprod_t)


def timestep_range(min_percent: float, max_percent: float, num_train_timesteps: int) -> tuple[int, int]:
    """threestudio's integer bounds: min_step = int(T * min%), max_step = int(T * max%)."""
    return int(num_train_timesteps * min_percent), int(num_train_timesteps * max_percent)


class SDSGuidance(torch.nn.Module):
    """SDS on a frozen prior. ``max_steps`` is the run length, needed only by ``sqrt_anneal``."""

    def __init__(self, prior: Prior, cfg: SDSConfig, max_steps: int, default_guidance_scale: float) -> None:
        super().__init__()
        self.prior = prior
        self.cfg = cfg
        self.max_steps = max_steps
        self.guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else default_guidance_scale

    def sample_timesteps(self, batch: int, step: int, generator: torch.Generator) -> Tensor:
        """t [B]: uniform in [min_step, max_step] per item, or HiFA's deterministic sqrt annealing."""
        lo, hi = timestep_range(
            evaluate(self.cfg.min_step_percent, step), evaluate(self.cfg.max_step_percent, step),
            self.prior.num_train_timesteps,
        )
        if self.cfg.sqrt_anneal:
            t = hi - (hi - lo) * math.sqrt(min(step / self.max_steps, 1.0))
            return torch.full((batch,), int(t), dtype=torch.long)
        return torch.randint(lo, hi + 1, (batch,), generator=generator)

    def push_gradient(
        self, x: Tensor, t: Tensor, noise: Tensor, embeddings: Embeddings, cameras: Cameras, step: int
    ) -> Tensor:
        """g [B,C,h,w] for prior inputs x at timesteps t [B] with forward noise ``noise`` (before nan/clip handling)."""
        abar = self.prior.alphas_cumprod[t].to(x.device).view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x.detach() + (1 - abar).sqrt() * noise
        omega = evaluate(self.guidance_scale, step)
        with torch.no_grad():
            if self.cfg.perp_neg:
                eps_hat = self.perp_neg_noise(x_t, t, embeddings, cameras, omega)
            else:
                cond, uncond = predict_each(self.prior, x_t, t, [
                    embeddings.conditional(cameras), embeddings.uncond.expand(len(x), *embeddings.uncond.shape)
                ], cameras)
                eps_hat = cond + omega * (cond - uncond)
        return sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1) * (eps_hat - noise)

    def perp_neg_noise(self, x_t: Tensor, t: Tensor, embeddings: Embeddings, cameras: Cameras, omega: float) -> Tensor:
        """Perp-Neg's eps_hat [B,C,h,w] (4 UNet evaluations per item)."""
        if embeddings.views is None:
            raise GuidanceError(f"sds.perp_neg needs a prior with view-dependent prompts; {self.prior.name} has none")
        pos, negatives, weights = perp_neg_embeddings(
            embeddings.views, embeddings.uncond, cameras.elevation, cameras.azimuth
        )
        uncond = embeddings.uncond.expand(len(x_t), *embeddings.uncond.shape)
        eps_pos, eps_u, eps_n0, eps_n1 = predict_each(
            self.prior, x_t, t, [pos, uncond, negatives[:, 0], negatives[:, 1]], cameras
        )
        return perp_neg_combine(eps_pos, eps_u, torch.stack([eps_n0, eps_n1], 1), weights, omega)

    def forward(self, rgb: Tensor, prompt: str, cameras: Cameras, step: int, generator: torch.Generator) -> GuidanceOutput:
        """rgb [B,H,W,3] in [0,1] -> the SDS surrogate loss (d loss / d x = g / B)."""
        x = self.prior.encode(rgb.permute(0, 3, 1, 2))
        B = x.shape[0]
        t = self.sample_timesteps(B, step, generator)
        # drawn on the CPU generator (checkpointed with the run), then moved to the prior's device
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        grad = self.push_gradient(x, t, noise, self.prior.embed(prompt), cameras, step)
        clip = None if self.cfg.grad_clip is None else evaluate(self.cfg.grad_clip, step)
        grad = clean_gradient(grad, clip)
        return GuidanceOutput(
            loss=surrogate_loss(x, grad),
            info={"t": float(t.float().mean()), "grad_norm": float(grad.norm())},
        )


def predict_each(prior: Prior, x_t: Tensor, t: Tensor, embeddings: list[Tensor], cameras: Cameras | None
                 ) -> list[Tensor]:
    """The prior's epsilon [B,C,h,w] for x_t [B,C,h,w] under each of K embeddings [B, ...], in one batch of K*B."""
    k = len(embeddings)
    eps = prior.predict_noise(
        torch.cat([x_t] * k), torch.cat([t] * k), torch.cat(embeddings),
        None if cameras is None else Cameras.cat([cameras] * k),
    )
    return list(eps.chunk(k))
