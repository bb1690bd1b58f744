"""Mesh extraction from a volume-density field: marching cubes on a grid, cleanup, vertex colours.

The field is sampled on a ``resolution^3`` grid spanning ``[-bound, bound]^3`` and
triangulated at an iso-level of the density. The mesh is in world coordinates
(+z up, as everywhere in dream3d); converting to a file format's convention is
the exporter's business.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import mcubes
import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy import ndimage
from torch import Tensor

from dream3d.representations.cameras import Cameras, look_at_cameras, ray_aabb

log = logging.getLogger(__name__)

FieldFn = Callable[[Tensor], Tensor]
AlphaFn = Callable[[Cameras], Tensor]  # cameras (B, HxW) -> alpha [B,H,W] in [0,1]
SOLID_MODES = ("hull", "fill", "none")
HULL_LEVELS = ("depth", "silhouettes")  # how "hull" mode picks the automatic level

# Optical depth at which a ray's transmittance falls to one half: the median-depth surface.
_HALF_OPACITY_DEPTH = math.log(2.0)
# Vertices closer than this (world units) are one point to anyone who welds the file: float32 positions,
# as GLB stores them, tell apart about 1e-7 at the box's scale.
WELD_DISTANCE = 1e-6


class MeshError(ValueError):
    """The density field has no extractable surface (empty, completely full, or degenerate)."""


def _grid_axis(resolution: int, bound: float) -> Tensor:
    return torch.linspace(-bound, bound, resolution, dtype=torch.float32)


@torch.no_grad()
def sample_grid(
    field_fn: FieldFn, resolution: int, bound: float, chunk: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Evaluates a scalar field on the grid. Returns [R,R,R] (CPU, float32), indexed [ix, iy, iz].

    Points are generated per chunk from flat indices, so memory stays at ``chunk`` points
    however fine the grid.
    """
    axis = _grid_axis(resolution, bound).to(device)
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
    axis = _grid_axis(resolution, bound)
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


def _largest_components(mesh: trimesh.Trimesh, min_component_fraction: float) -> trimesh.Trimesh:
    components = mesh.split(only_watertight=False)
    if len(components) <= 1:
        return mesh
    largest = max(len(c.faces) for c in components)
    kept = [c for c in components if len(c.faces) >= min_component_fraction * largest]
    return trimesh.util.concatenate(kept)


@torch.no_grad()
def _vertex_colors(albedo_fn: FieldFn, vertices: np.ndarray, chunk: int, device: torch.device | str) -> np.ndarray:
    points = torch.as_tensor(vertices, dtype=torch.float32)
    rgb = torch.cat([albedo_fn(p.to(device)).float().cpu() for p in points.split(chunk)])
    rgba = torch.cat([rgb.clamp(0, 1), torch.ones_like(rgb[:, :1])], dim=-1)
    return (rgba * 255).round().to(torch.uint8).numpy()


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
    _check_level(grid, level)
    if solid == "fill":
        grid = fill_cavities(grid, level)
    elif solid == "hull":
        choose_level = threshold is None and hull_level == "silhouettes"
        grid, level = _solid_from_hull(grid, level, choose_level, alpha_fn, hull_views, hull_image_size, hull_margin, bound, device)
    mesh = _surface(grid, level, bound)
    if max_faces is not None:
        mesh = decimate(mesh, max_faces)
    mesh = _largest_components(mesh, min_component_fraction)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=_vertex_colors(albedo_fn, mesh.vertices, chunk, device))
    return mesh


