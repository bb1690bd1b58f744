"""The page's form as config: its choices and defaults come from dream3d.config, and its
values become a RunConfig through the same ``build_config`` the CLI uses.

The guidance-scale field is found in the chosen rule's config section by name, so a rule
whose scale has that name gets the field without a change here; particles are a run setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from dream3d.config import ConfigError, RunConfig, build_config, parse_overrides, safe_yaml
from dream3d.config.recipes import recipe_names

GUIDANCE_SCALE_NAMES = ("guidance_scale",)
NO_RECIPE = "(none)"


def recipe_choices() -> list[str]:
    """The recipe dropdown's entries: none, then every shipped recipe."""
    return [NO_RECIPE, *recipe_names()]


@dataclass
class FormValues:
    """One submission of the form; None or "" means the config's default (the page sends None for an empty box)."""

    prompt: str | None
    prior: str
    guidance: str
    representation: str
    steps: int | None = None
    seed: int | None = None
    resolution: str | None = None  # YAML: 64 or [32, 64]
    guidance_scale: float | None = None
    lr_scale: float | None = None
    particles: int | None = None
    overrides: str | None = None  # key=value lines, as on the command line
    recipe: str | None = None  # a pipeline of stages (NO_RECIPE or None: none); it decides guidance and representation


def guidance_setting(guidance: str, names: tuple[str, ...]) -> str | None:
    """Dotted config path of the first of ``names`` in guidance's section, e.g. "sds.guidance_scale"."""
    section = RunConfig.model_fields.get(guidance)
    fields = getattr(section.annotation, "model_fields", {}) if section else {}
    return next((f"{guidance}.{name}" for name in names if name in fields), None)


def defaults(base: dict[str, Any]) -> RunConfig:
    """The config the page starts from: RunConfig's defaults under the ``base`` layer."""
    return build_config({"prompt": "a red cube"}, base)


def resolution_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.resolution, default_flow_style=True).strip().removesuffix("...").strip()


def config_from_form(
    values: FormValues, base: dict[str, Any], out: str, max_prompt_chars: int, max_steps: int | None = None
) -> RunConfig:
    """Validates a submission into a RunConfig writing under ``out`` (at most ``max_steps`` steps, the
    server's cap per visitor); raises ConfigError in one line."""
    prompt = (values.prompt or "").strip()
    if len(prompt) > max_prompt_chars:
        raise ConfigError(f"the prompt is {len(prompt)} characters long; the limit is {max_prompt_chars}")
    layer: dict[str, Any] = {"prompt": prompt, "prior": values.prior}
    if values.recipe and values.recipe != NO_RECIPE:
        # the recipe's stages name their rules and representations; the page's dropdowns would override its run-level
        # ones, so they stay out (an override line still sets them)
        layer["recipe"] = values.recipe
    else:
        layer.update(guidance=values.guidance, representation=values.representation)
    for key in ("steps", "seed"):
        if getattr(values, key) is not None:
            layer[key] = _integer(key, getattr(values, key))
    if (values.resolution or "").strip():
        try:
            layer["resolution"] = safe_yaml(values.resolution, "resolution")
        except yaml.YAMLError:
            raise ConfigError(f"resolution {values.resolution!r} is neither a number nor a list of numbers") from None
    if values.lr_scale is not None:
        layer = _set(layer, "optim.lr_scale", values.lr_scale)
    if values.guidance_scale is not None:
        layer = _set(layer, _guidance_path(values.guidance, GUIDANCE_SCALE_NAMES, "guidance scale"), values.guidance_scale)
    if values.particles is not None:
        layer["particles"] = _integer("particles", values.particles)
    overrides = parse_overrides([line.strip() for line in (values.overrides or "").splitlines() if line.strip()])
    # the run folder is the app's: downloads are served from it and from nowhere else
    cfg = build_config(base, layer, overrides, {"out": out})
    if max_steps is not None and cfg.total_steps > max_steps:
        refine = cfg.total_steps - cfg.training_steps
        stages = str(cfg.training_steps) + (f" + refine.steps {refine}" if refine else "")
        raise ConfigError(f"steps: this server runs at most {max_steps} steps per run, every stage counted (one worker "
                          f"serves every visitor), got {stages}")
    return cfg


def _integer(name: str, value: Any) -> int:
    """A whole number from the page's number box (it may send 3.0, nan, inf, or through the API anything)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"{name}: must be a whole number, got {str(value)[:40]}")
    return int(number)


def _guidance_path(guidance: str, names: tuple[str, ...], what: str) -> str:
    path = guidance_setting(guidance, names)
    if path is None:
        raise ConfigError(f"guidance {guidance!r} takes no {what}")
    return path


def _set(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``value`` at the dotted path."""
    head, _, rest = dotted.partition(".")
    return {**tree, head: _set(tree.get(head, {}), rest, value) if rest else value}
