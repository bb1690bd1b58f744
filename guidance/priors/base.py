"""What every prior is: a frozen diffusion model seen as an epsilon predictor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from dream3d.guidance.prompts import PromptConfig, interpolate_views, view_index
from dream3d.representations.cameras import Cameras

if TYPE_CHECKING:
    from dream3d.guidance.priors.diffusers_prior import DiffusersConfig


class PriorError(ValueError):
    """A prior cannot be built or cannot take this prompt; the message is one line for the user."""


@dataclass
class Embeddings:
    """A prompt as the prior sees it.

    cond: the prompt's embedding; uncond: the negative/unconditional one (for CFG);
    views: [4, ...] the view prompts' embeddings in ``guidance.prompts.VIEWS`` order,
    or None for a prior without view-dependent prompting.
    Their type is the prior's own business (text-encoder states for diffusers
    priors, a class mask for the toy prior); rules only pass them back.
    """

    prompt: str
    cond: Tensor
    uncond: Tensor
    views: Tensor | None = None

    def conditional(self, cameras: Cameras) -> Tensor:
        """[B, ...] the conditional embedding of each camera: its view's prompt, or cond for every camera."""
        if self.views is None:
            return self.cond.expand(len(cameras), *self.cond.shape)
        return self.views[view_index(cameras.elevation, cameras.azimuth).to(self.views.device)]

    def interpolated(self, cameras: Cameras) -> Tensor:
        """[B, ...] the view prompts blended by each camera's azimuth (``interpolate_views``), or cond."""
        if self.views is None:
            return self.cond.expand(len(cameras), *self.cond.shape)
        return interpolate_views(self.views, cameras.elevation, cameras.azimuth)


@dataclass(frozen=True)
class PriorSettings:
    """What a prior is built from (``Prior.from_config``): the run's values a prior may read, as plain values, so
    the library never sees the app's ``RunConfig``.

    name: the registered name (two names may share a class, as toy and toy-mv); model: a folder, hub id or alias
    (None: the prior's default); revision: the commit of a hub id a run recorded; device: where it runs, resolved
    by the caller; diffusers: how a diffusers model is loaded (``DiffusersConfig``); prompts: the negative and view
    prompts."""

    name: str
    model: str | None = None
    revision: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    diffusers: DiffusersConfig | None = None
    prompts: PromptConfig = field(default_factory=PromptConfig)


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """The "scaled_linear" DDPM schedule of Stable Diffusion and DeepFloyd IF: [T] cumulative alphas."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


class Prior(Protocol):
    """A frozen noise predictor. The priors derive from it (``ToyPrior``, ``DiffusersPrior``), so they
    inherit its hooks' defaults; a stand-in that only predicts noise (a test's) may match it structurally.
    Registered as ``PriorSpec(name, "module:Class", ...)``, a prior is built as ``Class.from_config(settings)``.

    ``x`` is what the diffusion model sees: VAE latents or pixels scaled to [-1, 1],
    [B, C, r, r] with r = ``resolution`` (for pixel priors; latents are smaller).

    Args:
        settings: a ``PriorSettings`` (to ``from_config``): its name, model, revision, device, the diffusers and
            prompts sections.

    Examples:
        >>> prior = ToyPrior.from_config(PriorSettings(name="toy-mv"))
        >>> prior.use_generator(generator)
        >>> emb = prior.embed("a red cube")  # once per prompt; PriorError on a prompt it cannot take
        >>> for step in range(steps):
        ...     x = prior.encode(rgb)  # [B,3,H,W] in [0,1] -> x, differentiable
        ...     x_t = add_noise(x, eps, alpha_bar(prior, t, x.device))
        ...     cond = emb.conditional(cameras)  # [B, ...] each camera's prompt
        ...     uncond = emb.uncond.expand_as(cond)
        ...     eps_hat = prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        >>> preview = prior.decode(x)
    """

    name: str
    resolution: int
    alphas_cumprod: Tensor  # [num_train_timesteps]
    num_train_timesteps: int
    unet: torch.nn.Module | None  # what VSD/ESD attach a LoRA to; None for closed-form priors

    @classmethod
    def from_config(cls, settings: PriorSettings) -> Prior:
        """The prior a run configures (the registry's ``PriorSpec.builds`` names the class); raises PriorError in
        one line, or ``hub.ModelUnavailable`` when a model is neither cached nor downloadable now."""
        raise NotImplementedError

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> x [B,C,h,w], differentiable; resizes to the prior's resolution."""
        ...

    def decode(self, x: Tensor) -> Tensor:
        """x -> rgb [B,3,r,r] in [0,1]."""
        ...

    def use_generator(self, generator: torch.Generator) -> None:
        """Draws the prior's own randomness (a VAE posterior sample) from ``generator``, the run's
        checkpointed one; the loop calls it for every prior, and a prior that draws nothing keeps this no-op."""

    def embed(self, prompt: str) -> Embeddings:
        """Embeds (and caches) a prompt; raises PriorError with a one-line message on a prompt it cannot take."""
        ...

    def predict_noise(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None = None) -> Tensor:
        """Epsilon prediction [B,C,h,w] for noisy x_t [B,C,h,w] at integer timesteps t [B].

        ``embeddings`` is a batch of per-item embeddings [B, ...] (cond/uncond rows
        stacked by the caller for classifier-free guidance); ``cameras`` (length B)
        conditions camera-aware priors and is ignored by the others.
        """
        ...
