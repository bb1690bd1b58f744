"""Presets: every place the config names a component, in one module (nerfstudio's ``method_configs`` is the model).

A run's config is the merge, later winning, of:

1. the schema's defaults (``schema.py``; the default rule and representation are ``DEFAULT_RULE`` and
   ``DEFAULT_REPRESENTATION`` here);
2. the prior's preset (``prior_preset``): MVDream-threestudio's settings for a multi-view prior;
3. the config layers the caller gives, in order: a YAML file, then flags and ``key=value`` overrides.

``--prior auto`` (the default) is resolved first, from the merged layers, by ``AUTO_PRIORS`` (``auto_prior``),
so ``config.yaml`` names the prior it ran. ``apply_presets`` does both; ``RunSettings`` calls it before it
validates anything, and ``build_config`` is where the layers are merged.
"""

from __future__ import annotations

from typing import Any, Callable

from dream3d import registry
from dream3d.config.io import merge

# --prior auto (the default) picks a prior from the prompt and the rule when the config is built
AUTO = "auto"
DEFAULT_RULE = "sds"
DEFAULT_REPRESENTATION = "nerf"

# the toy world's priors (closed-form and trained): a recipe's ``toy`` block applies over the recipe with these
TOY_PRIOR_PREFIX = "toy"
# a recipe's block of CPU sizes for them (``recipes.py``)
TOY_BLOCK = "toy"

# --prior auto: (the prompt is in the toy world's grammar, the config asks for groups of views) ->
# (the prior without a UNet asked for, the prior when the rule trains on a UNet or a --model is given)
AUTO_PRIORS: dict[tuple[bool, bool], tuple[str, str]] = {
    (True, False): ("toy-mv", "toy-unet-mv"),
    (True, True): ("toy-mvdream", "toy-mvdream"),
    (False, False): ("sd", "sd"),
    (False, True): ("mvdream", "mvdream"),
}


def multiview_recipe(views: int, steps: int) -> dict[str, Any]:
    """MVDream-threestudio's distillation settings scaled to a run of ``steps``: groups of ``views`` cameras,
    x0-reconstruction SDS with CFG rescale 0.5 and t annealed from 0.98 to U[0.02, 0.5] over the first 80%."""
    anneal = max(int(0.8 * steps), 1)
    return {"camera": {"group_views": views, "batch_size": views, "elevation_range": [0.0, 30.0]},
            "sds": {"recon_loss": True, "recon_std_rescale": 0.5, "min_step_percent": [0, 0.98, 0.02, anneal],
                    "max_step_percent": [0, 0.98, 0.5, anneal]}}


# a prior's preset beyond the multi-view recipe, for a run of ``steps``: mvdream renders 64 then 256 pixels
# from half-way (the toy keeps its own sizes)
PRIOR_PRESETS: dict[str, Callable[[int], dict[str, Any]]] = {
    "mvdream": lambda steps: {"resolution": [64, 256], "resolution_milestones": [steps // 2]},
}


def prior_preset(prior: str, steps: int) -> dict[str, Any]:
    """The layer a prior adds under the user's config: the multi-view recipe for a multi-view prior (cameras in
    groups of its views), then its own entry in PRIOR_PRESETS; {} for the others."""
    views = registry.PRIORS[prior].views
    if views == 1:
        return {}
    return {**multiview_recipe(views, steps), **PRIOR_PRESETS.get(prior, lambda _: {})(steps)}


def is_toy_prior(prior: str) -> bool:
    """Whether ``prior`` is one of the toy world's (CPU-sized: a recipe's ``toy`` block applies)."""
    return prior in registry.PRIORS and prior.startswith(TOY_PRIOR_PREFIX)


def toy_refusal(prompt: str) -> str | None:
    """Why the toy world's grammar (a colour and/or a shape, a few other words) does not take ``prompt``, in one
    line with the vocabulary; None when it does."""
    from dream3d.guidance.priors.base import PriorError
    from dream3d.guidance.priors.toy_world import parse_prompt

    try:
        parse_prompt(prompt)
    except PriorError as e:
        return str(e)
    return None


def auto_prior(data: dict[str, Any]) -> str:
    """The prior ``--prior auto`` picks for a config layer (``AUTO_PRIORS``): a toy-world prompt gets a toy prior
    (one with a UNet where the rule trains on a UNet or a --model is given), any other prompt Stable Diffusion;
    both in their multi-view form where the config asks for groups of views (camera.group_views > 1, as a
    multi-view recipe sets). A model alias (``--model if-i-xl``) picks the prior it is for."""
    from dream3d.guidance.priors.hub import ALIASES

    if data.get("model") in ALIASES:
        return ALIASES[data["model"]].prior
    camera = data.get("camera")
    views = camera.get("group_views") if isinstance(camera, dict) else None
    multiview = isinstance(views, int) and views > 1
    prompt = data.get("prompt")
    toy = isinstance(prompt, str) and toy_refusal(prompt) is None
    guidance = data.get("guidance", DEFAULT_RULE)
    wants_unet = toy and (guidance in registry.RULES and registry.RULES[guidance].needs_unet
                          or data.get("model") is not None)
    return AUTO_PRIORS[toy, multiview][wants_unet]


def apply_presets(data: dict[str, Any], default_steps: int) -> dict[str, Any]:
    """``data`` (the merged config layers) with ``prior: auto`` resolved and the prior's preset merged under it,
    sized for ``data``'s steps (``default_steps``, the schema's, when it sets none)."""
    if data.get("prior", AUTO) == AUTO:
        data = {**data, "prior": auto_prior(data)}
    if data.get("prior") in registry.PRIORS:
        steps = data.get("steps", default_steps)
        return merge(prior_preset(data["prior"], steps if isinstance(steps, int) else 1), data)
    return data
