"""UV textures for extracted meshes: xatlas unwrap, texel rasterisation, albedo baking, seam dilation.

UVs follow trimesh's (and OBJ's) convention: u to the right, v up, so texel (i, j) of an
[S,S] image (row i from the top) has its centre at u = (j + 0.5) / S, v = 1 - (i + 0.5) / S.
File formats with another convention (glTF's v down) are the exporter's business.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import trimesh
import xatlas
from PIL import Image
from scipy import ndimage
from torch import Tensor

FieldFn = Callable[[Tensor], Tensor]


def cross2(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """z of the cross product of 2D vectors [...,2] -> [...]."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


# Charts whose boundary would grow past this length (world units, the object spans about 1) are
# closed. On the bumpy surface of a trained field xatlas's chart growing is slow for large charts;
# the cap brings the demo's 40k-face unwrap from 13 CPU seconds to 1.1, for a bit less of the
# texture inside charts (42% against 53%; docs/benchmarks.md#textured-export).
MAX_CHART_BOUNDARY = 1.0

# Empty atlas texels between charts; bilinear lookups at a chart's edge then read its own colours.
CHART_PADDING = 2


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A UV atlas of a mesh by xatlas, packed into one square texture.

    Args:
        vertices: [V,3] float. faces: [F,3] int.
        texture_size: the texture's side in texels; the atlas's texel density is chosen to fill it.
    Returns:
        vmapping [V'] (the input vertex each output vertex copies: vertices on a chart seam
        appear once per chart), faces [F,3] into the output vertices (same order as the input
        faces), uv [V',2] in [0,1] (v up).
    """
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_boundary_length = MAX_CHART_BOUNDARY
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = CHART_PADDING
    atlas.generate(charts, pack)
    vmapping, new_faces, uv = atlas[0]
    # xatlas's v runs down the atlas; flipping it mirrors the layout, which keeps every chart apart.
    uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=-1)
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float32)


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int, batch: int = 2**22) -> tuple[np.ndarray, np.ndarray]:
    """Which face covers each texel centre of an [S,S] texture, and where in it.

    Each face is tested against the texel centres in its UV bounding box, as many faces at
    once as have about ``batch`` centres in their boxes together (bounding memory). A centre
    on an edge shared by two faces goes to either; both name the same 3D point.

    Args:
        uv: [V,2] in [0,1] (v up). faces: [F,3] into uv. size: S.
    Returns:
        face [S,S] int64 (-1 where no face covers the centre), barycentric weights [S,S,3] float32
        of the centre in that face's corners (0 where none).
    """
    # texel coordinates (column, row) in which texel centres sit on integers
    corners = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=-1)[faces].astype(np.float64)
    area2 = cross2(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # [F]
    first = np.clip(np.ceil(corners.min(1)), 0, size).astype(np.int64)  # [F,2]
    last = np.clip(np.floor(corners.max(1)), -1, size - 1).astype(np.int64)
    counts = np.where((np.abs(area2) > 1e-12)[:, None], np.clip(last - first + 1, 0, None), 0)
    per_face = counts[:, 0] * counts[:, 1]
    face_map = np.full((size, size), -1, dtype=np.int64)
    bary = np.zeros((size, size, 3), dtype=np.float32)
    starts = np.searchsorted(np.cumsum(per_face), np.arange(0, per_face.sum(), batch), side="right")
    for lo, hi in zip(starts, [*starts[1:], len(faces)]):
        face = lo + np.repeat(np.arange(hi - lo), per_face[lo:hi])
        local = np.arange(len(face)) - np.repeat(np.cumsum(per_face[lo:hi]) - per_face[lo:hi], per_face[lo:hi])
        col = first[face, 0] + local % np.maximum(counts[face, 0], 1)
        row = first[face, 1] + local // np.maximum(counts[face, 0], 1)
        point = np.stack([col, row], axis=-1).astype(np.float64)
        a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
        w1 = cross2(point - a, c - a) / area2[face]
        w2 = cross2(b - a, point - a) / area2[face]
        weights = np.stack([1.0 - w1 - w2, w1, w2], axis=-1)
        hit = (weights >= -1e-9).all(-1)
        face_map[row[hit], col[hit]] = face[hit]
        bary[row[hit], col[hit]] = np.clip(weights[hit], 0.0, 1.0)
    return face_map, bary


@torch.no_grad()
def bake(
    albedo_fn: FieldFn,
    vertices: np.ndarray,
    faces: np.ndarray,
    face_map: np.ndarray,
    bary: np.ndarray,
    chunk: int = 2**18,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The albedo field at each covered texel's 3D point (barycentric in its face's corners).

    Args:
        albedo_fn: points [N,3] -> rgb [N,3] in [0,1], called on ``device`` with at most ``chunk`` points.
        vertices: [V,3]. faces: [F,3]. face_map: [S,S] (-1: empty). bary: [S,S,3] (see ``rasterize_uv``).
    Returns:
        image [S,S,3] float32 in [0,1] (0 on empty texels), mask [S,S] bool (covered texels).
    """
    mask = face_map >= 0
    corners = vertices[faces[face_map[mask]]]  # [N,3,3]
    points = torch.from_numpy(np.einsum("nk,nkd->nd", bary[mask].astype(np.float64), corners).astype(np.float32))
    rgb = torch.cat([albedo_fn(p.to(device)).float().cpu() for p in points.split(chunk)]) if len(points) else torch.zeros(0, 3)
    image = np.zeros((*face_map.shape, 3), dtype=np.float32)
    image[mask] = rgb.clamp(0, 1).numpy()
    return image, mask


def dilate(image: np.ndarray, mask: np.ndarray, pixels: int | None = None) -> np.ndarray:
    """Fills empty texels with the value of their nearest filled texel (Euclidean distance transform).

    Chart borders then continue their own colours outward, so bilinear lookups and coarse
    mip levels, which average texels across a seam, never mix in the empty background.

    Args:
        image: [S,S,C]. mask: [S,S] bool, the filled texels (at least one).
        pixels: fill only texels within this distance of a filled one; None fills every texel.
    Returns:
        [S,S,C], filled texels unchanged.
    """
    distance, (rows, cols) = ndimage.distance_transform_edt(~mask, return_indices=True)
    filled = image[rows, cols]
    if pixels is not None:
        filled[distance > pixels] = image[distance > pixels]
    return filled


def texture_mesh(
    mesh: trimesh.Trimesh,
    albedo_fn: FieldFn,
    texture_size: int,
    chunk: int = 2**18,
    device: torch.device | str = "cpu",
) -> trimesh.Trimesh:
    """The mesh unwrapped (``unwrap``) with the albedo baked into a texture, seams dilated.

    Vertices on chart seams are split (one copy per chart); their normals are the input
    mesh's, so shading stays smooth across seams.

    Args:
        mesh: a closed mesh, world frame. albedo_fn: points [N,3] -> rgb [N,3] in [0,1].
        texture_size: S, the square texture's side in texels.
    Returns:
        A trimesh with ``TextureVisuals``: ``visual.uv`` [V',2] and a matte PBR material named
        "model" whose ``baseColorTexture`` is an RGB [S,S] PIL image.
    """
    normals = mesh.vertex_normals
    vmapping, faces, uv = unwrap(mesh.vertices, mesh.faces, texture_size)
    vertices = mesh.vertices[vmapping]
    face_map, bary = rasterize_uv(uv, faces, texture_size)
    image, mask = bake(albedo_fn, vertices, faces, face_map, bary, chunk, device)
    pixels = (dilate(image, mask) * 255).round().astype(np.uint8)
    material = trimesh.visual.material.PBRMaterial(
        name="model", baseColorTexture=Image.fromarray(pixels), metallicFactor=0.0, roughnessFactor=1.0
    )
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices, faces, vertex_normals=normals[vmapping], visual=visual, process=False)


__all__ = ["CHART_PADDING", "MAX_CHART_BOUNDARY", "bake", "dilate", "rasterize_uv", "texture_mesh", "unwrap"]
