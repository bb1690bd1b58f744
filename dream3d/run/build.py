"""Builds the swappable parts of a run from their registry entries and typed config sections."""

from __future__ import annotations

import torch

from dream3d.config import RunConfig
from dream3d.config.presets import toy_refusal
from dream3d.registry import PRIORS, REPRESENTATIONS, RULES, resolve
from dream3d.guidance.base import DistillationRule, RuleContext
from dream3d.run.device import resolve_device
from dream3d.guidance.priors.base import Prior, PriorError, PriorSettings
from dream3d.guidance.priors.hub import ModelUnavailable
from dream3d.guidance.prompts import clip
from dream3d.representations.base import Representation
from dream3d.representations.particles import Particles


def build_prior(cfg: RunConfig) -> Prior:
    """The run's prior, ``PriorClass.from_config`` with the run's values (diffusers, slow to import, is imported
    only by the priors that use it). A diffusers prior lives on the run's device unless ``diffusers.device`` names
    another. A model that is neither cached nor downloadable now fails in one line that also says what runs offline
    (the toy world)."""
    device = resolve_device(cfg.device if cfg.diffusers.device == "auto" else cfg.diffusers.device)
    settings = PriorSettings(name=cfg.prior, model=cfg.model_resolved or cfg.model, revision=cfg.model_revision,
                             device=device, diffusers=cfg.diffusers, prompts=cfg.prompts)
    try:
        return resolve(PRIORS[cfg.prior].builds).from_config(settings)
    except ModelUnavailable as e:
        raise PriorError(offline_hint(cfg.prompt, cfg.prior, str(e))) from None


def offline_hint(prompt: str, prior: str, unavailable: str) -> str:
    """The one line of a prior whose weights cannot be had now: why, how to download them, and what runs instead
    (the toy world, with the reason its grammar does not take this prompt and its vocabulary)."""
    refusal = toy_refusal(prompt)
    if refusal is None:
        return f"{unavailable}; this prompt also runs now on a toy prior (--prior auto)"
    return (f"prompt {clip(prompt)!r} needs a real prior (--prior {prior}): {unavailable}; the toy world runs "
            f"offline now, but {refusal}")


def model_source(prior: Prior) -> dict[str, str]:
    """The hub id and commit a prior's model resolved to (config fields model_resolved, model_revision); {} for a
    folder, a random model or a toy prior."""
    source = getattr(prior, "source", None)
    return {"model_resolved": source.repo, "model_revision": source.revision} if source and source.revision else {}


def build_guidance(cfg: RunConfig, prior: Prior) -> DistillationRule:
    """The rule ``cfg.guidance`` with its config section; raises GuidanceError/PriorError in one line."""
    spec, prior_spec = RULES[cfg.guidance], PRIORS[cfg.prior]
    context = RuleContext(name=spec.name, steps=cfg.steps, seed=cfg.seed,
                          guidance_scale=prior_spec.guidance_scale_for(spec.name),
                          open_vocabulary=prior_spec.open_vocabulary)
    return resolve(spec.builds)(prior, getattr(cfg, spec.name), context)


def build_representation(cfg: RunConfig) -> Representation:
    """The run's representation, or ``Particles`` of ``cfg.particles`` of them (particle i seeded seed + i);
    each carries consistent-noise state when the run uses it."""
    if cfg.particles > 1:
        return Particles(cfg.particles, lambda i: _one_representation(cfg, cfg.seed + i))
    return _one_representation(cfg, cfg.seed)


def _one_representation(cfg: RunConfig, seed: int) -> Representation:
    # the NeRF's field starts deterministic (NeRF particles start equal); the generator seeds its noise
    spec = REPRESENTATIONS[cfg.representation]
    noise = cfg.noise_field if cfg.consistent_noise else None
    return resolve(spec.builds)(getattr(cfg, spec.name), generator=torch.Generator().manual_seed(seed), noise=noise)
