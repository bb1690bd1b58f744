"""Toy-world evaluation: how close is an optimised object to the prompt's ground truth?

The result is rendered from 8 azimuths x 2 elevations and compared with the toy
world rendered from the same cameras:
- silhouette IoU (alpha > 0.5 against the true mask), summed over the 16 views and
  maximised over the prompt's classes and a rotation about z (a view-agnostic prior
  does not fix the azimuth), searched in 5 degree steps;
- colour error: mean absolute RGB difference on pixels that both masks cover;
- R-precision: the fraction of views whose nearest (L2 over RGB) ground-truth class,
  among all 36 at the same camera and rotation, is one the prompt names;
- two view-consistency (Janus) measures: ``janus``, the fraction of opposite view pairs
  (azimuths 180 degrees apart, same elevation) whose nearest classes differ, and
  ``view_iou_spread``, the best view's silhouette IoU minus the worst's. An object that is
  the prompt from the front and something else from the back scores high on both.

``mesh_iou`` checks the export instead: the exported mesh's silhouettes against the
representation's own renders (alpha > 0.5) from the same 16 views. Silhouettes cannot
see inside, so ``evaluate_mesh_3d`` measures the mesh in 3D against the toy world's
solid (the inside of the shape's signed distance function): volumetric IoU on a grid,
maximised over the prompt's shapes and a rotation about z, plus watertightness, the
number of connected components and the volume ratio, and the normal error: the angle between
the mesh's face normals and the shape's true normals at the nearest surface point, which sees
rounded edges and bumps that barely move the volume IoU.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import trimesh
from torch import Tensor

from dream3d.eval.mesh_coverage import grid_centres, mesh_occupancy, mesh_silhouettes
from dream3d.guidance.priors.toy_world import (
    ALBEDOS, CLASS_SHAPE, CLASSES, SDFS, SHAPES, composite, mask_iou, parse_prompt, render_shapes, world_cameras,
)
from dream3d.representations.cameras import Cameras
from dream3d.representations.base import Representation
from dream3d.representations.mesh_raster import sample_texture

EVAL_AZIMUTHS = 8
EVAL_ELEVATIONS = (0.0, 30.0)
ROTATION_STEP = 5.0  # degrees
EVAL_RESOLUTION = 64
VOLUME_RESOLUTION = 64  # cells per axis of the 3D measure's grid over [-VOLUME_BOUND, VOLUME_BOUND]^3
VOLUME_BOUND = 1.0  # the export's box
NORMAL_SAMPLES = 20000  # surface points of the normal error; its mean varies by ~0.1 degree between seeds
NORMAL_PROJECTIONS = 3  # steps p <- p - sdf(p) grad sdf(p); the toy SDFs are exact, so one lands on the surface
NORMAL_H = 1e-4  # central-difference step of the SDF's gradient (world units)


def eval_cameras(azimuth_offset: float = 0.0, resolution: int = EVAL_RESOLUTION) -> Cameras:
    """The 16 evaluation views (elevation-major), azimuths k*45 + offset degrees."""
    azimuth = torch.arange(EVAL_AZIMUTHS, dtype=torch.float32) * 360 / EVAL_AZIMUTHS + azimuth_offset
    elevation = torch.tensor(EVAL_ELEVATIONS).repeat_interleave(EVAL_AZIMUTHS)
    azimuth = azimuth.repeat(len(EVAL_ELEVATIONS))
    return world_cameras(elevation, azimuth, resolution)


def pooled_iou(a: Tensor, b: Tensor) -> float:
    """IoU of two bool masks of any shape, pooled over every element (all views or cells together)."""
    return float(mask_iou(a.unsqueeze(0), b.unsqueeze(0))[0])


def _shift_views(x: Tensor, shift: int) -> Tensor:
    """Ground truth at azimuth index k + shift for each evaluation view k: [16, ...] -> [16, ...]."""
    x = x.view(len(EVAL_ELEVATIONS), EVAL_AZIMUTHS, *x.shape[1:])
    return torch.roll(x, -shift, dims=1).reshape(-1, *x.shape[2:])


def evaluate_renders(rgb: Tensor, alpha: Tensor, prompt: str) -> dict[str, float | str]:
    """Scores renders of the 16 ``eval_cameras()`` views (rgb [16,H,W,3], alpha [16,H,W,1]) against the prompt."""
    targets = parse_prompt(prompt)
    resolution = rgb.shape[1]
    views = EVAL_AZIMUTHS * len(EVAL_ELEVATIONS)
    pred_mask = alpha[..., 0] > 0.5
    # A rotation rho = offset + 45*shift about z maps view k onto ground truth rendered at
    # azimuth index k + shift with that offset, so offsets in [0, 45) cover every rotation.
    # Colour does not change a silhouette, so the search renders each target shape once.
    target_shapes = sorted({int(CLASS_SHAPE[c]) for c in targets})
    best = (-1.0, 0, 0.0, 0)
    for offset in torch.arange(0, 360 / EVAL_AZIMUTHS, ROTATION_STEP).tolist():
        masks = _ground_truth(offset, resolution, tuple(target_shapes))["mask"][..., 0] > 0.5  # [shapes, 16, H, W]
        for i, shape in enumerate(target_shapes):
            for shift in range(EVAL_AZIMUTHS):
                true_mask = _shift_views(masks[i], shift)
                iou = pooled_iou(pred_mask, true_mask)
                if iou > best[0]:
                    best = (iou, shape, offset, shift)
    iou, shape, offset, shift = best
    truth = _ground_truth(offset, resolution, tuple(range(len(SHAPES))))
    mask, shade = (torch.stack([_shift_views(x, shift) for x in truth[k]]) for k in ("mask", "shade"))
    truth_rgb = composite(mask[CLASS_SHAPE], shade[CLASS_SHAPE], ALBEDOS.view(-1, 1, 1, 1, 3))  # [36,16,H,W,3]
    # of the prompt's classes with the best shape, the one whose colour is closest
    candidates = [c for c in targets if int(CLASS_SHAPE[c]) == shape]
    both = pred_mask & (mask[shape, ..., 0] > 0.5)
    errors = {c: float((rgb - truth_rgb[c]).abs().mean(-1)[both].mean()) if both.any() else 1.0 for c in candidates}
    target = min(errors, key=errors.get)
    nearest = ((truth_rgb - rgb.unsqueeze(0)) ** 2).flatten(2).sum(-1).argmin(0)  # [16]
    r_precision = sum(int(c) in targets for c in nearest) / views
    per_view_iou = mask_iou(pred_mask, mask[shape, ..., 0] > 0.5)  # [16]
    return {
        "iou": iou,
        "r_precision": r_precision,
        "colour_error": errors[target],
        "matched_class": CLASSES[target].name,
        "rotation_deg": (offset + shift * 360 / EVAL_AZIMUTHS) % 360,
        "janus": janus_rate(nearest),
        "view_iou_spread": float(per_view_iou.max() - per_view_iou.min()),
    }


def janus_rate(nearest: Tensor) -> float:
    """Fraction of opposite view pairs whose nearest classes differ: nearest [16] class indices of the
    evaluation views (elevation-major). Each of the 8 pairs is azimuth k and k + 180 degrees at one elevation."""
    by_view = nearest.view(len(EVAL_ELEVATIONS), EVAL_AZIMUTHS)
    half = EVAL_AZIMUTHS // 2
    return float((by_view[:, :half] != by_view[:, half:]).float().mean())


@functools.lru_cache(maxsize=32)
def _ground_truth(offset: float, resolution: int, shapes: tuple[int, ...]) -> dict[str, Tensor]:
    """``_render`` of the evaluation views at an azimuth offset, cached: every run and particle a
    process scores (the benchmarks score many) needs the same few renders. Callers must not modify them."""
    return _render(eval_cameras(offset, resolution), list(shapes))


def _render(cameras: Cameras, shapes: list[int]) -> dict[str, Tensor]:
    """Ground truth of each shape from every camera: dict of [len(shapes), B, H, W, 1]."""
    out = render_shapes(Cameras.cat([cameras] * len(shapes)), [s for s in shapes for _ in range(len(cameras))])
    return {k: v.view(len(shapes), len(cameras), *v.shape[1:]) for k, v in out.items()}


@torch.no_grad()
def evaluate_representation(representation: Representation, prompt: str, background: Tensor) -> dict[str, float | str]:
    """Renders the representation from the evaluation views and scores it against the prompt."""
    out = representation.render(eval_cameras(), background)
    return evaluate_renders(out.rgb, out.alpha, prompt)


@torch.no_grad()
def mesh_iou(mesh: trimesh.Trimesh, representation: Representation, background: Tensor) -> float:
    """Silhouette IoU of a mesh (world frame, +z up) against the representation's renders, over the 16 views."""
    cameras = eval_cameras()
    rendered = representation.render(cameras, background).alpha[..., 0] > 0.5
    meshed = mesh_silhouettes(mesh, cameras)
    return pooled_iou(rendered, meshed)


