"""Score Distillation Sampling (DreamFusion), as in guidance-math.md section 1.

g = w(t) * (eps_hat(x_t) - eps), with eps_hat in the DreamFusion CFG convention
eps_hat = eps_y + omega * (eps_y - eps_u), x_t = alpha_t x + sigma_t eps fresh each call.
With ``perp_neg`` eps_hat is Perp-Neg's (guidance-math.md section 2; diffusers CFG
convention with the same omega, as threestudio does).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from guidance.base import DistillationRule
from guidance.diffusion import (
    add_noise, alpha_bar, batch_of, cfg_df, forward_noise, predict_each, sample_timesteps, sds_weight, timestep_range,
)
from guidance.perp_neg import perp_neg_noise
from guidance.priors.base import Embeddings, Prior
from guidance.schedule import CheckedSchedule, evaluate
from representations.cameras import Cameras

# sds_weight and timestep_range now live in guidance.diffusion (shared by every rule); re-exported here
__all__ = ["SDSConfig", "SDSGuidance", "sds_weight", "timestep_range"]


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


class SDSGuidance(DistillationRule):
    """SDS on a frozen prior. ``max_steps`` is the run length, needed only by ``sqrt_anneal``."""

    def __init__(self, prior: Prior, cfg: SDSConfig, max_steps: int, default_guidance_scale: float) -> None:
        super().__init__(prior, cfg)
        self.max_steps = max_steps
        self.guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else default_guidance_scale

    def sample_timesteps(self, batch: int, step: int, generator: torch.Generator) -> Tensor:
        """t [B]: uniform in [min_step, max_step] per item, or HiFA's deterministic sqrt annealing."""
        progress = min(step / self.max_steps, 1.0) if self.cfg.sqrt_anneal else None
        return sample_timesteps(self.cfg.min_step_percent, self.cfg.max_step_percent, self.prior.num_train_timesteps,
                                batch, step, generator, progress)

    def push_gradient(
        self, x: Tensor, t: Tensor, noise: Tensor, embeddings: Embeddings, cameras: Cameras, step: int
    ) -> Tensor:
        """g [B,C,h,w] for prior inputs x at timesteps t [B] with forward noise ``noise`` (before nan/clip handling)."""
        abar = alpha_bar(self.prior, t, x.device)
        x_t = add_noise(x, noise, abar)
        omega = evaluate(self.guidance_scale, step)
        with torch.no_grad():
            if self.cfg.perp_neg:
                eps_hat = perp_neg_noise(self.prior, x_t, t, embeddings, cameras, omega, "sds")
            else:
                cond, uncond = predict_each(self.prior, x_t, t, [
                    embeddings.conditional(cameras), batch_of(embeddings.uncond, len(x))
                ], cameras)
                eps_hat = cfg_df(cond, uncond, omega)
        return sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1) * (eps_hat - noise)

    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, float]]:
        t = self.sample_timesteps(x.shape[0], step, generator)
        noise = forward_noise(x, generator)
        return self.push_gradient(x, t, noise, embeddings, cameras, step), {"t": float(t.float().mean())}