def _solid_from_hull(
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


def decimate(mesh: trimesh.Trimesh, max_faces: int, attempts: int = 6) -> trimesh.Trimesh:
    """The mesh with at most ``max_faces`` faces, by quadric edge collapse (fast-simplification).

    The simplifier returns each collapsed corner as its own vertex and leaves a few folded
    two-face slivers; vertices are welded (``weld``) and the slivers (separate zero-volume
    pieces) are left for ``_largest_components`` to drop. Now and then a collapse pinches two
    sheets onto one edge (four faces on it); when the result is not closed while the input
    was, the collapse is retried with a 3% smaller budget, up to ``attempts`` times, and
    if none stays closed the mesh is returned whole: a closed surface over the budget rather
    than an open one within it.
    """
    if len(mesh.faces) <= max_faces:
        return mesh
    for attempt in range(attempts):
        simplified = weld(mesh.simplify_quadric_decimation(face_count=int(max_faces * 0.97**attempt)))
        simplified.update_faces(simplified.nondegenerate_faces())
        simplified.remove_unreferenced_vertices()
        # the whole welded mesh: splitting it into pieces would cut a pinched edge apart and hide it
        if not mesh.is_watertight or simplified.is_watertight:
            return simplified
    return mesh


def weld(mesh: trimesh.Trimesh, distance: float = WELD_DISTANCE) -> trimesh.Trimesh:
    """The mesh with every cluster of vertices within ``distance`` of each other merged into one (in place).

    By distance, not by rounding positions (trimesh's ``merge_vertices``): two vertices 2e-9 apart on either
    side of a rounding boundary stay two there, and a viewer that welds the file later finds the pinch
    between them (a decimated benchmark cube: closed in one piece as written, two pieces once welded).
    """
    groups = trimesh.grouping.clusters(mesh.vertices, distance)
    if len(groups) == 0:
        return mesh
    remap = np.arange(len(mesh.vertices))
    # each cluster's lowest vertex index stands for it
    remap[np.concatenate(groups)] = np.repeat([g.min() for g in groups], [len(g) for g in groups])
    mesh.faces = remap[mesh.faces]
    mesh.remove_unreferenced_vertices()
    return mesh


def _check_level(grid: Tensor, level: float) -> None:
    if bool((grid >= level).all()):
        raise MeshError(f"density field is full: every grid value is >= the threshold {level:.4g}, no surface inside the box")
    if not bool((grid > level).any()):
        raise MeshError(f"density field is empty: no grid value exceeds the threshold {level:.4g}")


def _surface(grid: Tensor, level: float, bound: float) -> trimesh.Trimesh:
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


def grid_centres(resolution: int, bound: float) -> np.ndarray:
    """Cell centres of a ``resolution``-cell axis over [-bound, bound]: [R] (float64)."""
    step = 2 * bound / resolution
    return -bound + (np.arange(resolution) + 0.5) * step


# Rays are nudged off the cell centres by an irrational fraction of a cell so that none runs exactly
# along a mesh edge or through a vertex (where two faces would both count, or neither).
_RAY_NUDGE = np.array([np.sqrt(2.0) - 1.0, np.sqrt(3.0) - 1.0]) * 1e-4


def cross2(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """z of the cross product of 2D vectors [...,2] -> [...]."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def mesh_occupancy(mesh: trimesh.Trimesh, resolution: int, bound: float) -> np.ndarray:
    """Which cell centres of a [-bound, bound]^3 grid lie inside a mesh: [R,R,R] bool, indexed [ix, iy, iz].

    Inside means a positive winding number along +z: one vertical ray per (x, y) column
    counts each face it crosses above a cell as +1 if the face's normal points up (an exit)
    and -1 if down (an entry). For a closed outward surface that is 1 inside and 0 outside;
    a hollow shell (an inner surface whose normals face inward) gets 1 - 1 = 0 in its
    cavity, and an inverted surface encloses nothing. That is what a volumetric measure
    needs, where a parity test or a voxel flood fill would count the cavity as solid.
    (trimesh's ``contains`` needs rtree, which dream3d does not ship.)
    """
    centres = grid_centres(resolution, bound)
    step = 2 * bound / resolution
    tri = np.asarray(mesh.triangles, dtype=np.float64)  # [F,3,3]
    xy, z = tri[..., :2], tri[..., 2]
    area2 = cross2(xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0])  # > 0: counter-clockwise from above, normal up
    keep = np.abs(area2) > 1e-18
    xy, z, area2 = xy[keep], z[keep], area2[keep]
    # columns whose (nudged) ray lies in each face's xy bounding box
    nudge = _RAY_NUDGE * step
    first = np.clip(np.ceil((xy.min(1) - nudge + bound) / step - 0.5), 0, resolution).astype(np.int64)
    last = np.clip(np.floor((xy.max(1) - nudge + bound) / step - 0.5), -1, resolution - 1).astype(np.int64)
    counts = np.clip(last - first + 1, 0, None)  # [F,2]
    per_face = counts[:, 0] * counts[:, 1]
    face = np.repeat(np.arange(len(xy)), per_face)
    local = np.arange(per_face.sum()) - np.repeat(np.cumsum(per_face) - per_face, per_face)
    ix = first[face, 0] + local // np.maximum(counts[face, 1], 1)
    iy = first[face, 1] + local % np.maximum(counts[face, 1], 1)
    point = np.stack([centres[ix], centres[iy]], -1) + nudge  # [P,2]
    a, b, c = xy[face, 0], xy[face, 1], xy[face, 2]
    # barycentric weights of the ray's (x, y) in the projected face
    w1 = cross2(point - a, c - a) / area2[face]
    w2 = cross2(b - a, point - a) / area2[face]
    w0 = 1 - w1 - w2
    hit = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    face, ix, iy = face[hit], ix[hit], iy[hit]
    z_hit = w0[hit] * z[face, 0] + w1[hit] * z[face, 1] + w2[hit] * z[face, 2]
    # a crossing at z_hit counts for the cells whose centre lies below it
    below = np.searchsorted(centres, z_hit)
    crossings = np.zeros((resolution, resolution, resolution + 1), dtype=np.int64)
    np.add.at(crossings, (ix, iy, below), np.sign(area2[face]).astype(np.int64))
    winding = np.flip(np.cumsum(np.flip(crossings, -1), -1), -1)[..., 1:]  # sum over crossings above each cell
    return winding > 0


def _covers(corners: Tensor, centres: Tensor) -> Tensor:
    """Whether 2D triangles cover points: corners [...,3,2], centres [...,P,2] -> [...,P] bool.

    Inside means the three edge functions share a sign (either winding); degenerate
    triangles cover nothing off their line.
    """
    edges = corners.roll(-1, dims=-2) - corners  # [...,3,2]
    rel = centres.unsqueeze(-2) - corners.unsqueeze(-3)  # [...,P,3,2]
    side = edges[..., None, :, 0] * rel[..., 1] - edges[..., None, :, 1] * rel[..., 0]
    return (side >= 0).all(-1) | (side <= 0).all(-1)


@torch.no_grad()
def mesh_silhouettes(mesh: trimesh.Trimesh, cameras: Cameras, window: int = 4) -> Tensor:
    """Which pixel centres of each camera a mesh covers: [B,H,W] bool (coverage needs no depth test).

    Vertices are projected with the cameras' pinhole model. Each face is tested only
    against the pixel centres in its bounding box: all at once for the many faces whose
    box fits a ``window`` x ``window`` block, one face at a time for the few larger ones.
    The mesh must lie in front of every camera.
    """
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.as_tensor(mesh.faces, dtype=torch.long)
    homogeneous = torch.cat([vertices, torch.ones(len(vertices), 1)], dim=-1)
    camera_points = torch.einsum("bij,nj->bni", cameras.viewmats().float(), homogeneous)[..., :3]  # OpenCV frame
    if bool((camera_points[..., 2] <= 0).any()):
        raise ValueError("mesh_silhouettes: part of the mesh is behind a camera")
    pixels = torch.einsum("bij,bnj->bni", cameras.intrinsics().float(), camera_points)
    pixels = pixels[..., :2] / pixels[..., 2:]  # [B,V,2], pixel (j, i) has its centre at (j + 0.5, i + 0.5)
    H, W = cameras.height, cameras.width
    size = torch.tensor([W, H])
    offsets = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="xy"), -1).reshape(-1, 2)
    covered = torch.zeros(len(cameras), H * W, dtype=torch.bool)
    for b in range(len(cameras)):
        corners = pixels[b][faces]  # [F,3,2]
        first = torch.ceil(corners.amin(1) - 0.5).long().clamp_min(0)  # first pixel whose centre is in the box
        last = torch.floor(corners.amax(1) - 0.5).long().minimum(size - 1)
        small = ((last - first) < window).all(-1)
        candidates = first[small, None, :] + offsets  # [F,window^2,2]
        hit = _covers(corners[small], candidates + 0.5) & (candidates <= last[small, None, :]).all(-1)
        found = candidates[hit]
        covered[b, found[:, 1] * W + found[:, 0]] = True
        for f in (~small).nonzero().squeeze(-1).tolist():
            (x0, y0), (x1, y1) = first[f].tolist(), last[f].tolist()
            ys, xs = torch.meshgrid(torch.arange(y0, y1 + 1), torch.arange(x0, x1 + 1), indexing="ij")
            box = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
            found = box[_covers(corners[f], box + 0.5)]
            covered[b, found[:, 1] * W + found[:, 0]] = True
    return covered.view(len(cameras), H, W)


__all__ = ["MeshError", "SOLID_MODES", "HULL_LEVELS", "extract_mesh", "decimate", "fill_cavities", "fill_from_hull", "hull_cameras", "hull_regions", "render_alphas", "silhouette_level", "visual_hull", "auto_threshold", "cross2", "grid_centres", "mesh_occupancy", "mesh_silhouettes", "sample_grid"]
