"""Score Distillation Sampling (DreamFusion), as in docs/guidance-math.md#sds.

g = w(t) * (eps_hat(x_t) - eps), with eps_hat in the DreamFusion CFG convention
eps_hat = eps_y + omega * (eps_y - eps_u), x_t = alpha_t x + sigma_t eps fresh each call.
With ``perp_neg`` eps_hat is Perp-Neg's (docs/guidance-math.md#perp-neg; diffusers CFG
convention with the same omega, as threestudio does).

The forward noise eps may come from outside (``noise`` in ``forward``: 3D-consistent noise).
``CFDConfig`` makes this rule Consistent Flow Distillation (docs/guidance-math.md#consistent-noise-and-cfd):
w = sigma_t / alpha_t, a deterministic descending t, and (the loop's part) consistent noise.
"""

from __future__ import annotations

import torch
from pydantic import model_validator
from torch import Tensor

from dream3d.guidance.base import DistillationRule, RuleContext, TimestepConfig, Weighting
from dream3d.guidance.diffusion import (
    add_noise, alpha_bar, batch_of, cfg_df, forward_noise, predict_each, sample_timesteps, sds_weight,
)
from dream3d.guidance.perp_neg import perp_neg_noise
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.schedule import CheckedSchedule, evaluate
from dream3d.representations.cameras import Cameras



class SDSConfig(TimestepConfig):
    """SDS settings. ``guidance_scale`` None means the prior's recommended scale (100 for SD, 20 for IF).

    ``descending_t``: a deterministic t for the whole batch (CFD), t = round(T (min% + (max% - min%)(1 - p)))
    with p a schedule over the run's progress (step / steps in [0, 1]), e.g. ``[[0, 0], [1, 0.8]]``."""

    guidance_scale: CheckedSchedule | None = None
    sqrt_anneal: bool = False
    descending_t: CheckedSchedule | None = None
    perp_neg: bool = False
    # MVDream's x0-reconstruction form (docs/mvdream.md): g = x - x0_hat, x0_hat the CFG estimate of x0, with
    # recon_std_rescale pulling its spread toward the conditional estimate's; without the rescale this is SDS with
    # w = sigma_t / alpha_t. A prior that denoises groups of views (``num_views`` > 1) gets one t per group.
    recon_loss: bool = False
    recon_std_rescale: CheckedSchedule = 0.0

    @model_validator(mode="after")
    def _one_t_rule(self) -> "SDSConfig":
        if self.sqrt_anneal and self.descending_t is not None:
            raise ValueError("sqrt_anneal and descending_t both set t; choose one")
        if self.recon_loss and self.perp_neg:
            raise ValueError("recon_loss rescales toward the plain conditional estimate, which perp_neg does not make; "
                             "choose one")
        return self


class CFDConfig(SDSConfig):
    """Consistent Flow Distillation as SDS settings (docs/guidance-math.md#consistent-noise-and-cfd):
    w = sigma_t / alpha_t and t% = 0.02 + 0.96 (1 - p), p piecewise linear through CFD's SD stage-1 milestones
    p = 0, 0.3, 0.6, 0.8 at steps 0, 2.5k, 12.5k, 25k, rescaled to the run: the same fractions 0, 0.1, 0.5, 1
    of ``steps``.
    The CFG stays DreamFusion's convention (omega 70 for SD in the reference)."""

    weighting: Weighting = "sigma_over_alpha"
    descending_t: CheckedSchedule | None = [[0.0, 0.0], [0.1, 0.3], [0.5, 0.6], [1.0, 0.8]]


class SDSGuidance(DistillationRule):
    """SDS on a frozen prior. The run length (``context.steps``) drives ``sqrt_anneal`` and ``descending_t``."""

    takes_noise = True

    def __init__(self, prior: Prior, cfg: SDSConfig, context: RuleContext = RuleContext()) -> None:
        super().__init__(prior, cfg)
        self.max_steps = context.steps
        self.guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else context.guidance_scale

    def sample_timesteps(self, batch: int, step: int, generator: torch.Generator) -> Tensor:
        """t [B] on the generator's device: uniform in [min_step, max_step] per item, HiFA's deterministic sqrt annealing, or ``descending_t``."""
        if self.cfg.descending_t is not None:
            p = evaluate(self.cfg.descending_t, min(step / self.max_steps, 1.0))
            lo, hi = (evaluate(v, step) for v in (self.cfg.min_step_percent, self.cfg.max_step_percent))
            T = self.prior.num_train_timesteps
            return torch.full((batch,), min(round(T * (lo + (hi - lo) * (1 - p))), T - 1), dtype=torch.long,
                              device=generator.device)
        progress = min(step / self.max_steps, 1.0) if self.cfg.sqrt_anneal else None
        return sample_timesteps(self.cfg.min_step_percent, self.cfg.max_step_percent, self.prior.num_train_timesteps,
                                batch, step, generator, progress, views=getattr(self.prior, "num_views", 1))

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
        if self.cfg.recon_loss:
            return x.detach() - self.reconstruction(x_t, abar, eps_hat, cond, evaluate(self.cfg.recon_std_rescale, step))
        return sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1) * (eps_hat - noise)

    def reconstruction(self, x_t: Tensor, abar: Tensor, eps_hat: Tensor, eps_cond: Tensor, rescale: float) -> Tensor:
        """x0_hat [B,C,h,w] from the guided epsilon, blended as (1 - r) x0_hat + r f x0_hat where f is, per group
        of views, std(x0 from eps_cond) / std(x0_hat) (MVDream's CFG rescale; r = 0 leaves x0_hat)."""
        x0 = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        if rescale == 0:
            return x0
        x0_cond = (x_t - (1 - abar).sqrt() * eps_cond) / abar.sqrt()
        groups = x0.shape[0] // getattr(self.prior, "num_views", 1)
        factor = (x0_cond.reshape(groups, -1).std(dim=1) + 1e-8) / (x0.reshape(groups, -1).std(dim=1) + 1e-8)
        factor = factor.repeat_interleave(x0.shape[0] // groups).view(-1, 1, 1, 1)
        return rescale * factor * x0 + (1 - rescale) * x0

    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator,
                 noise: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """g for x [B,C,h,w]; ``noise`` [B,C,h,w] is the forward noise (fresh draws when None)."""
        t = self.sample_timesteps(x.shape[0], step, generator)
        noise = forward_noise(x, generator) if noise is None else noise
        return self.push_gradient(x, t, noise, embeddings, cameras, step), {"t": float(t.float().mean())}
