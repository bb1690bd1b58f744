"""Cameras and render outputs: the small data types every layer shares.

Conventions (docs/architecture.md#seams): world is right-handed with +z up and the object
at the origin; ``c2w`` is OpenGL-style (the camera looks down its -z axis, +y is
up in the image); angles are stored in degrees. Azimuth 0 puts the camera on the
+x axis, azimuth 90 on the +y axis; elevation is measured up from the xy-plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Cameras:
    """A batch of B pinhole cameras with square pixels.

    Attributes:
        c2w: [B, 4, 4] camera-to-world, OpenGL convention.
        fovy: [B] vertical field of view in radians.
        width, height: image size in pixels.
        elevation, azimuth: [B] in degrees; distance: [B] in world units.
    """

    c2w: Tensor
    fovy: Tensor
    width: int
    height: int
    elevation: Tensor
    azimuth: Tensor
    distance: Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def rays(self) -> tuple[Tensor, Tensor]:
        """Rays through pixel centres. Returns (origins [B,H,W,3], dirs [B,H,W,3]); dirs are unit length."""
        B, H, W = len(self), self.height, self.width
        tan_half = torch.tan(self.fovy / 2).view(B, 1, 1)
        j = (torch.arange(W, dtype=self.c2w.dtype, device=self.device) + 0.5) / W * 2 - 1
        i = 1 - (torch.arange(H, dtype=self.c2w.dtype, device=self.device) + 0.5) / H * 2
        y, x = torch.meshgrid(i, j, indexing="ij")
        x = x.unsqueeze(0) * tan_half * (W / H)
        y = y.unsqueeze(0) * tan_half
        dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B,H,W,3]
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, :3, 3].view(B, 1, 1, 3).expand(B, H, W, 3)
        return origins, dirs

    def viewmats(self) -> Tensor:
        """World-to-camera [B,4,4] in the OpenCV convention (looks down +z, +y down), as gsplat expects.

        c2w is rigid, so its inverse is [R^T, -R^T t] in closed form: no batched LU (``torch.linalg.inv``
        checks for singular matrices, a read of the device on CUDA)."""
        rotation_t = self.c2w[:, :3, :3].transpose(1, 2)
        w2c = torch.cat([rotation_t, -rotation_t @ self.c2w[:, :3, 3:]], dim=-1)  # [B,3,4]
        # OpenGL -> OpenCV: the y and z rows negated; a rigid c2w's bottom row is already 0 0 0 1
        return torch.cat([w2c[:, :1], -w2c[:, 1:], self.c2w[:, 3:]], dim=1)

    def intrinsics(self) -> Tensor:
        """Pinhole intrinsics [B,3,3] matching ``rays()`` (principal point at the image centre)."""
        focal = self.height / (2 * torch.tan(self.fovy / 2))
        K = torch.zeros(len(self), 3, 3, dtype=self.c2w.dtype, device=self.device)
        K[:, 0, 0] = focal
        K[:, 1, 1] = focal
        K[:, 0, 2] = self.width / 2
        K[:, 1, 2] = self.height / 2
        K[:, 2, 2] = 1
        return K

    def to(self, device: torch.device | str) -> "Cameras":
        """The same cameras with every tensor on ``device``."""
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.width, self.height,
                       self.elevation.to(device), self.azimuth.to(device), self.distance.to(device))

    def resized(self, width: int, height: int) -> "Cameras":
        """The same cameras rendering a different image size."""
        return Cameras(self.c2w, self.fovy, width, height, self.elevation, self.azimuth, self.distance)

    @staticmethod
    def cat(cameras: "list[Cameras]") -> "Cameras":
        """Concatenates batches of cameras that share an image size."""
        first = cameras[0]
        return Cameras(
            *(torch.cat([getattr(c, f) for c in cameras]) for f in ("c2w", "fovy")),
            first.width, first.height,
            *(torch.cat([getattr(c, f) for c in cameras]) for f in ("elevation", "azimuth", "distance")),
        )

    def __getitem__(self, index: slice | Tensor | int) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(
            self.c2w[index], self.fovy[index], self.width, self.height,
            self.elevation[index], self.azimuth[index], self.distance[index],
        )


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` (any shape) on ``device`` without making the host wait for the device: onto a GPU from page-locked
    memory with ``non_blocking`` (a plain copy from pageable memory waits until the device has run everything
    queued before it); elsewhere a plain move."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def look_at_cameras(
    elevation: Tensor,
    azimuth: Tensor,
    distance: Tensor,
    fovy_deg: Tensor | float,
    width: int,
    height: int,
) -> Cameras:
    """Cameras on a sphere around the origin, looking at it with world +z as up.

    Args:
        elevation, azimuth: [B] degrees. distance: [B]. fovy_deg: [B] or scalar, degrees.
    """
    device = elevation.device if isinstance(elevation, Tensor) else torch.device("cpu")
    elevation, azimuth, distance = (torch.as_tensor(v, dtype=torch.float32, device=device)
                                    for v in (elevation, azimuth, distance))
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    position = torch.stack(
        [torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=-1
    ) * distance.unsqueeze(-1)
    forward = -position / position.norm(dim=-1, keepdim=True)
    up_world = F.pad(torch.ones_like(forward[:, 2:]), (2, 0))  # +z for every camera, made on the device
    right = torch.linalg.cross(forward, up_world)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4, device=device).repeat(len(position), 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    fovy = torch.deg2rad(torch.as_tensor(fovy_deg, dtype=torch.float32, device=device).expand(len(position)).clone())
    return Cameras(c2w, fovy, width, height, elevation, azimuth, distance)


def ray_aabb(origins: Tensor, dirs: Tensor, half_extent: float) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test against the cube [-half_extent, half_extent]^3.

    Args:
        origins, dirs: [..., 3]. Returns (t_near [...], t_far [...], hit [...] bool); t_near >= 0.
    """
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-half_extent - origins) / safe
    t1 = (half_extent - origins) / safe
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far, t_far > t_near


@dataclass
class RenderOutput:
    """What a representation renders for a batch of cameras.

    rgb [B,H,W,3] in [0,1], composited over the background; alpha [B,H,W,1];
    depth [B,H,W,1] as distance along the (unit) ray, 0 where empty;
    normal [B,H,W,3] or None; extras: representation bookkeeping (e.g. regularizer terms).
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    normal: Tensor | None = None
    extras: dict = field(default_factory=dict)


def degrees_between(elev_a: Tensor, azim_a: Tensor, elev_b: Tensor, azim_b: Tensor) -> Tensor:
    """Great-circle angle in degrees between view directions given as (elevation, azimuth) pairs (broadcasting)."""
    ea, aa, eb, ab = (torch.deg2rad(v) for v in (elev_a, azim_a, elev_b, azim_b))
    cos = torch.sin(ea) * torch.sin(eb) + torch.cos(ea) * torch.cos(eb) * torch.cos(aa - ab)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def view_group_azimuths(groups: int, views: int, start: Tensor) -> Tensor:
    """[groups * views] azimuths in degrees: each group's views evenly spaced around the circle
    (90 degrees apart for 4), beginning at that group's start [groups] in degrees.
    The views of one group are contiguous, as a multi-view prior needs them."""
    offsets = torch.arange(views, dtype=start.dtype, device=start.device) * (360.0 / views)
    return (start.view(groups, 1) + offsets.view(1, views)).flatten() % 360.0


__all__ = ["Cameras", "RenderOutput", "look_at_cameras", "ray_aabb", "degrees_between", "view_group_azimuths"]
