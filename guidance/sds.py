"""Score Distillation Sampling (DreamFusion), as in guidance-math.md section 1.

g = w(t) * (eps_hat(x_t) - eps), with eps_hat in the DreamFusion CFG convention
eps_hat = eps_y + omega * (eps_y - eps_u), x_t = alpha_t x + sigma_t eps fresh each call.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from guidance.base import GuidanceOutput, clean_gradient, surrogate_loss
from guidance.priors.base import Prior
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
        self, x: Tensor, t: Tensor, noise: Tensor, embeddings: tuple[Tensor, Tensor], cameras: Cameras | None, step: int
    ) -> Tensor:
        """g [B,C,h,w] for prior inputs x at timesteps t with forward noise ``noise`` (before nan/clip handling)."""
        abar = self.prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x.detach() + (1 - abar).sqrt() * noise
        cond, uncond = embeddings
        with torch.no_grad():
            eps = self.prior.predict_noise(
                torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]),
                None if cameras is None else Cameras.cat([cameras, cameras]),
            )
        eps_y, eps_u = eps.chunk(2)
        omega = evaluate(self.guidance_scale, step)
        eps_hat = eps_y + omega * (eps_y - eps_u)
        return sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1) * (eps_hat - noise)

    def forward(self, rgb: Tensor, prompt: str, cameras: Cameras, step: int, generator: torch.Generator) -> GuidanceOutput:
        """rgb [B,H,W,3] in [0,1] -> the SDS surrogate loss (d loss / d x = g / B)."""
        x = self.prior.encode(rgb.permute(0, 3, 1, 2))
        B = x.shape[0]
        embeddings = self.prior.embed(prompt)
        cond = embeddings.cond.expand(B, *embeddings.cond.shape)
        uncond = embeddings.uncond.expand(B, *embeddings.uncond.shape)
        t = self.sample_timesteps(B, step, generator)
        noise = torch.randn(x.shape, generator=generator)
        grad = self.push_gradient(x, t, noise, (cond, uncond), cameras, step)
        clip = None if self.cfg.grad_clip is None else evaluate(self.cfg.grad_clip, step)
        grad = clean_gradient(grad, clip)
        return GuidanceOutput(
            loss=surrogate_loss(x, grad),
            info={"t": float(t.float().mean()), "grad_norm": float(grad.norm())},
        )
