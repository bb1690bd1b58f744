"""A triangle-mesh rasterizer in PyTorch: visibility without gradient, the texture lookup differentiable.

``rasterize`` finds, for every pixel centre, the nearest face that covers it (a depth test over all
faces, no gradient) and the pixel's perspective-correct barycentric weights in that face.
``render_textured`` then samples a UV texture there with bilinear ``grid_sample``, so the gradient of
anything computed from the image reaches the texels, and only the texels that some visible pixel samples.

Projection is the cameras' own pinhole model (``Cameras.viewmats``, ``Cameras.intrinsics``): pixel
(j, i) has its centre at (j + 0.5, i + 0.5), as ``Cameras.rays`` and ``mesh_silhouettes`` have it.
Faces with a corner at or behind the near plane are skipped (dream3d's cameras orbit the object from
outside it). No face culling: a closed mesh's back faces lose the depth test anyway.

UV convention (OBJ, glTF after its flip, trimesh's ``TextureVisuals``): (0, 0) is the image's
bottom-left corner, v grows upward, and the texture is stored top row first ([H,W,3], as a PIL image).
Every tensor is created on the inputs' device: the same code runs on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.shading import LightConfig, lambert

NEAR = 1e-3  # camera-space depth below which a face counts as behind the camera
MAX_PAIRS = 1 << 20  # (face, pixel) candidates tested at once: bounds the rasterizer's memory (~100 MB)


@dataclass
class Fragments:
    """What ``rasterize`` finds per pixel: ``face`` [B,H,W] long (-1 where empty), ``bary`` [B,H,W,3]
    perspective-correct barycentric weights (0 where empty), ``depth`` [B,H,W] distance along the unit ray
    through the pixel centre (0 where empty), as ``RenderOutput.depth``."""

    face: Tensor
    bary: Tensor
    depth: Tensor

    @property
    def covered(self) -> Tensor:
        """[B,H,W] bool: a face covers the pixel."""
        return self.face >= 0


def _project(vertices: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor]:
    """vertices [V,3] -> (pixel coordinates [B,V,2], camera-space depth [B,V]) in the OpenCV frame."""
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1)
    camera_points = torch.einsum("bij,nj->bni", cameras.viewmats().to(vertices), homogeneous)[..., :3]
    z = camera_points[..., 2]
    pixels = torch.einsum("bij,bnj->bni", cameras.intrinsics().to(vertices), camera_points)
    return pixels[..., :2] / z.clamp_min(NEAR).unsqueeze(-1), z


def _candidate_boxes(corners: Tensor, z: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per (camera, face): the first pixel [B,F,2] of its bounding box, the box size [B,F,2] and its pixel count [B,F]
    (0 for faces off-screen or with a corner behind the camera)."""
    size = torch.tensor([width, height], device=corners.device)
    first = torch.ceil(corners.amin(-2) - 0.5).long().clamp_min(0)  # first pixel whose centre is in the box
    last = torch.floor(corners.amax(-2) - 0.5).long().minimum(size - 1)
    extent = (last - first + 1).clamp_min(0)
    count = extent[..., 0] * extent[..., 1]
    return first, extent, torch.where((z > NEAR).all(-1), count, torch.zeros_like(count))


def _chunks(count: Tensor, limit: int) -> list[tuple[int, int]]:
    """Ranges [start, end) of flat (camera, face) entries whose candidate pixels sum to at most ``limit``
    (a single entry over the limit gets a range of its own)."""
    ends = torch.cumsum(count, 0)
    ranges, start, total = [], 0, len(count)
    while start < total:
        base = int(ends[start - 1]) if start else 0
        end = int(torch.searchsorted(ends, base + limit, right=True))
        end = max(end, start + 1)
        ranges.append((start, min(end, total)))
        start = end
    return ranges


