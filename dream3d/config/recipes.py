"""Recipes: our peers' pipelines as config layers, shipped as ``dream3d/recipes/NAME.yaml``.

    description: one line
    anchor: the peer config files it follows
    prior: sd            # everything else is a config layer: run-level settings and ``stages``
    stages:
      - {name: coarse, representation: nerf, steps: 10000}
      - {name: geometry, representation: dmtet, steps: 5000}
    toy:                 # over the recipe when the run's prior is a toy one; its ``stages`` merge by index
      stages: [{steps: 400}, {steps: 200}]

A config names one with ``recipe: NAME`` (``--recipe NAME``, a batch job's ``recipe``, the web form's dropdown) or a
YAML file's path. ``build_config`` lays it under the config's own layers (defaults < prior preset < recipe < YAML <
flags/overrides); a config that names its prior (``--prior toy-mv``) takes it in every stage: the recipe's prior and
model settings are dropped, stages' included. config.yaml records the resolved config, so a resume needs no recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from dream3d.config.io import ConfigError, load_yaml, merge
from dream3d.config.presets import (
    AUTO, DEFAULT_REPRESENTATION, DEFAULT_RULE, TOY_BLOCK, auto_prior, is_toy_prior,
)

RECIPE_FOLDER = Path(str(files("dream3d"))) / "recipes"
# the keys of a recipe file that are not config
ABOUT = ("description", "anchor")
MODEL_KEYS = ("prior", "model", "model_resolved", "model_revision")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    anchor: str
    layer: dict[str, Any] = field(default_factory=dict)  # the config layer
    toy_block: dict[str, Any] = field(default_factory=dict)  # laid over ``layer`` for a toy prior


def recipe_names() -> tuple[str, ...]:
    """The shipped recipes, sorted."""
    return tuple(sorted(p.stem for p in RECIPE_FOLDER.glob("*.yaml") if p.is_file()))


def recipe_path(name: str) -> Path:
    """A shipped recipe's file, or a YAML file's path as given; an unknown name is one line listing the valid ones."""
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise ConfigError(f"recipe file {name} does not exist")
        return Path(name)
    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(recipe_names()) or '(none shipped)'}")
    return RECIPE_FOLDER / f"{name}.yaml"


def load_recipe(name: str) -> Recipe:
    """A recipe by name (or YAML path); ConfigError in one line when it is unknown or malformed."""
    path = recipe_path(name)
    data = load_yaml(path)
    about = {key: data.pop(key, "") for key in ABOUT}
    toy_block = data.pop(TOY_BLOCK, {})
    if not isinstance(toy_block, dict) or not all(isinstance(v, str) for v in about.values()):
        raise ConfigError(f"recipe {path}: {TOY_BLOCK} must be a mapping of config keys, and {' and '.join(ABOUT)} text")
    for layer in (data, toy_block):
        stages = layer.get("stages", [])
        if not (isinstance(stages, list) and all(isinstance(s, dict) for s in stages)):
            raise ConfigError(f"recipe {path}: stages must be a list of mappings")
    return Recipe(Path(name).stem, str(about["description"]), str(about["anchor"]), data, toy_block)


def recipe_layer(recipe: Recipe, config: dict[str, Any]) -> dict[str, Any]:
    """The layer ``recipe`` puts under ``config`` (the run's merged layers): its toy block over it when the chosen
    prior is a toy one, and none of its prior and model settings when ``config`` names its own."""
    layer = recipe.layer
    own_prior = config.get("prior", AUTO) != AUTO or config.get("model") is not None
    if own_prior:
        layer = _without_models(layer)
    prior = config.get("prior", AUTO) if own_prior else layer.get("prior", AUTO)
    if prior == AUTO:
        prior = auto_prior(merge(layer, config))
    if isinstance(prior, str) and is_toy_prior(prior):
        layer = merge(layer, _without_models(recipe.toy_block) if own_prior else recipe.toy_block)
    return layer


def expand_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """Merged config layers with their ``recipe`` (if any) laid under them, the ``recipe`` key removed."""
    if "recipe" not in data:
        return data
    config = {k: v for k, v in data.items() if k != "recipe"}
    name = data["recipe"]
    if name is None:
        return config
    if not isinstance(name, str):
        raise ConfigError(f"recipe: a recipe name or YAML file, got {str(name)[:40]!r}")
    return merge(recipe_layer(load_recipe(name), config), config)


def _without_models(layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` without prior and model settings, its stages' included."""
    out = {k: v for k, v in layer.items() if k not in MODEL_KEYS}
    if isinstance(out.get("stages"), list):
        out["stages"] = [{k: v for k, v in stage.items() if k not in MODEL_KEYS} for stage in out["stages"]]
    return out


def stage_lines(recipe: Recipe, default_steps: int) -> list[str]:
    """``name: representation/rule/steps`` per stage of a recipe as written (the run's settings where a stage
    names none; the schema's defaults where neither does)."""
    run = {"representation": DEFAULT_REPRESENTATION, "guidance": DEFAULT_RULE, "steps": default_steps, **recipe.layer}
    stages = recipe.layer.get("stages") or [{"name": recipe.name}]
    return [f"{s.get('name', '?')}: {s.get('representation', run['representation'])}/{s.get('guidance', run['guidance'])}/"
            f"{s.get('steps', run['steps'])}" for s in stages]
