"""A coloured mesh from a representation's density field: ``extract_mesh`` runs the export's steps in order.

Marching cubes (``marching_cubes``) of the density, made solid by the visual hull or by filling
cavities (``visual_hull``), decimated and cleaned (``mesh_cleanup``), then coloured per vertex with
the albedo.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from dream3d.representations.marching_cubes import FieldFn, auto_threshold, check_level, sample_grid, surface
from dream3d.representations.mesh_cleanup import decimate, largest_components
from dream3d.representations.visual_hull import AlphaFn, fill_cavities, solid_from_hull

SOLID_MODES = ("hull", "fill", "none")
HULL_LEVELS = ("depth", "silhouettes")  # how "hull" mode picks the automatic level


def extract_mesh(
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    *,
    resolution: int = 128,
    threshold: float | None = None,
    bound: float = 1.0,
    min_component_fraction: float = 0.05,
    chunk: int = 2**18,
    device: torch.device | str = "cpu",
    solid: str = "none",
    alpha_fn: AlphaFn | None = None,
    hull_views: int = 48,
    hull_image_size: int = 96,
    hull_margin: float = 3.0,
    hull_level: str = "depth",
    max_faces: int | None = None,
) -> trimesh.Trimesh:
    """Triangulates the surface of a density field, with per-vertex albedo colours.

    Args:
        density_fn: points [N,3] -> sigma [N] (>= 0, per world unit).
        albedo_fn: points [N,3] -> rgb [N,3] in [0,1].
        resolution: grid samples per axis over [-bound, bound].
        threshold: iso-level in sigma; None picks one: ``auto_threshold`` (the renders' median
            depth), or in "hull" mode with ``hull_level="silhouettes"`` the level whose
            silhouettes match the renders (``silhouette_level``).
        min_component_fraction: connected components with fewer faces than this
            fraction of the largest component's are dropped (floaters); 0 keeps all.
        chunk: points per field evaluation.
        device: where the field functions expect their points.
        solid: which surface: "none" the raw iso-surface of the density (inner walls
            included), "fill" the same with enclosed cavities filled, "hull" the density
            made solid by the visual hull of ``alpha_fn``'s renders from ``hull_views``
            views over the whole sphere (``hull_image_size`` pixels square): see
            ``hull_regions`` and ``fill_from_hull``, with ``hull_margin`` in grid cells.
        hull_level: how "hull" picks the automatic level: "depth" (``auto_threshold``) or
            "silhouettes" (``silhouette_level``; better on slowly falling densities such as
            tori, worse where the renders are larger than the object: docs/benchmarks.md).
        max_faces: face budget, met by quadric decimation (``decimate``); None keeps all.
    Returns:
        A mesh in world coordinates, faces wound so normals point outward (out of the
        denser side), vertex colours as uint8 RGBA.
    Raises:
        MeshError: nothing above the threshold, everything at or above it, or no faces.
        ValueError: an unknown ``solid`` mode or ``hull_level``, or "hull" without ``alpha_fn``.
    """
    if solid not in SOLID_MODES:
        raise ValueError(f"unknown solid mode {solid!r}; valid: {', '.join(SOLID_MODES)}")
    if hull_level not in HULL_LEVELS:
        raise ValueError(f"unknown hull_level {hull_level!r}; valid: {', '.join(HULL_LEVELS)}")
    if solid == "hull" and alpha_fn is None:
        raise ValueError("solid='hull' needs alpha_fn (renders of the representation)")
    grid = sample_grid(density_fn, resolution, bound, chunk, device)
    level = auto_threshold(grid, 2 * bound / (resolution - 1)) if threshold is None else float(threshold)
    check_level(grid, level)
    if solid == "fill":
        grid = fill_cavities(grid, level)
    elif solid == "hull":
        choose_level = threshold is None and hull_level == "silhouettes"
        grid, level = solid_from_hull(grid, level, choose_level, alpha_fn, hull_views, hull_image_size, hull_margin, bound, device)
    mesh = surface(grid, level, bound)
    if max_faces is not None:
        mesh = decimate(mesh, max_faces)
    mesh = largest_components(mesh, min_component_fraction)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=_vertex_colors(albedo_fn, mesh.vertices, chunk, device))
    return mesh


@torch.no_grad()
def _vertex_colors(albedo_fn: FieldFn, vertices: np.ndarray, chunk: int, device: torch.device | str) -> np.ndarray:
    points = torch.as_tensor(vertices, dtype=torch.float32)
    rgb = torch.cat([albedo_fn(p.to(device)).float().cpu() for p in points.split(chunk)])
    rgba = torch.cat([rgb.clamp(0, 1), torch.ones_like(rgb[:, :1])], dim=-1)
    return (rgba * 255).round().to(torch.uint8).numpy()
