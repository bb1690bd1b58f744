"""Builds the swappable parts of a run from their names and typed config sections."""

from __future__ import annotations

import torch

from dream3d.config import RunConfig
from dream3d.device import resolve_device
from guidance.csd import CSDGuidance
from guidance.ism import ISMGuidance
from guidance.priors.base import Prior
from guidance.sds import SDSGuidance
from representations.gaussians import Gaussians
from representations.nerf import NeRF
from representations.particles import Particles

# The DreamFusion-convention CFG scale each prior is used with by default (guidance-math.md: 100 for SD,
# 20 for IF; the toy priors need far less: toy-unet-mv measured IoU 0.918 / 0.903 / 0.888 at 3 / 7.5 / 15).
DEFAULT_GUIDANCE_SCALE = {"toy": 3.0, "toy-mv": 3.0, "toy-unet": 3.0, "toy-unet-mv": 3.0, "sd": 100.0, "if": 20.0}
# CFD's own (guidance-math.md section 10: 70 for SD); the other priors keep the SDS scale
CFD_GUIDANCE_SCALE = {**DEFAULT_GUIDANCE_SCALE, "sd": 70.0}


def build_prior(cfg: RunConfig) -> Prior:
    """The run's prior; diffusers (slow to import) is imported only for the diffusers priors.

    A diffusers prior lives on the run's device unless ``diffusers.device`` names another."""
    diffusers = cfg.diffusers
    if diffusers.device == "auto":
        diffusers = diffusers.model_copy(update={"device": str(resolve_device(cfg.device))})
    if cfg.prior == "sd":
        from guidance.priors.sd import StableDiffusionPrior

        return StableDiffusionPrior(cfg.model, diffusers, cfg.prompts)
    if cfg.prior == "if":
        from guidance.priors.deepfloyd import DeepFloydIFPrior

        return DeepFloydIFPrior(cfg.model, diffusers, cfg.prompts)
    if cfg.prior in ("toy-unet", "toy-unet-mv"):
        from guidance.priors.toy_unet import ToyUNetMVPrior, ToyUNetPrior

        prior_class = ToyUNetMVPrior if cfg.prior == "toy-unet-mv" else ToyUNetPrior
        return prior_class(cfg.model, diffusers, cfg.prompts)
    from guidance.priors.toy import build_toy_prior

    return build_toy_prior(cfg.prior)


def build_guidance(cfg: RunConfig, prior: Prior) -> torch.nn.Module:
    """The rule ``cfg.guidance`` with its config section; raises GuidanceError/PriorError in one line."""
    if cfg.guidance == "csd":
        return CSDGuidance(prior, cfg.csd)
    if cfg.guidance == "ism":
        return ISMGuidance(prior, cfg.ism)
    if cfg.guidance in ("vsd", "esd"):
        from guidance.vsd import VSDGuidance

        return VSDGuidance(prior, getattr(cfg, cfg.guidance), cfg.guidance, cfg.seed)
    if cfg.guidance == "cfd":
        return SDSGuidance(prior, cfg.cfd, cfg.steps, CFD_GUIDANCE_SCALE[cfg.prior])
    return SDSGuidance(prior, cfg.sds, cfg.steps, DEFAULT_GUIDANCE_SCALE[cfg.prior])


def build_representation(cfg: RunConfig) -> torch.nn.Module:
    """The run's representation, or ``Particles`` of ``cfg.particles`` of them (particle i seeded seed + i);
    each carries consistent-noise state when the run uses it."""
    if cfg.particles > 1:
        return Particles(cfg.particles, lambda i: _one_representation(cfg, cfg.seed + i))
    return _one_representation(cfg, cfg.seed)


def _one_representation(cfg: RunConfig, seed: int) -> torch.nn.Module:
    noise = cfg.noise_field if cfg.consistent_noise else None
    generator = torch.Generator().manual_seed(seed)
    if cfg.representation == "gaussians":
        return Gaussians(cfg.gaussians, generator=generator, noise=noise)
    # the NeRF's field starts deterministic (NeRF particles start equal); the generator seeds its noise
    return NeRF(cfg.nerf, noise=noise, generator=generator)
