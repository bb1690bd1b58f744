"""A diffusers model on disk: where a model name points (a folder, or an alias or hub id fetched into the
Hugging Face cache), and the checks on its files (model_index.json, component configs, safetensors only).

Every failure the user can cause is a one-line ``PriorError``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dream3d.guidance.priors import hub
from dream3d.guidance.priors.base import PriorError


def _looks_like_path(model: str) -> bool:
    """Hub ids are "owner/name"; anything else with a separator or a leading . or ~ is meant as a folder."""
    return model.startswith((".", "~", "/")) or model.count("/") != 1


def resolve_model(model: str, components: tuple[str, ...], variant: str | None, note: str = "",
                  revision: str | None = None) -> tuple[Path, hub.HubSource | None]:
    """The local folder of ``model`` (a folder path, or an alias or hub id fetched into the Hugging Face
    cache) and, for the hub, where it came from (``hub.resolve``; None for a folder).

    note: what to add to "download it with ..." (e.g. that the model is gated); revision: the commit a run recorded."""
    path = Path(model).expanduser()
    if path.exists():
        return path, None
    if _looks_like_path(model) and model not in hub.ALIASES:
        raise PriorError(f"model folder {model} does not exist; pass --model with a diffusers folder, a hub id or "
                         f"an alias ({', '.join(hub.ALIASES)})")
    source = hub.resolve(model, components, variant, note, revision)
    return source.folder, source


def read_model_index(folder: Path, model: str) -> dict[str, Any]:
    """model_index.json of a diffusers folder; PriorError if there is none."""
    if not folder.is_dir():
        raise PriorError(f"{model} is not a diffusers model folder (it is a file); pass the folder holding model_index.json")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except FileNotFoundError:
        raise PriorError(f"{model} is not a diffusers model folder (no model_index.json); pass a folder saved "
                         f"with the diffusers pipeline layout, or a hub id") from None
    except (OSError, ValueError):
        raise PriorError(f"{model}/model_index.json is not readable JSON") from None
    if not isinstance(index, dict):
        raise PriorError(f"{model}/model_index.json is not a diffusers model index")
    return index


def read_config(folder: Path, model: str, component: str, name: str = "config.json") -> dict[str, Any]:
    try:
        return json.loads((folder / component / name).read_text())
    except (OSError, ValueError):
        raise PriorError(f"{model} has no readable {component}/{name}; it is not a complete diffusers model") from None


@contextmanager
def without_progress_bars() -> Iterator[None]:
    """Loads without transformers' and diffusers' progress bars: a local folder loads in a moment,
    and stderr belongs to the caller (the CLI's own progress, its one-line errors)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown[0]:
            transformers_logging.enable_progress_bar()
        if shown[1]:
            diffusers_logging.enable_progress_bar()


def check_safetensors(folder: Path, model: str, component: str) -> None:
    if not any((folder / component).glob("*.safetensors")):
        raise PriorError(f"{model}/{component} has no .safetensors weights; dream3d loads only safetensors "
                         f"(convert the model, e.g. re-save it with diffusers' save_pretrained)")
