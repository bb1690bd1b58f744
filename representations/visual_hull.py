"""Solid surfaces: the visual hull of a representation's renders, and the density grid made solid by it.

A trained density is often only a wall under the surface, with openings; the hull (where every view
sees the object) says which grid cells are inside, and ``fill_from_hull`` fills them. ``fill_cavities``
is the hull-free fallback: it fills only what the outside cannot reach.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from dream3d.representations.cameras import Cameras, look_at_cameras, ray_aabb
from dream3d.representations.marching_cubes import grid_axis

log = logging.getLogger(__name__)

AlphaFn = Callable[[Cameras], Tensor]  # cameras (B, HxW) -> alpha [B,H,W] in [0,1]


def hull_cameras(views: int, image_size: int, distance: float = 2.5, fovy_deg: float = 45.0) -> Cameras:
    """``views`` cameras spread evenly over the whole sphere (a Fibonacci lattice), below the object too."""
    k = torch.arange(views, dtype=torch.float64) + 0.5
    elevation = torch.rad2deg(torch.asin(1 - 2 * k / views))
    azimuth = torch.remainder(k * 180.0 * (3.0 - math.sqrt(5.0)), 360.0)  # golden angle steps
    return look_at_cameras(elevation.float(), azimuth.float(), torch.full((views,), distance), fovy_deg, image_size, image_size)


@torch.no_grad()
def render_alphas(alpha_fn: AlphaFn, cameras: Cameras, batch: int = 8) -> Tensor:
    """The representation's alpha from every camera, ``batch`` views per call: [B,H,W] (CPU, float32)."""
    return torch.cat([alpha_fn(cameras[start : start + batch]).float().cpu() for start in range(0, len(cameras), batch)])


@torch.no_grad()
def visual_hull(
    alphas: Tensor, cameras: Cameras, resolution: int, bound: float, batch: int = 8, device: torch.device | str = "cpu"
) -> Tensor:
    """Soft visual hull on the ``sample_grid`` grid: [R,R,R] in [0,1], indexed [ix, iy, iz].

    Each grid point takes the smallest alpha (bilinear, of ``alphas`` [B,H,W] rendered from
    ``cameras``) among the views that see it: a point is solid only if every view covers it.
    A view carves only what falls in its frame, so points outside every frame stay 1 (the
    grid border is cleared by ``hull_regions``). Unlike the density's level set this is solid
    by construction: a hole in a wall still lets the ray hit the wall behind it, so the
    silhouette, and the hull, stay whole. Concavities that no silhouette shows (a cup's
    inside) are filled.
    """
    axis = grid_axis(resolution, bound)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    homogeneous = torch.cat([points, torch.ones(len(points), 1)], -1).to(device)
    hull = torch.ones(len(points), device=device)
    size = torch.tensor([cameras.width, cameras.height], dtype=torch.float32, device=device)
    for start in range(0, len(cameras), batch):
        views = cameras[start : start + batch]
        alpha = alphas[start : start + batch].to(device)  # [b,H,W]
        camera_points = torch.einsum("bij,nj->bni", views.viewmats().float().to(device), homogeneous)[..., :3]
        pixels = torch.einsum("bij,bnj->bni", views.intrinsics().float().to(device), camera_points)
        uv = pixels[..., :2] / pixels[..., 2:].clamp_min(1e-6) / size * 2 - 1  # grid_sample's [-1, 1]
        sampled = F.grid_sample(alpha.unsqueeze(1), uv.unsqueeze(1), align_corners=False, padding_mode="border")
        seen = (uv.abs() <= 1).all(-1) & (camera_points[..., 2] > 0)
        hull = torch.minimum(hull, torch.where(seen, sampled[:, 0, 0], 1.0).amin(0))
    return hull.view(resolution, resolution, resolution).cpu()


