"""Noise-Free Score Distillation (Katzir et al., arXiv 2310.17590; docs/guidance-math.md#nfsd).

SDS's gradient w(t) (eps_hat - eps) subtracts the very noise that was added, and that residual is
what forces SDS to huge CFG scales. NFSD drops eps and splits the score instead:

    delta_C = eps_y - eps_0                                  (the condition's direction)
    delta_D = eps_0                     if t < small_t       (at small t, eps_0 is the denoising direction)
            = eps_0 - eps_neg           otherwise            (the direction away from the negative prompt)
    g       = w(t) (delta_D + s delta_C)

eps_0 is the prior's unconditional branch and eps_neg the negative prompt's prediction; without a
negative prompt eps_neg is eps_0, so delta_D vanishes above ``small_t``. No official code exists;
this follows the paper (3 prior evaluations per view, 2 without a negative prompt).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from dream3d.guidance.base import DistillationRule, RuleContext, TimestepConfig
from dream3d.guidance.diffusion import batch_of, predict_each, sds_weight
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.schedule import CheckedSchedule, evaluate
from dream3d.representations.cameras import Cameras, to_device


TEXT_NEGATIVE_PROMPT = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                        "low-resolution, gloomy")  # the paper's


class NFSDConfig(TimestepConfig):
    """NFSD settings (the paper's: s = 7.5, t < 200 counts as small)."""

    guidance_scale: CheckedSchedule = 7.5
    negative_prompt: str | None = None  # None: the prior's default (the paper's on sd/if); "": none
    small_t: int = Field(200, ge=0)


class NFSDGuidance(DistillationRule):
    """NFSD on a frozen prior; where ``cfg.negative_prompt`` is None an open-vocabulary prior gets the
    paper's negative prompt, the others none."""

    def __init__(self, prior: Prior, cfg: NFSDConfig, context: RuleContext = RuleContext()) -> None:
        super().__init__(prior, cfg)
        default = TEXT_NEGATIVE_PROMPT if context.open_vocabulary else ""
        negative = default if cfg.negative_prompt is None else cfg.negative_prompt
        self.negative = prior.embed(negative).cond if negative else None

    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, float]]:
        B = x.shape[0]
        t, abar, x_t = self.noised(x, step, generator)
        prompts = [embeddings.conditional(cameras), batch_of(embeddings.uncond, B)]
        if self.negative is not None:
            prompts.append(batch_of(self.negative, B))
        with torch.no_grad():
            eps = predict_each(self.prior, x_t, t, prompts, cameras)
        eps_y, eps_0, eps_neg = eps[0], eps[1], eps[-1]
        small = to_device(t < self.cfg.small_t, x.device).view(-1, 1, 1, 1)
        delta_d = torch.where(small, eps_0, eps_0 - eps_neg)
        delta_c = eps_y - eps_0
        w = sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1)
        return w * (delta_d + evaluate(self.cfg.guidance_scale, step) * delta_c), {"t": float(t.float().mean())}