def _unturn(points: Tensor, rotation_deg: float) -> Tensor:
    """R(-rotation) about z of points or directions [..., 3]: the world frame -> the toy shape's own frame."""
    angle = math.radians(rotation_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = points[..., 0], points[..., 1]
    return torch.stack([cos * x + sin * y, -sin * x + cos * y, points[..., 2]], -1)


def _shape_sdf(shape: int, rotation_deg: float, resolution: int, bound: float) -> Tensor:
    """Signed distance of the toy shape turned by ``rotation_deg`` about z at the grid's cell centres: [R,R,R].

    A cell centre p is inside the turned shape when R(-rotation) p is inside the shape.
    """
    axis = torch.from_numpy(grid_centres(resolution, bound)).float()
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)  # [R,R,R,3]
    return SDFS[SHAPES[shape]](_unturn(points, rotation_deg))


def _sdf_gradient(sdf: Callable[[Tensor], Tensor], points: Tensor, h: float = NORMAL_H) -> Tensor:
    """Central differences of an SDF at points [N,3] -> [N,3]. Unlike autograd they see both sides of a crease:
    on a cube's edge they give the diagonal, where the clamps of the closed form give one face's normal or zero."""
    offsets = h * torch.eye(3, dtype=points.dtype)
    ahead, behind = (sdf(points[:, None] + sign * offsets) for sign in (1, -1))  # [N,3]
    return (ahead - behind) / (2 * h)


