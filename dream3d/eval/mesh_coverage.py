"""Which grid cells a mesh encloses and which pixels it covers: the evaluator's view of an exported mesh."""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from torch import Tensor

from dream3d.representations.cameras import Cameras
from dream3d.representations.texture import cross2


def grid_centres(resolution: int, bound: float) -> np.ndarray:
    """Cell centres of a ``resolution``-cell axis over [-bound, bound]: [R] (float64)."""
    step = 2 * bound / resolution
    return -bound + (np.arange(resolution) + 0.5) * step


# Rays are nudged off the cell centres by an irrational fraction of a cell so that none runs exactly
# along a mesh edge or through a vertex (where two faces would both count, or neither).
_RAY_NUDGE = np.array([np.sqrt(2.0) - 1.0, np.sqrt(3.0) - 1.0]) * 1e-4


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
