"""What every guidance rule returns, the one surrogate-loss convention they share, and their common pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from dream3d.guidance.diffusion import add_noise, alpha_bar, forward_noise, sample_timesteps
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.schedule import CheckedSchedule, evaluate
from dream3d.representations.cameras import Cameras

# Consistent forward noise, asked for once the prior's input x [B,C,h,w] exists: x.shape -> eps [B,C,h,w]
NoiseSource = Callable[[torch.Size], Tensor]


@dataclass
class GuidanceOutput:
    """loss: a scalar whose gradient w.r.t. the prior's input x is g / B (g the rule's push-gradient);
    info: scalars to log (t, grad norm, auxiliary losses), floats or one-element tensors: the loop moves the
    tensors to the host together, once per step, so a rule never waits for the device to log."""

    loss: Tensor
    info: dict[str, float | Tensor] = field(default_factory=dict)


class GuidanceError(ValueError):
    """A rule cannot run with this prior or configuration; the message is one line for the user."""


Weighting = Literal["sds", "uniform", "fantasia3d", "sigma_over_alpha"]


class TimestepConfig(BaseModel):
    """What every rule that draws t ~ U[min%, max%] per item and weights its gradient by w(t) is set by
    (SDS, CFD, CSD, VSD/ESD, NFSD): one set of names, types and allowed values; a rule's config derives
    from it and changes only the defaults. ISM draws one interval for the whole batch from its own
    warm-up schedule instead (``ISMConfig``)."""

    model_config = ConfigDict(extra="forbid")

    weighting: Weighting = "sds"
    min_step_percent: CheckedSchedule = 0.02
    max_step_percent: CheckedSchedule = 0.98
    grad_clip: CheckedSchedule | None = None


@dataclass(frozen=True)
class RuleContext:
    """What a rule may need of the run beyond its own config section (every rule is built as
    ``Rule(prior, section, context)``).

    name: the rule's registered name (vsd and esd share a class); steps: the run's length;
    seed: seeds the rule's own modules; guidance_scale: the prior's default CFG scale for this rule
    (DreamFusion convention), used where the section leaves it None; open_vocabulary: the prior takes
    any text, so the references' negative prompts and Perp-Neg are the defaults."""

    name: str = ""
    steps: int = 1
    seed: int = 0
    guidance_scale: float = 100.0
    open_vocabulary: bool = False


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 * ||x - sg(x - g)||^2 / B, so that d loss / d x = g / B (threestudio's convention, for every rule)."""
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum() / x.shape[0]


def clean_gradient(grad: Tensor, clip: float | None) -> Tensor:
    """nan_to_num, then an optional symmetric clamp, as every reference implementation does."""
    grad = torch.nan_to_num(grad)
    return grad if clip is None else grad.clamp(-clip, clip)


class DistillationRule(torch.nn.Module):
    """The shared pipeline (docs/guidance-math.md#the-shared-pipeline): encode, the rule's push-gradient g,
    nan_to_num and clip, an optional rescaling (``finish``), and the surrogate loss (d loss / d x = g / B).

    Subclasses implement ``gradient``; their config has a ``grad_clip`` schedule (or None). Rules that
    can take the forward noise from outside (3D-consistent noise) set ``takes_noise`` and accept a
    ``noise`` keyword [B,C,h,w] in ``gradient``. Registered as ``RuleSpec(name, "module:Config", "module:Class",
    ...)``, a rule is built as ``Class(prior, section, context)``.

    Args:
        prior: the frozen diffusion model it distils (``Prior``).
        cfg: its config section (``NAME:`` in config.yaml), a ``TimestepConfig`` for most rules.
        context: a ``RuleContext`` (rules that need the run's length, seed or the prior's CFG scale take it).

    Examples:
        >>> rule = SDSGuidance(prior, SDSConfig(), RuleContext(steps=steps, guidance_scale=100.0))
        >>> for step in range(steps):
        ...     output = representation.render(cameras, background, generator)
        ...     out = rule(output.rgb, prompt, cameras, step, generator)  # forward: encode, gradient, surrogate
        ...     out.loss.backward()  # d loss / d x = g / B reaches the representation through the render
        ...     optimizer.step()
        ...     log(out.info)  # t, grad_norm and the rule's own scalars
    """

    takes_noise = False

    def __init__(self, prior: Prior, cfg: BaseModel) -> None:
        super().__init__()
        self.prior = prior
        self.cfg = cfg

    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, float | Tensor]]:
        """g [B,C,h,w] for prior inputs x [B,C,h,w] (before nan/clip handling), and the scalars to log."""
        raise NotImplementedError

    def noised(self, x: Tensor, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """t [B] ~ U[min%, max%] per item (a ``TimestepConfig`` rule; one per group of views for a prior that
        denoises groups), abar_t [B,1,1,1] and x_t [B,C,h,w] from fresh noise, drawn in that order from ``generator``."""
        t = sample_timesteps(self.cfg.min_step_percent, self.cfg.max_step_percent, self.prior.num_train_timesteps,
                             x.shape[0], step, generator, views=getattr(self.prior, "num_views", 1))
        abar = alpha_bar(self.prior, t, x.device)
        return t, abar, add_noise(x, forward_noise(x, generator), abar)

    def finish(self, grad: Tensor) -> Tensor:
        """The cleaned g, rescaled as the rule needs (CSD's normalisation); identity by default."""
        return grad

    def forward(self, rgb: Tensor, prompt: str, cameras: Cameras, step: int, generator: torch.Generator,
                noise: NoiseSource | None = None) -> GuidanceOutput:
        """rgb [B,H,W,3] in [0,1] -> the surrogate loss (d loss / d x = g / B) and the logged floats.

        ``noise``, when given, supplies the forward noise for the encoded x (instead of fresh draws)."""
        x = self.prior.encode(rgb.permute(0, 3, 1, 2))
        supplied = {}
        if noise is not None:
            if not self.takes_noise:
                raise GuidanceError(f"{type(self).__name__} draws its own noise and cannot take consistent noise")
            supplied["noise"] = noise(x.shape).to(x)
        grad, info = self.gradient(x, self.prior.embed(prompt), cameras, step, generator, **supplied)
        clip = None if self.cfg.grad_clip is None else evaluate(self.cfg.grad_clip, step)
        grad = self.finish(clean_gradient(grad, clip))
        return GuidanceOutput(loss=surrogate_loss(x, grad), info={**info, "grad_norm": grad.norm()})