def normal_errors(mesh: trimesh.Trimesh, shape: int, rotation_deg: float, samples: int = NORMAL_SAMPLES,
                  seed: int = 0) -> Tensor:
    """Angles (degrees) between the mesh's face normals and the toy shape's true normals: [samples].

    Points are drawn on the mesh surface by area (``seed`` fixes them); each is projected onto the shape turned
    by ``rotation_deg`` about z, and its face's normal is compared with the shape's normal there (the normalised
    SDF gradient). An inverted face scores near 180.

    Args:
        mesh: world frame, +z up, faces wound outward. shape: index into SHAPES.
    """
    sdf = SDFS[SHAPES[shape]]
    points, faces = trimesh.sample.sample_surface(mesh, samples, seed=seed)
    # float64: the central differences subtract distances that agree to ~1e-4
    p = _unturn(torch.from_numpy(np.asarray(points, dtype=np.float64)), rotation_deg)
    # from the corners, not trimesh's cached face_normals, which Trimesh.invert leaves stale (trimesh 5.2)
    corners = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)[faces]]  # [S,3,3]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = torch.nn.functional.normalize(_unturn(torch.from_numpy(cross), rotation_deg), dim=-1)
    for _ in range(NORMAL_PROJECTIONS):
        p = p - sdf(p)[:, None] * torch.nn.functional.normalize(_sdf_gradient(sdf, p), dim=-1)
    truth = torch.nn.functional.normalize(_sdf_gradient(sdf, p), dim=-1)
    return torch.rad2deg(torch.acos((normals * truth).sum(-1).clamp(-1, 1))).float()


