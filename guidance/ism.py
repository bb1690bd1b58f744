"""Interval Score Matching (LucidDreamer; docs/guidance-math.md#ism).

x_s comes from x by deterministic DDIM inversion (eta = 0) with the unconditional branch,
x_t from x_s by one more inversion step, and the target is the prediction at x_s:

    g = lambda_g * (sigma_t / alpha_t) * (eps_hat(x_t) - eps_0(x_s, s)),
    eps_hat = eps_neg + omega (eps_y - eps_neg)   (diffusers CFG convention, omega = 7.5).

The interval delta_T and the t range anneal linearly over ``warmup_steps``. Works with any
epsilon-predicting prior (no UNet needed). Deviations from the reference: timesteps are the
training indices themselves (the reference's DDIM timesteps add the scheduler's steps_offset,
1 for SD); the gradient follows dream3d's one surrogate convention d loss / d x = g / B where
LucidDreamer applies g itself (fold B into lambda_g to match); eps_0 is the prior's unconditional
branch (``prompts.negative_prompt``, "" by default), and ``ism.negative_prompt`` replaces it in
the CFG only (by default LucidDreamer's negative prompt on sd/if, none on the toy priors, whose
vocabulary has no such words). As LucidDreamer, the prompt y is blended between the view prompts by
azimuth (``view_interpolation``) rather than picked by the nearest view. Supplied noise (3D-consistent noise) replaces eps as is, without the channel offset,
so that it stays N(0,1) per pixel.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dream3d.guidance.base import DistillationRule, RuleContext
from dream3d.guidance.diffusion import add_noise, batch_of, cfg_diff, forward_noise, predict_each
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.schedule import CheckedSchedule, evaluate
from dream3d.representations.cameras import Cameras, to_device


# LucidDreamer's configs
TEXT_NEGATIVE_PROMPT = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                        "low-resolution, oversaturation.")


class ISMConfig(BaseModel):
    """ISM settings (LucidDreamer's defaults): t ~ U[T min%, T max%) with the upper bound shrinking
    from ``warmup_max_step_percent`` over ``warmup_steps``; delta_T from ``delta_t_start`` to ``delta_t``;
    x_s by at most ``inversion_steps`` DDIM inversion steps of ``inversion_stride``."""

    model_config = ConfigDict(extra="forbid")

    guidance_scale: CheckedSchedule = 7.5
    lambda_guidance: CheckedSchedule = 0.1
    negative_prompt: str | None = None  # None: the prior's default (LucidDreamer's for sd/if); "": none
    view_interpolation: bool = True
    min_step_percent: float = Field(0.02, ge=0, lt=1)
    max_step_percent: float = Field(0.5, gt=0, le=1)
    warmup_max_step_percent: float = Field(0.98, gt=0, le=1)
    warmup_steps: int = Field(1500, ge=0)
    delta_t: int = Field(80, ge=0)
    delta_t_start: int = Field(100, ge=0)
    inversion_stride: int = Field(200, gt=0)
    inversion_steps: int = Field(5, gt=0)
    noise_offset: float = 0.1
    grad_clip: CheckedSchedule | None = None


def ddim_invert_step(x: Tensor, eps: Tensor, abar_from: Tensor, abar_to: Tensor) -> Tensor:
    """x_{tau'} = alpha_{tau'} (x_tau - sigma_tau eps) / alpha_tau + sigma_{tau'} eps (deterministic DDIM, eta = 0)."""
    x0 = (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps


class ISMGuidance(DistillationRule):
    """ISM on a frozen epsilon-predicting prior; no state across steps. Where ``cfg.negative_prompt`` is None
    an open-vocabulary prior gets LucidDreamer's negative prompt, the others none."""

    takes_noise = True

    def __init__(self, prior: Prior, cfg: ISMConfig, context: RuleContext = RuleContext()) -> None:
        super().__init__(prior, cfg)
        default = TEXT_NEGATIVE_PROMPT if context.open_vocabulary else ""
        negative = default if cfg.negative_prompt is None else cfg.negative_prompt
        self.negative = prior.embed(negative).cond if negative else None

    def interval(self, step: int, generator: torch.Generator) -> tuple[int, int]:
        """(t, s): t ~ U[lo, hi + (hi_start - hi) r) and s = max(t - delta_T, 0), r = 1 - min(step / warmup, 1)."""
        T = self.prior.num_train_timesteps
        r = 1 - min(step / self.cfg.warmup_steps, 1.0) if self.cfg.warmup_steps else 0.0
        lo, hi, hi_start = (int(T * p) for p in (self.cfg.min_step_percent, self.cfg.max_step_percent,
                                                 self.cfg.warmup_max_step_percent))
        t = int(torch.randint(lo, max(hi + int((hi_start - hi) * r), lo + 1), (1,), generator=generator,
                              device=generator.device))
        delta = int(self.cfg.delta_t + r * (self.cfg.delta_t_start - self.cfg.delta_t))
        return t, max(t - delta, 0)

    def noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """eps [B,C,h,w] = randn + offset * randn(1,C,1,1): a per-channel offset shared by the batch."""
        offset = to_device(torch.randn(1, x.shape[1], 1, 1, generator=generator, device=generator.device), x.device)
        return forward_noise(x, generator) + self.cfg.noise_offset * offset

    def unconditional(self, x: Tensor, t: int, embeddings: Embeddings, cameras: Cameras) -> Tensor:
        """eps_0(x, t) [B,C,h,w]: the prior's unconditional prediction at one timestep for the batch."""
        B = x.shape[0]
        return self.prior.predict_noise(x, torch.full((B,), t, dtype=torch.long, device=x.device), batch_of(embeddings.uncond, B), cameras)

    def invert(self, x: Tensor, noise: Tensor, s: int, embeddings: Embeddings, cameras: Cameras) -> Tensor:
        """x_s [B,C,h,w]: noised to max(s - stride * steps, 0), then DDIM-inverted in strides, the last one landing on s."""
        stride = self.cfg.inversion_stride
        current = max(s - stride * self.cfg.inversion_steps, 0)
        x = add_noise(x, noise, self.abar(current, x))
        for _ in range(self.cfg.inversion_steps):
            following = min(current + stride, s)
            x = ddim_invert_step(x, self.unconditional(x, current, embeddings, cameras), self.abar(current, x),
                                 self.abar(following, x))
            current = following
            if current == s:
                break
        return x

    def abar(self, t: int, like: Tensor) -> Tensor:
        """abar_t [1,1,1,1] on like's device, indexed by the int (an index tensor made on the device would be
        copied back to the table's host, a wait for the device)."""
        return self.prior.alphas_cumprod[t].to(like.device).view(1, 1, 1, 1)

    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator,
                 noise: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """g for x [B,C,h,w]; ``noise`` [B,C,h,w] replaces the drawn eps when given."""
        t, s = self.interval(step, generator)
        noise = self.noise(x, generator) if noise is None else noise
        B = x.shape[0]
        with torch.no_grad():
            x_s = self.invert(x, noise, s, embeddings, cameras)
            target = self.unconditional(x_s, s, embeddings, cameras)
            x_t = ddim_invert_step(x_s, target, self.abar(s, x), self.abar(t, x))
            negative = embeddings.uncond if self.negative is None else self.negative
            prompt = embeddings.interpolated(cameras) if self.cfg.view_interpolation else embeddings.conditional(cameras)
            cond, uncond = predict_each(self.prior, x_t, torch.full((B,), t, dtype=torch.long, device=x.device),
                                        [prompt, batch_of(negative, B)], cameras)
        eps_hat = cfg_diff(cond, uncond, evaluate(self.cfg.guidance_scale, step))
        abar_t = self.abar(t, x)
        scale = evaluate(self.cfg.lambda_guidance, step) * ((1 - abar_t) / abar_t).sqrt()
        return scale * (eps_hat - target), {"t": float(t), "s": float(s)}
