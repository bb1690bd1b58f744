"""Builds the swappable parts of a run from their registry entries and typed config sections."""

from __future__ import annotations

import torch

from dream3d.config import RunConfig
from dream3d.registry import PRIORS, REPRESENTATIONS, RULES, resolve
from dream3d.guidance.base import RuleContext
from dream3d.device import resolve_device
from dream3d.guidance.priors.base import Prior
from dream3d.representations.particles import Particles


def build_prior(cfg: RunConfig) -> Prior:
    """The run's prior (diffusers, slow to import, is imported only by the priors that use it). A diffusers
    prior lives on the run's device unless ``diffusers.device`` names another."""
    if cfg.diffusers.device == "auto":
        cfg = cfg.model_copy(update={"diffusers": cfg.diffusers.model_copy(
            update={"device": str(resolve_device(cfg.device))})})
    return resolve(PRIORS[cfg.prior].builds)(cfg)


def build_guidance(cfg: RunConfig, prior: Prior) -> torch.nn.Module:
    """The rule ``cfg.guidance`` with its config section; raises GuidanceError/PriorError in one line."""
    spec, prior_spec = RULES[cfg.guidance], PRIORS[cfg.prior]
    context = RuleContext(name=spec.name, steps=cfg.steps, seed=cfg.seed,
                          guidance_scale=prior_spec.guidance_scale_for(spec.name),
                          open_vocabulary=prior_spec.open_vocabulary)
    return resolve(spec.builds)(prior, getattr(cfg, spec.name), context)


def build_representation(cfg: RunConfig) -> torch.nn.Module:
    """The run's representation, or ``Particles`` of ``cfg.particles`` of them (particle i seeded seed + i);
    each carries consistent-noise state when the run uses it."""
    if cfg.particles > 1:
        return Particles(cfg.particles, lambda i: _one_representation(cfg, cfg.seed + i))
    return _one_representation(cfg, cfg.seed)


def _one_representation(cfg: RunConfig, seed: int) -> torch.nn.Module:
    # the NeRF's field starts deterministic (NeRF particles start equal); the generator seeds its noise
    spec = REPRESENTATIONS[cfg.representation]
    noise = cfg.noise_field if cfg.consistent_noise else None
    return resolve(spec.builds)(getattr(cfg, spec.name), generator=torch.Generator().manual_seed(seed), noise=noise)


# -- the priors' builders (PriorSpec.builds) ----------------------------------------

def toy_prior(cfg: RunConfig) -> Prior:
    from dream3d.guidance.priors.toy import build_toy_prior

    return build_toy_prior(cfg.prior)


def toy_unet_prior(cfg: RunConfig) -> Prior:
    from dream3d.guidance.priors.toy_unet import ToyUNetMVPrior, ToyUNetPrior

    prior_class = ToyUNetMVPrior if cfg.prior == "toy-unet-mv" else ToyUNetPrior
    return prior_class(cfg.model, cfg.diffusers, cfg.prompts)


def stable_diffusion_prior(cfg: RunConfig) -> Prior:
    from dream3d.guidance.priors.sd import StableDiffusionPrior

    return StableDiffusionPrior(cfg.model, cfg.diffusers, cfg.prompts)


def deepfloyd_prior(cfg: RunConfig) -> Prior:
    from dream3d.guidance.priors.deepfloyd import DeepFloydIFPrior

    return DeepFloydIFPrior(cfg.model, cfg.diffusers, cfg.prompts)


def mvdream_prior(cfg: RunConfig) -> Prior:
    from dream3d.guidance.priors.mvdream import MVDreamPrior

    return MVDreamPrior(cfg.model, cfg.diffusers, cfg.prompts)


def toy_mvdream_prior(cfg: RunConfig) -> Prior:
    from dream3d.guidance.priors.toy_mvdream import ToyMVDreamPrior

    return ToyMVDreamPrior(cfg.model, cfg.diffusers, cfg.prompts)