def solid_occupancy(shape: int, rotation_deg: float, resolution: int = VOLUME_RESOLUTION,
                    bound: float = VOLUME_BOUND) -> Tensor:
    """The toy shape turned by ``rotation_deg`` about z, as grid cells: [R,R,R] bool, inside where its SDF < 0."""
    return _shape_sdf(shape, rotation_deg, resolution, bound) < 0


@functools.lru_cache(maxsize=len(SHAPES))
def solid_volume(shape: int, resolution: int = 2 * VOLUME_RESOLUTION, bound: float = VOLUME_BOUND) -> float:
    """Volume of a toy shape in world units, from the fraction of each cell inside it.

    A cell whose centre lies at signed distance d from a locally flat surface is
    clamp(1/2 - d/h) inside (h the cell size), which is exact for the cube's faces where
    counting centres would be off by up to half a cell per face.
    """
    step = 2 * bound / resolution
    fraction = (0.5 - _shape_sdf(shape, 0.0, resolution, bound) / step).clamp(0, 1)
    return float(fraction.double().sum()) * step**3


def evaluate_mesh_3d(mesh: trimesh.Trimesh, prompt: str, resolution: int = VOLUME_RESOLUTION) -> dict[str, float | int | bool]:
    """Scores a mesh (world frame, +z up) as a solid against the prompt's toy shapes.

    Returns ``volume_iou`` (cells inside the mesh, by winding number, against cells inside
    the shape; best over the prompt's shapes and rotations about z in ROTATION_STEP steps),
    ``volume_ratio`` (the mesh's signed volume over the matched shape's, both in world units;
    a shell or an inverted inner wall makes it small), ``watertight`` and ``components``
    (connected pieces of the mesh), and ``normal_error_deg`` and ``normal_error_median_deg``: the mean and
    median of ``normal_errors`` against the matched shape at the matched rotation (so up to about
    ROTATION_STEP / 2 of a side face's error is the rotation search's step, not the mesh).
    """
    inside = torch.from_numpy(mesh_occupancy(mesh, resolution, VOLUME_BOUND))
    best = (-1.0, 0, 0.0)
    for shape in sorted({int(CLASS_SHAPE[c]) for c in parse_prompt(prompt)}):
        for rotation in np.arange(0.0, 360.0, ROTATION_STEP).tolist():
            truth = solid_occupancy(shape, rotation, resolution)
            iou = pooled_iou(inside, truth)
            if iou > best[0]:
                best = (iou, shape, rotation)
    iou, shape, rotation = best
    angles = normal_errors(mesh, shape, rotation)
    return {
        "volume_iou": iou,
        "volume_ratio": float(mesh.volume) / solid_volume(shape),
        "watertight": bool(mesh.is_watertight),
        "components": len(mesh.split(only_watertight=False)),
        "normal_error_deg": float(angles.mean()),
        "normal_error_median_deg": float(angles.median()),
    }


def albedo_error(mesh: trimesh.Trimesh, texture: np.ndarray, prompt: str) -> float:
    """How far an asset's base colour is from its object's own: the mean absolute difference (per channel,
    weighted by face area) between the texture at each face's UV centroid and the nearest albedo among the
    prompt's classes. A texture with the light baked in (radiance, darker on the sides) scores worse than the
    albedo, which a viewer lights itself.

    Args:
        mesh: UV-mapped (``mesh.visual.uv`` [V,2] in OBJ's convention, before any vertex merge).
        texture: [H,W,3] uint8 (top row first).
    """
    uv = torch.as_tensor(np.asarray(mesh.visual.uv), dtype=torch.float32)[torch.as_tensor(mesh.faces)].mean(1)
    colours = sample_texture(torch.from_numpy(np.asarray(texture, dtype=np.float32) / 255), uv)  # [F,3]
    albedos = ALBEDOS[parse_prompt(prompt)]  # [K,3]
    error = (colours[:, None] - albedos[None]).abs().mean(-1).amin(1)  # [F]
    area = torch.tensor(mesh.area_faces, dtype=torch.float32)
    return float((error * area).sum() / area.sum())