@torch.no_grad()
def rasterize(vertices: Tensor, faces: Tensor, cameras: Cameras, max_pairs: int = MAX_PAIRS) -> Fragments:
    """The nearest face at each pixel centre of each camera, by a depth test (no gradient).

    Args:
        vertices: [V,3] world positions. faces: [F,3] vertex indices. cameras: B cameras of H x W pixels.
        max_pairs: (face, pixel) candidates tested at once; memory is proportional to it.
    Returns:
        ``Fragments`` of [B,H,W] faces, [B,H,W,3] barycentrics and [B,H,W] depths.
    """
    B, H, W, device = len(cameras), cameras.height, cameras.width, vertices.device
    pixels, z = _project(vertices.float(), cameras)
    corners, corner_z = pixels[:, faces], z[:, faces]  # [B,F,3,2], [B,F,3]
    first, extent, count = _candidate_boxes(corners, corner_z, W, H)
    n_faces = faces.shape[0]
    best_z = torch.full((B * H * W,), float("inf"), device=device)
    best_face = torch.full((B * H * W,), -1, dtype=torch.long, device=device)
    best_bary = torch.zeros(B * H * W, 3, device=device)
    count, first, extent = count.reshape(-1), first.reshape(-1, 2), extent.reshape(-1, 2)
    corners, corner_z = corners.reshape(-1, 3, 2), corner_z.reshape(-1, 3)
    for start, end in _chunks(count, max_pairs):
        n = count[start:end]
        entry = start + torch.repeat_interleave(torch.arange(end - start, device=device), n)
        local = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        columns = extent[entry, 0].clamp_min(1)
        px = first[entry, 0] + local % columns
        py = first[entry, 1] + local // columns
        bary, inside = _barycentrics(corners[entry], torch.stack([px, py], -1).float() + 0.5)
        # perspective-correct weights: screen-space weights over each corner's depth, renormalised
        inv = bary / corner_z[entry]
        depth = 1 / inv.sum(-1)
        keep = inside & (depth > NEAR)
        entry, px, py, depth, bary = entry[keep], px[keep], py[keep], depth[keep], (inv * depth.unsqueeze(-1))[keep]
        pixel = (entry // n_faces) * H * W + py * W + px
        best_z.scatter_reduce_(0, pixel, depth, reduce="amin")
        won = _one_per_pixel(pixel, depth <= best_z[pixel], B * H * W)
        best_face[pixel[won]] = entry[won] % n_faces
        best_bary[pixel[won]] = bary[won]
    empty = best_face < 0
    best_z = torch.where(empty, torch.zeros_like(best_z), best_z * _ray_lengths(cameras).reshape(-1))
    return Fragments(best_face.view(B, H, W), best_bary.view(B, H, W, 3), best_z.view(B, H, W))


def _one_per_pixel(pixel: Tensor, nearest: Tensor, pixels: int) -> Tensor:
    """[N] bool: of the candidates at their pixel's nearest depth (``nearest``), the last one per pixel, so that
    face and barycentrics come from one candidate (faces meeting at an edge tie; indexed writes of duplicates
    would pick an arbitrary one per tensor on CUDA)."""
    order = torch.arange(len(pixel), device=pixel.device)
    last = torch.full((pixels,), -1, dtype=torch.long, device=pixel.device)
    last.scatter_reduce_(0, pixel[nearest], order[nearest], reduce="amax")
    return nearest & (last[pixel] == order)


def _ray_lengths(cameras: Cameras) -> Tensor:
    """[B,H,W] length of the ray through each pixel centre per unit of camera-space depth."""
    K = cameras.intrinsics()
    j = torch.arange(cameras.width, dtype=K.dtype, device=K.device) + 0.5
    i = torch.arange(cameras.height, dtype=K.dtype, device=K.device) + 0.5
    x = (j.view(1, 1, -1) - K[:, 0, 2].view(-1, 1, 1)) / K[:, 0, 0].view(-1, 1, 1)
    y = (i.view(1, -1, 1) - K[:, 1, 2].view(-1, 1, 1)) / K[:, 1, 1].view(-1, 1, 1)
    return torch.sqrt(1 + x**2 + y**2)


def _barycentrics(corners: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Screen-space barycentric weights of points [N,2] in triangles [N,3,2]: ([N,3], inside [N] bool).
    Either winding counts; degenerate triangles cover nothing."""
    a, b, c = corners.unbind(-2)
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    safe = torch.where(area.abs() > 1e-12, area, torch.ones_like(area))
    w1 = ((points[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (points[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])) / safe
    w2 = ((b[:, 0] - a[:, 0]) * (points[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (points[:, 0] - a[:, 0])) / safe
    bary = torch.stack([1 - w1 - w2, w1, w2], -1)
    return bary, (bary >= 0).all(-1) & (area.abs() > 1e-12)


def face_uvs(faces: Tensor, uv: Tensor) -> Tensor:
    """UVs per face corner [F,3,2] from per-vertex UVs [V,2] (indexed by ``faces``) or per-corner UVs [F,3,2]."""
    return uv if uv.dim() == 3 else uv[faces]


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of texture [H,W,3] at uv [N,2] (OBJ convention, v up) -> [N,3], differentiable w.r.t. the texture.
    UVs outside [0,1] clamp to the border texels."""
    grid = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], -1).view(1, 1, -1, 2)
    image = texture.permute(2, 0, 1).unsqueeze(0)  # [1,3,H,W]
    return F.grid_sample(image, grid.to(image), mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def shade_fragments(fragments: Fragments, faces: Tensor, uv: Tensor, texture: Tensor, background: Tensor,
                    normals: Tensor | None = None, light: LightConfig | None = None) -> RenderOutput:
    """Textured image of rasterized fragments over ``background`` [3]: rgb [B,H,W,3], alpha [B,H,W,1], depth [B,H,W,1].
    With ``light`` the texture is albedo, lit at each pixel's face normal (``normals`` [F,3], unit, outward)."""
    covered = fragments.covered
    corner_uv = face_uvs(faces, uv).to(texture)
    hit_face = fragments.face[covered]
    pixel_uv = (fragments.bary[covered].unsqueeze(-1) * corner_uv[hit_face]).sum(-2)  # [N,2]
    colours = sample_texture(texture, pixel_uv)
    if light is not None:
        colours = lambert(colours, normals[hit_face].to(colours), light)
    rgb = background.to(texture).expand(*covered.shape, 3).clone()
    rgb[covered] = colours.to(rgb.dtype)
    alpha = covered.unsqueeze(-1).to(texture.dtype)
    return RenderOutput(rgb=rgb, alpha=alpha, depth=fragments.depth.unsqueeze(-1).to(texture.dtype))


def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit normals [F,3] of the faces [F,3] of vertices [V,3], by the right-hand rule (outward for an outward mesh)."""
    corners = vertices[faces]
    return F.normalize(torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), dim=-1)


def render_textured(vertices: Tensor, faces: Tensor, uv: Tensor, texture: Tensor, cameras: Cameras,
                    background: Tensor, light: LightConfig | None = None) -> RenderOutput:
    """Renders a UV-textured mesh: visibility by ``rasterize`` (no gradient), colour by ``sample_texture``.

    Args:
        vertices [V,3], faces [F,3] long, uv [V,2] or [F,3,2], texture [Ht,Wt,3] in [0,1], background [3];
        cameras: B cameras of H x W pixels; light: render the texture as albedo lit by it (flat, per face).
    Returns:
        ``RenderOutput`` with rgb [B,H,W,3] (texture over background), alpha [B,H,W,1] (1 where a face covers
        the pixel centre) and depth [B,H,W,1] (along the unit ray, 0 where empty); the gradient of rgb reaches
        ``texture``.
    """
    fragments = rasterize(vertices, faces, cameras.to(vertices.device))
    normals = face_normals(vertices, faces) if light is not None else None
    return shade_fragments(fragments, faces, uv, texture, background, normals, light)


__all__ = ["Fragments", "face_normals", "face_uvs", "rasterize", "render_textured", "sample_texture", "shade_fragments"]
