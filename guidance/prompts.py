"""View-dependent prompting (threestudio's rules) and the prompt settings of text-conditioned priors.

A camera's view is "front" for |azimuth| < 45 degrees, "back" within 45 degrees of
180, "overhead" above 60 degrees of elevation (which wins over the others), and
"side" otherwise; azimuth 0 is the front (the camera on the +x axis, looking at the
object's front). The view prompt is the prompt with ", <view> view" appended.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

# The order of a prior's view embeddings ([4, ...]) everywhere.
VIEWS: tuple[str, ...] = ("front", "side", "back", "overhead")
FRONT, SIDE, BACK, OVERHEAD = range(4)
FRONT_THRESHOLD_DEG = 45.0
BACK_THRESHOLD_DEG = 45.0
OVERHEAD_THRESHOLD_DEG = 60.0


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters and "..." for a message (a prompt may be megabytes long)."""
    return text if len(text) <= limit else text[:limit] + "..."


class PromptConfig(BaseModel):
    """How a text prior embeds the prompt: per-view suffixes, and the negative prompt
    (the "unconditional" branch of classifier-free guidance; "" is the usual unconditional)."""

    model_config = ConfigDict(extra="forbid")

    view_dependent: bool = True
    negative_prompt: str = ""


def view_prompts(prompt: str) -> list[str]:
    """The prompt of each view, in ``VIEWS`` order: "a cat, front view", ..."""
    return [f"{prompt}, {view} view" for view in VIEWS]


def shift_azimuth(azimuth: Tensor) -> Tensor:
    """Degrees -> [-180, 180)."""
    return (azimuth + 180) % 360 - 180


def interpolate_views(views: Tensor, elevation: Tensor, azimuth: Tensor) -> Tensor:
    """[B, ...] per-camera prompt embeddings blended by azimuth (Perp-Neg's positive prompt, and LucidDreamer's
    prompt for ISM): r front + (1 - r) side with r = 1 - |a| / 90 on the front half, r side + (1 - r) back with
    r = 2 - |a| / 90 on the back half; the overhead view's embedding above 60 degrees of elevation.

    views: [4, ...] in ``VIEWS`` order; elevation, azimuth: [B] degrees."""
    elevation, azimuth = elevation.to(views.device), shift_azimuth(azimuth.to(views.device).float())
    shape = (-1,) + (1,) * (views.dim() - 1)
    a = azimuth.abs()
    front_half = (a < 90).view(shape)
    r = torch.where(a < 90, 1 - a / 90, 2 - a / 90).view(shape)
    blend = torch.where(front_half, r * views[FRONT] + (1 - r) * views[SIDE], r * views[SIDE] + (1 - r) * views[BACK])
    overhead = (elevation > OVERHEAD_THRESHOLD_DEG).view(shape)
    return torch.where(overhead, views[OVERHEAD], blend)


def view_index(elevation: Tensor, azimuth: Tensor) -> Tensor:
    """[B] long index into ``VIEWS`` for cameras at elevation/azimuth [B] (degrees)."""
    azimuth = shift_azimuth(azimuth)
    index = azimuth.new_full(azimuth.shape, SIDE, dtype=torch.long)
    index[azimuth.abs() < FRONT_THRESHOLD_DEG] = FRONT
    index[azimuth.abs() > 180 - BACK_THRESHOLD_DEG] = BACK
    index[elevation > OVERHEAD_THRESHOLD_DEG] = OVERHEAD
    return index