def hull_regions(hull: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Where the visual hull [R,R,R] decides alone: (core, outside), [R,R,R] bool each.

    ``core`` lies deeper than ``margin`` grid cells inside the hull (alpha > 0.5); ``outside``
    further than ``margin`` cells outside it, plus the grid's border cells (the box's faces
    close what would leave it). In the band between, the density places the surface.
    """
    inside = (hull > 0.5).numpy()
    core = torch.from_numpy(ndimage.distance_transform_edt(inside) > margin)
    outside = torch.from_numpy(ndimage.distance_transform_edt(~inside) > margin)
    outside[[0, -1]], outside[:, [0, -1]], outside[:, :, [0, -1]] = True, True, True
    return core, outside


def fill_from_hull(grid: Tensor, level: float, core: Tensor, outside: Tensor) -> Tensor:
    """The density grid made solid by the visual hull's ``hull_regions``: [R,R,R] -> [R,R,R].

    In the core the density is raised to above the level: the inner walls of a shell-shaped
    field vanish and openings in its walls are closed under the surface. Outside, the
    density is cleared: floaters no view confirms. In the band between, the density is
    kept, so the surface sits where the density and the level put it, not on the hull,
    which grazing views inflate.
    """
    solid = torch.where(core, grid.clamp_min(2 * level), grid)
    return torch.where(outside, torch.zeros_like(grid), solid)


@torch.no_grad()
def silhouette_level(
    grid: Tensor, core: Tensor, outside: Tensor, alphas: Tensor, cameras: Cameras, bound: float, reference: float,
    *, span: tuple[float, float] = (1 / 16, 4.0), levels: int = 81, stride: int = 2, device: torch.device | str = "cpu",
) -> float:
    """The iso-level whose silhouettes best match the renders' (IoU against ``alphas`` > 0.5).

    A pixel of the solid's iso-surface at level L is covered when the largest density along
    its ray exceeds L (trilinear; the core counts as infinitely dense, the outside as
    empty). One march per pixel (every ``stride``-th pixel of ``alphas`` [B,H,W], rendered
    from ``cameras``; one sample per grid cell) gives that largest density. The silhouette
    IoU, pooled over all views, is then scored for ``levels`` levels spaced evenly in log
    from ``reference * span[0]`` to ``reference * span[1]``; the middle of the best ones wins.

    Why: the median-depth level (``auto_threshold``) reads the surface off rays that meet
    it head-on. Where the density falls off slowly (trained tori and spheres) the renders'
    silhouettes, made by rays that graze the soft layer, lie outside that level set, and
    the renders are what the prior shaped to the object. Only the band between core and
    outside can move, so the surface stays within the hull's margin.

    Args:
        grid: [R,R,R] densities over [-bound, bound]^3. core, outside: ``hull_regions``.
        reference: a level on the field's scale (its ``auto_threshold``).
    """
    limit = torch.where(core, torch.full_like(grid, 1e30), grid)  # finite: a 0 weight times it stays 0
    limit = torch.where(outside, torch.zeros_like(grid), limit).to(device)[None, None]
    origins, dirs = cameras.to(device).rays()
    origins, dirs = origins[:, ::stride, ::stride].float(), dirs[:, ::stride, ::stride].float()
    near, far, _ = ray_aabb(origins, dirs, bound)
    fraction = torch.linspace(0, 1, grid.shape[0], device=device)
    peaks = []
    for b in range(len(cameras)):
        t = near[b, ..., None] + (far[b] - near[b]).clamp_min(0)[..., None] * fraction  # [h,w,S]
        points = origins[b, :, :, None] + dirs[b, :, :, None] * t[..., None]
        # grid_sample's (x, y, z) index the last, middle and first axes: the grid's [ix, iy, iz] reversed
        samples = F.grid_sample(limit, (points.flip(-1) / bound).reshape(1, -1, 1, 1, 3), align_corners=True)
        peaks.append(samples.view(t.shape).amax(-1).cpu())
    peak = torch.stack(peaks)  # [B,h,w]
    target = alphas[:, ::stride, ::stride] > 0.5
    candidates = reference * torch.logspace(math.log10(span[0]), math.log10(span[1]), levels)
    covered = peak.unsqueeze(0) > candidates.view(-1, 1, 1, 1)
    iou = (covered & target).flatten(1).sum(1) / (covered | target).flatten(1).sum(1).clamp_min(1)
    best = (iou == iou.max()).nonzero().squeeze(-1)
    return float(candidates[best[len(best) // 2]])


def fill_cavities(grid: Tensor, level: float) -> Tensor:
    """The density grid with every region that the outside cannot reach raised to the surface level.

    The iso-surface then has no inner walls; walls with openings let the outside in, and those
    regions stay as they are.
    """
    enclosed = torch.from_numpy(ndimage.binary_fill_holes((grid > level).numpy())) & (grid <= level)
    return torch.where(enclosed, torch.full_like(grid, 2 * level), grid)


def solid_from_hull(
    grid: Tensor, level: float, choose_level: bool, alpha_fn: AlphaFn, views: int, image_size: int, margin: float,
    bound: float, device: torch.device | str,
) -> tuple[Tensor, float]:
    """``extract_mesh``'s "hull" mode: (the filled grid [R,R,R], its level), or the input if the hull is empty."""
    cameras = hull_cameras(views, image_size)
    alphas = render_alphas(alpha_fn, cameras)
    # The hull only says where the inside and outside are, a few cells from the surface: half the grid will do.
    coarse = visual_hull(alphas, cameras, grid.shape[0] // 2 + 1, bound, device=device)
    hull = F.interpolate(coarse[None, None], size=grid.shape, mode="trilinear", align_corners=True)[0, 0]
    core, outside = hull_regions(hull, margin)
    if not bool((fill_from_hull(grid, level, core, outside) > level).any()):
        # renders too faint for any point to be covered by every view (an early or tiny run)
        log.warning("warning: the visual hull of the renders is empty; exporting the raw surface")
        return grid, level
    if choose_level:
        level = silhouette_level(grid, core, outside, alphas, cameras, bound, level, device=device)
    return fill_from_hull(grid, level, core, outside), level
