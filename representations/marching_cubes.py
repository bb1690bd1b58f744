"""Marching cubes of a density field: the field sampled on a grid, its surface level, the triangulated surface.

The field is sampled on a ``resolution^3`` grid spanning ``[-bound, bound]^3`` and
triangulated at an iso-level of the density. The mesh is in world coordinates
(+z up, as everywhere in dream3d); converting to a file format's convention is
the exporter's business. ``mesh_extraction.extract_mesh`` runs these steps in order.
"""

from __future__ import annotations

import math
from typing import Callable

import mcubes
import torch
import trimesh
from torch import Tensor

FieldFn = Callable[[Tensor], Tensor]

# Optical depth at which a ray's transmittance falls to one half: the median-depth surface.
_HALF_OPACITY_DEPTH = math.log(2.0)


class MeshError(ValueError):
    """The density field has no extractable surface (empty, completely full, or degenerate)."""


def grid_axis(resolution: int, bound: float) -> Tensor:
    """The ``resolution`` sample positions of ``sample_grid``'s grid along one axis: [R] over [-bound, bound]."""
    return torch.linspace(-bound, bound, resolution, dtype=torch.float32)


@torch.no_grad()
def sample_grid(
    field_fn: FieldFn, resolution: int, bound: float, chunk: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Evaluates a scalar field on the grid. Returns [R,R,R] (CPU, float32), indexed [ix, iy, iz].

    Points are generated per chunk from flat indices, so memory stays at ``chunk`` points
    however fine the grid.
    """
    axis = grid_axis(resolution, bound).to(device)
    total = resolution**3
    out = torch.empty(total, dtype=torch.float32)
    for start in range(0, total, chunk):
        flat = torch.arange(start, min(start + chunk, total), device=device)
        ix, rem = flat // resolution**2, flat % resolution**2
        points = torch.stack([axis[ix], axis[rem // resolution], axis[rem % resolution]], dim=-1)
        out[start : start + len(flat)] = field_fn(points).reshape(-1).float().cpu()
    return out.view(resolution, resolution, resolution)


def auto_threshold(grid: Tensor, step: float, max_incidence_deg: float = 30.0) -> float:
    """Density of the surface that renders show: where transmittance along a ray reaches 0.5.

    Rays run through the grid along the six axis directions. Along each ray the optical
    depth (trapezoid integral of sigma, in world units) is accumulated from the entry
    face; the density where it first reaches ln 2 is that ray's surface density, i.e.
    the density at the ray's rendered median depth. Only rays that meet the surface
    head-on count (the slope of that direction's depth map within ``max_incidence_deg``):
    a grazing ray crosses a soft surface layer obliquely, reaches ln 2 early and so reports
    a lower density, and such rays are most of a convex object's silhouette. The threshold
    is the median over the head-on rays (over all opaque rays if none is head-on).

    Why this rule: it is tied to what volume rendering displays, so the level set sits
    where the views put the surface; it integrates in world units, so it does not drift
    with the grid resolution (unlike ``ln 2 / cell size``); it follows the field's own
    scale (unlike a fixed constant); and it ignores the interior and the empty space that
    skew "mean of values above eps". Floaters give few rays, which the median discards.

    Args:
        grid: [R,R,R] densities (>= 0). step: grid spacing in world units.
    Raises:
        MeshError: no ray becomes half opaque (empty or fog-like field).
    """
    max_slope = math.tan(math.radians(max_incidence_deg))
    opaque_rays, head_on_rays = [], []
    for dim in range(3):
        for flip in (False, True):
            sigma = (grid.flip(dim) if flip else grid).movedim(dim, -1)
            tau = step * (sigma.cumsum(-1) - 0.5 * (sigma + sigma[..., :1]))
            opaque = tau >= _HALF_OPACITY_DEPTH
            hit = opaque.any(-1)
            if not hit.any():
                continue
            k = opaque.to(torch.uint8).argmax(-1, keepdim=True).clamp_min(1)  # first sample past ln 2
            tau0, tau1 = tau.gather(-1, k - 1), tau.gather(-1, k)
            s0, s1 = sigma.gather(-1, k - 1), sigma.gather(-1, k)
            frac = ((_HALF_OPACITY_DEPTH - tau0) / (tau1 - tau0).clamp_min(1e-12)).squeeze(-1)
            density = (s0 + frac.unsqueeze(-1) * (s1 - s0)).squeeze(-1)
            # Depth map [R,R] in world units; its slope is tan(incidence) where the surface is smooth.
            depth = torch.where(hit, (k.squeeze(-1) - 1 + frac) * step, torch.nan)
            dy, dx = torch.gradient(depth, spacing=step)
            head_on = hit & (dx.square() + dy.square() <= max_slope**2)  # NaN neighbours (silhouette) fail
            opaque_rays.append(density[hit])
            head_on_rays.append(density[head_on])
    if not opaque_rays:
        raise MeshError("density field is empty: no ray through the grid becomes half opaque (pass a threshold)")
    head_on_density = torch.cat(head_on_rays)
    chosen = head_on_density if len(head_on_density) else torch.cat(opaque_rays)
    return float(chosen.median())


def check_level(grid: Tensor, level: float) -> None:
    if bool((grid >= level).all()):
        raise MeshError(f"density field is full: every grid value is >= the threshold {level:.4g}, no surface inside the box")
    if not bool((grid > level).any()):
        raise MeshError(f"density field is empty: no grid value exceeds the threshold {level:.4g}")


def surface(grid: Tensor, level: float, bound: float) -> trimesh.Trimesh:
    """Marching cubes of grid [R,R,R] (spanning [-bound, bound]^3) at ``level``, degenerate faces removed."""
    step = 2 * bound / (grid.shape[0] - 1)
    # PyMCubes returns vertices in index space with the axes in array order (x, y, z) and
    # winds faces so their normals point toward decreasing values: out of the object.
    vertices, faces = mcubes.marching_cubes(grid.numpy(), level)
    if len(faces) == 0:
        raise MeshError(f"marching cubes found no faces at threshold {level:.4g} (grid too coarse for the object?)")
    mesh = trimesh.Trimesh(vertices * step - bound, faces, process=True)
    # Cells where the surface passes exactly through samples give zero-area triangles.
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0:
        raise MeshError(f"marching cubes gave only degenerate faces at threshold {level:.4g}")
    return mesh
