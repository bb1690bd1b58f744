"""The state of 3D-consistent noise (docs/guidance-math.md#consistent-noise-and-cfd) that a representation carries.

A representation with consistent noise holds fixed N(0,1) values attached to 3D space
(per Gaussian, or a voxel grid for the NeRF) and a fixed 2D background map, as buffers, so
they are checkpointed with its ``state_dict``. Each step they are refreshed by CFD's renewal
n <- sqrt(1 - gamma) n + sqrt(gamma) xi, which keeps every value exactly N(0,1).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dream3d.representations.cameras import to_device


class NoiseFieldConfig(BaseModel):
    """channels: noise channels held (4 covers SD latents, 3 pixels; a prior input with C channels
    uses the first C); grid_resolution: voxels per side of the NeRF's noise grid over its bound
    (64: a voxel is about the surface footprint of one pixel of a 64^2 prior input at the toy
    cameras; the refresh costs R^3 C draws per step); background_resolution: side of the fixed
    background map (prior inputs up to this size)."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(4, gt=0)
    grid_resolution: int = Field(64, gt=1)
    background_resolution: int = Field(128, gt=0)


def refreshed(noise: Tensor, gamma: float, generator: torch.Generator) -> Tensor:
    """sqrt(1 - gamma) noise + sqrt(gamma) xi with xi ~ N(0,1) from ``generator`` (drawn on its device), any shape."""
    if gamma <= 0:
        return noise
    fresh = to_device(torch.randn(noise.shape, generator=generator, device=generator.device), noise.device).to(noise)
    return (1 - gamma) ** 0.5 * noise + gamma**0.5 * fresh


def check_shape(channels: int, size: int, shape: tuple[int, int, int]) -> None:
    """Raises ValueError when a prior input of ``shape`` (C,h,w) needs more than the state holds."""
    C, h, w = shape
    if C > channels or max(h, w) > size:
        raise ValueError(f"consistent noise holds {channels} channels and a {size}^2 background; the prior's input "
                         f"is {C}x{h}x{w} (raise noise_field.channels / noise_field.background_resolution)")


def background(noise_map: Tensor, batch: int, shape: tuple[int, int, int]) -> Tensor:
    """The fixed background noise [B,C,h,w]: the top-left crop of noise_map [C',S,S] (every view the same).

    A crop, not a resize, so each pixel stays an independent N(0,1) value."""
    C, h, w = shape
    return noise_map[:C, :h, :w].expand(batch, C, h, w)


def first_occurrences(source: Tensor) -> Tensor:
    """[N] bool: True where ``source[i]`` appears at no earlier index (an original, not a copy)."""
    order = torch.argsort(source, stable=True)
    ranked = source[order]
    repeated = torch.zeros_like(source, dtype=torch.bool)
    repeated[order[1:]] = ranked[1:] == ranked[:-1]
    return ~repeated


__all__ = ["NoiseFieldConfig", "background", "check_shape", "first_occurrences", "refreshed"]
