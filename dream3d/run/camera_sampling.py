"""Camera sampling for training (random views) and for videos and evaluation (orbits)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dream3d.representations.cameras import Cameras, look_at_cameras, to_device, view_group_azimuths


class CameraConfig(BaseModel):
    """Random training cameras; the defaults are the toy world's (docs/architecture.md#the-toy-world)."""

    model_config = ConfigDict(extra="forbid")

    elevation_range: tuple[float, float] = (-10.0, 45.0)
    azimuth_range: tuple[float, float] = (0.0, 360.0)
    distance_range: tuple[float, float] = (2.5, 2.5)
    fovy_range: tuple[float, float] = (45.0, 45.0)
    batch_size: int = 1
    # > 1: the batch is groups of this many views of one object (a multi-view prior's input), evenly
    # spaced in azimuth from a random start and sharing elevation, distance and fovy
    group_views: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _whole_groups(self) -> "CameraConfig":
        if self.batch_size % self.group_views:
            raise ValueError(f"camera.batch_size {self.batch_size} is not a multiple of camera.group_views "
                             f"{self.group_views}")
        return self


def sample_cameras(cfg: CameraConfig, resolution: int, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> Cameras:
    """B random cameras looking at the origin, on ``device``.

    Elevation is uniform on the sphere band (not in degrees), so high views are not
    over-sampled; azimuth is stratified over the batch, as in threestudio. The draws come
    from ``generator`` on its own device (the run's checkpointed CPU generator), so a run
    draws the same cameras on any device.
    """
    if cfg.group_views > 1:
        return _sample_view_groups(cfg, resolution, generator, device)
    B, rng = cfg.batch_size, generator.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, generator=generator, device=rng)

    lo, hi = (float(torch.sin(torch.deg2rad(torch.tensor(v, device=rng)))) for v in cfg.elevation_range)
    elevation = torch.rad2deg(torch.arcsin(uniform(lo, hi)))
    a0, a1 = cfg.azimuth_range
    azimuth = a0 + (a1 - a0) * (torch.arange(B, device=rng) + torch.rand(B, generator=generator, device=rng)) / B
    distance = uniform(*cfg.distance_range)
    fovy = uniform(*cfg.fovy_range)
    return _cameras_on(device, elevation, azimuth, distance, fovy, resolution)


def _cameras_on(device: torch.device | str, elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor,
                fovy: torch.Tensor, resolution: int) -> Cameras:
    """look_at_cameras of host draws [B] each, moved to ``device`` in one non-blocking copy."""
    elevation, azimuth, distance, fovy = to_device(torch.stack([elevation, azimuth, distance, fovy]), device)
    return look_at_cameras(elevation, azimuth, distance, fovy, resolution, resolution)


def _sample_view_groups(cfg: CameraConfig, resolution: int, generator: torch.Generator,
                        device: torch.device | str) -> Cameras:
    """batch_size / group_views groups of group_views cameras (``CameraConfig``), each group's views contiguous."""
    groups, views, rng = cfg.batch_size // cfg.group_views, cfg.group_views, generator.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(groups, generator=generator, device=rng)).repeat_interleave(views)

    lo, hi = (float(torch.sin(torch.deg2rad(torch.tensor(v, device=rng)))) for v in cfg.elevation_range)
    elevation = torch.rad2deg(torch.arcsin(uniform(lo, hi)))
    start = 360.0 * torch.rand(groups, generator=generator, device=rng)
    azimuth = view_group_azimuths(groups, views, start)
    distance = uniform(*cfg.distance_range)
    fovy = uniform(*cfg.fovy_range)
    return _cameras_on(device, elevation, azimuth, distance, fovy, resolution)


def orbit_cameras(
    n_views: int, resolution: int, elevation: float = 15.0, distance: float = 2.5, fovy: float = 45.0
) -> Cameras:
    """n_views cameras evenly spaced in azimuth at a fixed elevation (for orbit videos)."""
    azimuth = torch.arange(n_views, dtype=torch.float32) * 360.0 / n_views
    return look_at_cameras(
        torch.full((n_views,), elevation), azimuth, torch.full((n_views,), distance), fovy, resolution, resolution
    )
