"""Lambertian shading under one directional light, for representations that learn albedo.

    radiance = albedo * (ambient + diffuse * max(0, n . l))

A representation that renders its colour field as is learns radiance: the light the prior's images
show is baked into the colours, and an exported texture, which a viewer lights again, shows it twice
(the toy world's sides come out at 0.45 of their albedo). Rendering the colour field through this
model during training makes the field the albedo. The defaults are the toy world's light (straight
above; ambient 0.45, diffuse 0.55: ``guidance/priors/toy_world.py``), so a shaded render of the true
albedo and shape is exactly the toy prior's image.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

Shading = Literal["none", "lambert"]


class LightConfig(BaseModel):
    """One directional light: ``direction`` points from the surface towards the light (world frame, +z up)."""

    model_config = ConfigDict(extra="forbid")

    direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    ambient: float = Field(0.45, ge=0)
    diffuse: float = Field(0.55, ge=0)

    @field_validator("direction")
    @classmethod
    def _nonzero(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if sum(c * c for c in v) < 1e-12:
            raise ValueError("the light's direction is the zero vector")
        return v


def lambert(albedo: Tensor, normals: Tensor, light: LightConfig) -> Tensor:
    """Shaded colour [..., 3] of ``albedo`` [..., 3] at unit outward ``normals`` [..., 3] under ``light``;
    differentiable in both (the normals carry the geometry's gradient)."""
    direction = torch.tensor(light.direction, dtype=normals.dtype, device=normals.device)
    facing = (normals * (direction / direction.norm())).sum(-1, keepdim=True).clamp_min(0)
    return albedo * (light.ambient + light.diffuse * facing)


__all__ = ["LightConfig", "Shading", "lambert"]
