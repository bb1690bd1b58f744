"""Classifier Score Distillation (docs/guidance-math.md#csd, the CVMI-Lab code as shipped).

g = w(t) * omega * [(eps_y - eps_0) - beta * (eps_neg - eps_0)] with no eps term (the noise
cancels), beta annealed (0 -> 1 over steps 0-5000 in csd-if.yaml), then optionally
g <- g / (||g|| + 1e-8) over the whole batch, so that only the optimiser sets the step size.

eps_0 is the prior's unconditional branch (``prompts.negative_prompt``, "" by default: keep
it empty for CSD); eps_neg is ``csd.negative_prompt``'s conditional prediction. Without a
negative prompt the beta term is skipped (pure CSD, 2 instead of 3 evaluations per view).
omega multiplies the whole bracket (the paper's pure form); the shipped code has omega = 1.

With ``perp_neg_scale`` s_pn > 0 (csd-if.yaml's stage 1: 3) the prompt is the azimuth blend of the
view prompts and the Perp-Neg term w * s_pn * sum_i w_i perp(e_i, e_pos) is added, e_pos = eps_y - eps_0
and e_i = eps_{view_i} - eps_0 the other views' (2 more evaluations per view). On sd/if both that term
and the shipped negative prompt are on by default; the toy priors have neither view prompts nor
those words, so there they are off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dream3d.guidance.base import DistillationRule, GuidanceError, RuleContext, TimestepConfig, Weighting
from dream3d.guidance.diffusion import batch_of, predict_each, sds_weight
from dream3d.guidance.perp_neg import perp_neg_embeddings, perp_neg_term
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.schedule import CheckedSchedule, evaluate
from dream3d.representations.cameras import Cameras


TEXT_NEGATIVE_PROMPT = "oversaturated color, ugly, tiling, low quality, noisy"  # csd-if.yaml
TEXT_PERP_NEG_SCALE = 3.0  # csd-if.yaml, stage 1


class CSDConfig(TimestepConfig):
    """CSD settings; the defaults are csd-if.yaml's stage 1 (uniform weight, normalised gradient,
    t up to 0.98 until step 5000 then 0.5, beta 0 -> 1 over 5000 steps)."""

    guidance_scale: CheckedSchedule = 1.0
    negative_prompt: str | None = None  # None: the prior's default (the shipped one on sd/if); "": none
    negative_weight: CheckedSchedule = [0.0, 1.0, 5000.0]
    perp_neg_scale: CheckedSchedule | None = None  # None: the prior's default (3 on sd/if, off on toy priors)
    weighting: Weighting = "uniform"
    max_step_percent: CheckedSchedule = [5000.0, 0.98, 0.5, 5001.0]
    grad_normalize: bool = True


class CSDGuidance(DistillationRule):
    """CSD on a frozen prior; the negative prompt is embedded here, so a prompt the prior cannot take fails at
    build. Where the config leaves them None, an open-vocabulary prior gets the reference's negative prompt
    and Perp-Neg scale, the others neither."""

    def __init__(self, prior: Prior, cfg: CSDConfig, context: RuleContext = RuleContext()) -> None:
        super().__init__(prior, cfg)
        text = context.open_vocabulary
        negative = (TEXT_NEGATIVE_PROMPT if text else "") if cfg.negative_prompt is None else cfg.negative_prompt
        self.negative = prior.embed(negative).cond if negative else None
        self.perp_neg_scale = (TEXT_PERP_NEG_SCALE if text else 0.0) if cfg.perp_neg_scale is None else cfg.perp_neg_scale

    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, float]]:
        B = x.shape[0]
        # the noise cancels in g, but it still picks the point x_t where the scores are compared
        t, abar, x_t = self.noised(x, step, generator)
        s_pn = evaluate(self.perp_neg_scale, step)
        if s_pn > 0 and embeddings.views is None:
            raise GuidanceError(f"csd.perp_neg_scale needs a prior with view-dependent prompts; {self.prior.name} "
                                f"has none (set csd.perp_neg_scale=0)")
        if s_pn > 0:
            pos, view_negatives, view_weights = perp_neg_embeddings(embeddings.views, embeddings.uncond,
                                                                    cameras.elevation, cameras.azimuth)
            prompts = [pos, batch_of(embeddings.uncond, B), view_negatives[:, 0], view_negatives[:, 1]]
        else:
            prompts = [embeddings.conditional(cameras), batch_of(embeddings.uncond, B)]
        if self.negative is not None:
            prompts.append(batch_of(self.negative, B))
        with torch.no_grad():
            eps = predict_each(self.prior, x_t, t, prompts, cameras)
        classifier = eps[0] - eps[1]
        beta = evaluate(self.cfg.negative_weight, step)
        if self.negative is not None:
            classifier = classifier - beta * (eps[-1] - eps[1])
        w = sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1)
        grad = w * evaluate(self.cfg.guidance_scale, step) * classifier
        if s_pn > 0:
            views = torch.stack([eps[2], eps[3]], 1) - eps[1].unsqueeze(1)
            grad = grad + w * s_pn * perp_neg_term(eps[0] - eps[1], views, view_weights)
        return grad, {"t": float(t.float().mean()), "beta": beta}

    def finish(self, grad: Tensor) -> Tensor:
        """One global norm over the whole batch tensor, as ``grad_normalize`` in the reference."""
        return grad / (grad.norm() + 1e-8) if self.cfg.grad_normalize else grad
