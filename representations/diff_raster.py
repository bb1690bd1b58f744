"""A triangle-mesh renderer differentiable in the vertex positions, in pure PyTorch (CPU and CUDA).

Visibility stays discrete, as in nvdiffrast and pytorch3d: ``mesh_raster.rasterize`` picks each pixel's
face without gradient. Everything after it is recomputed differentiably from the vertex positions:

* ``barycentrics``: the perspective-correct weights of each pixel centre in its face, so colour, normal
  and depth inside a face follow the vertices;
* ``interpolate``: vertex attributes at those weights;
* ``antialias``: nvdiffrast's analytic antialiasing (Laine et al. 2020, "Modular Primitives for
  High-Performance Differentiable Rendering"). Interior gradients cannot move an outline: a pixel's face
  id, and so its coverage, does not change under a small move. Antialiasing blends neighbouring pixels
  across each silhouette edge by where the edge crosses the segment between their centres, a continuous
  function of the edge's projected end points, so the outline (and a silhouette loss on alpha) gets a
  gradient.

``render_mesh`` puts them together: rgb, alpha, depth and normals of a mesh with vertex colours or a
colour field, optionally lit with ``shading.lambert``.

Measured on this repository's 2-core CPU with ``torch.set_num_threads(1)`` (float32, one camera, a
10,400-face UV sphere covering two thirds of the image, ``render_mesh`` with light and normals, then backward
of rgb + alpha + normal_rgb; medians of 7 while another benchmark loaded the machine): 64x64 takes 0.060 s
(0.012 s of it ``rasterize``), 128x128 0.11 s (0.035 s).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.mesh_raster import Fragments, _barycentrics, _project, _ray_lengths, rasterize
from dream3d.representations.shading import LightConfig, lambert

Colour = Tensor | Callable[[Tensor], Tensor]


def _pixel_centres(index: Tensor, width: int, height: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Camera [N] and pixel centre [N,2] (x, y) of flat pixel indices [N] into [B,H,W]."""
    x = (index % width).to(dtype) + 0.5
    y = ((index // width) % height).to(dtype) + 0.5
    return index // (width * height), torch.stack([x, y], -1)


def barycentrics(vertices: Tensor, faces: Tensor, cameras: Cameras, fragments: Fragments) -> Tensor:
    """Perspective-correct barycentric weights [B,H,W,3] of each covered pixel centre in ``fragments.face``,
    differentiable in ``vertices`` [V,3]; 0 where no face covers the pixel.

    faces: [F,3] long; cameras: the B cameras ``fragments`` was rasterized with.
    """
    B, H, W = fragments.face.shape
    pixels, z = _project(vertices, cameras.to(vertices.device))  # [B,V,2], [B,V]
    index = fragments.covered.reshape(-1).nonzero().squeeze(1)
    camera, centre = _pixel_centres(index, W, H, vertices.dtype)
    corners = faces[fragments.face.reshape(-1)[index]]  # [N,3]
    screen, _ = _barycentrics(pixels[camera.unsqueeze(1), corners], centre)
    # weights in screen space over each corner's depth, renormalised: linear in 1/z, as the rasterizer's
    perspective = screen / z[camera.unsqueeze(1), corners]
    perspective = perspective / perspective.sum(-1, keepdim=True)
    out = torch.zeros(B * H * W, 3, dtype=vertices.dtype, device=vertices.device)
    return out.index_put((index,), perspective).view(B, H, W, 3)


def interpolate(attributes: Tensor, faces: Tensor, fragments: Fragments, bary: Tensor) -> Tensor:
    """Vertex attributes [V,C] at each pixel's barycentrics [B,H,W,3] in its face -> [B,H,W,C], 0 where empty;
    differentiable in both."""
    corner = attributes[faces[fragments.face.clamp_min(0)]]  # [B,H,W,3,C]; empty pixels have zero weights
    return (bary.unsqueeze(-1) * corner).sum(-2)


def _silhouette_edges(pixels: Tensor, faces: Tensor) -> Tensor:
    """[B,F,3] bool: edge k of face f (corner k to corner k+1) is a silhouette edge in camera b.

    An edge is one where the mesh folds over in the image: an open edge, or one with another face on the
    same side of it as this face's third corner. Comparing sides of the edge (nvdiffrast's opposite-vertex
    test), not windings, keeps it right for meshes whose winding is inconsistent; counting faces per side
    keeps it defined on non-manifold edges. pixels: [B,V,2] projected vertices; faces: [F,3].
    """
    start, end, opposite = faces, faces.roll(-1, 1), faces.roll(1, 1)
    low, high = torch.minimum(start, end), torch.maximum(start, end)
    _, edge = torch.unique(low * pixels.shape[1] + high, return_inverse=True)  # [F,3] undirected edge ids
    n_edges = int(edge.max()) + 1
    count = torch.bincount(edge.reshape(-1), minlength=n_edges)
    a, b, c = pixels[:, low], pixels[:, high], pixels[:, opposite]  # [B,F,3,2]
    side = ((b - a)[..., 0] * (c - a)[..., 1] - (b - a)[..., 1] * (c - a)[..., 0]) > 0  # [B,F,3]
    flat = edge.reshape(1, -1).expand(len(pixels), -1)
    positive = torch.zeros(len(pixels), n_edges, dtype=count.dtype, device=count.device)
    positive.scatter_add_(1, flat, side.reshape(len(pixels), -1).to(count.dtype))
    positive, total = positive.gather(1, flat).view_as(side), count[edge].expand_as(side)
    same_side = torch.where(side, positive, total - positive)
    return (total == 1) | (same_side >= 2)


def antialias(image: Tensor, fragments: Fragments, vertices: Tensor, faces: Tensor, cameras: Cameras) -> Tensor:
    """nvdiffrast's analytic antialiasing of ``image`` [B,H,W,C] rendered from ``fragments`` -> [B,H,W,C].

    For each horizontally or vertically adjacent pixel pair with different faces, the nearer pixel's face
    (an empty pixel is farthest) is tested for a silhouette edge crossing the segment between the two
    centres, at fraction t from the nearer centre. Each pixel is taken as a unit box across the segment:
    if t < 1/2 the nearer pixel is uncovered past the edge and takes (1/2 - t) of the other's colour, else
    the farther pixel is covered up to it and takes (t - 1/2) of the nearer's. All pairs read the input
    image and their changes add up. Differentiable in ``image`` and, through t, in ``vertices`` [V,3].
    faces: [F,3] long; cameras: the B cameras ``fragments`` was rasterized with.
    """
    B, H, W, C = image.shape
    cameras = cameras.to(vertices.device)
    pixels, _ = _project(vertices, cameras)  # [B,V,2]
    silhouette = _silhouette_edges(pixels.detach(), faces)
    face = fragments.face.reshape(-1)
    z = (fragments.depth / _ray_lengths(cameras).to(fragments.depth)).reshape(-1)  # camera-space depth
    grid = torch.arange(B * H * W, device=face.device).view(B, H, W)
    first = torch.cat([grid[:, :, :-1].reshape(-1), grid[:, :-1, :].reshape(-1)])
    second = torch.cat([grid[:, :, 1:].reshape(-1), grid[:, 1:, :].reshape(-1)])
    vertical = torch.cat([torch.zeros(B * H * (W - 1), dtype=torch.bool, device=face.device),
                          torch.ones(B * (H - 1) * W, dtype=torch.bool, device=face.device)])
    differ = face[first] != face[second]
    first, second, vertical = first[differ], second[differ], vertical[differ]
    first_nearer = (face[first] >= 0) & ((face[second] < 0) | (z[first] <= z[second]))
    near = torch.where(first_nearer, first, second)
    far = torch.where(first_nearer, second, first)
    camera, centre = _pixel_centres(near, W, H, pixels.dtype)
    step = torch.where(first_nearer, 1.0, -1.0).to(pixels.dtype)  # the far centre is centre + step along the axis
    # relative to the near centre, with x and y swapped for vertical pairs: the pair's axis is x, across it y
    ends = pixels[camera.unsqueeze(1), faces[face[near]]] - centre.unsqueeze(1)  # [N,3,2]
    ends = torch.stack([ends, ends.roll(-1, 1)], -2)  # [N,3 edges,2 ends,2]
    ends = torch.where(vertical.view(-1, 1, 1, 1), ends.flip(-1), ends)
    with torch.no_grad():
        x, y = ends.unbind(-1)  # [N,3,2]
        straddles = (y[..., 0] < 0) != (y[..., 1] < 0)
        slope = (x[..., 1] - x[..., 0]) / torch.where(straddles, y[..., 1] - y[..., 0], torch.ones_like(y[..., 0]))
        t = (x[..., 0] - y[..., 0] * slope) * step.unsqueeze(1)
        edges = torch.arange(3, device=face.device)
        crosses = straddles & (t >= 0) & (t <= 1) & silhouette[camera.unsqueeze(1), face[near].unsqueeze(1), edges]
        keep = crosses.any(-1)
        edge = crosses.int().argmax(-1)  # a segment leaving a triangle crosses one edge; a corner hit picks one
    near, far, step = near[keep], far[keep], step[keep]
    chosen = ends[keep, edge[keep]]  # [M,2 ends,2], differentiable
    x0, y0, x1, y1 = chosen[:, 0, 0], chosen[:, 0, 1], chosen[:, 1, 0], chosen[:, 1, 1]
    t = (x0 - y0 * (x1 - x0) / (y1 - y0)) * step
    into_far = t > 0.5
    target = torch.where(into_far, far, near)
    source = torch.where(into_far, near, far)
    flat = image.reshape(-1, C)
    change = (t - 0.5).abs().unsqueeze(-1).to(image.dtype) * (flat[source] - flat[target])
    return flat.index_add(0, target, change).view(B, H, W, C)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals [V,3] of vertices [V,3], faces [F,3] (outward for an outward mesh)."""
    corners = vertices[faces]
    weighted = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # |n| = 2 area
    summed = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), weighted.repeat_interleave(3, 0))
    return F.normalize(summed, dim=-1)


def render_mesh(vertices: Tensor, faces: Tensor, cameras: Cameras, background: Tensor, colour: Colour,
                light: LightConfig | None = None, with_normals: bool = False) -> RenderOutput:
    """Renders a mesh, differentiably in ``vertices`` (inside faces and, by ``antialias``, at silhouettes).

    Args:
        vertices: [V,3] world positions. faces: [F,3] long, wound outward (the normals' direction).
        cameras: B cameras of H x W pixels. background: [3] in [0,1].
        colour: vertex colours [V,3], or a field mapping world points [N,3] to colours [N,3] in [0,1],
            evaluated at each covered pixel's surface point.
        light: shade the colour as albedo with ``lambert`` at the pixel's normal.
        with_normals: also return ``normal``.
    Returns:
        ``RenderOutput`` with rgb [B,H,W,3] over the background and alpha [B,H,W,1], both antialiased;
        depth [B,H,W,1] along the unit ray (0 where empty, not antialiased); with ``with_normals``, normal
        [B,H,W,3]: world-space unit normals weighted by the antialiased coverage, as a NeRF's accumulated
        normals are; extras["normal_rgb"] [B,H,W,3]: (normal + 1) / 2 over the background, antialiased.

    Normals are the interpolated area-weighted vertex normals (nvdiffrec's and Fantasia3D's choice), not the
    face normals: a DMTet mesh's facets are an artefact of its grid, and a prior shown faceted normal maps
    reads them as surface detail; smooth normals also spread the gradient over all three corners.
    """
    cameras = cameras.to(vertices.device)
    background = background.to(vertices)
    fragments = rasterize(vertices.detach(), faces, cameras)
    bary = barycentrics(vertices, faces, cameras, fragments)
    covered = fragments.covered.unsqueeze(-1)
    alpha = covered.to(vertices.dtype)
    points = interpolate(vertices, faces, fragments, bary)  # [B,H,W,3]
    if callable(colour):
        index = covered.reshape(-1).nonzero().squeeze(1)
        values = colour(points.reshape(-1, 3)[index]).to(vertices.dtype)
        albedo = torch.zeros_like(points).reshape(-1, 3).index_put((index,), values).view_as(points)
    else:
        albedo = interpolate(colour.to(vertices), faces, fragments, bary)
    normals = None
    if light is not None or with_normals:
        normals = F.normalize(interpolate(vertex_normals(vertices, faces), faces, fragments, bary), dim=-1)
    shaded = lambert(albedo, normals, light) if light is not None else albedo
    layers = [shaded * alpha + background * (1 - alpha), alpha]
    if with_normals:
        layers += [normals, (normals + 1) / 2 * alpha + background * (1 - alpha)]
    smooth = antialias(torch.cat(layers, -1), fragments, vertices, faces, cameras)
    origin = cameras.c2w[:, :3, 3].to(vertices).view(-1, 1, 1, 3)
    depth = torch.where(covered, (points - origin).norm(dim=-1, keepdim=True), torch.zeros_like(alpha))
    out = RenderOutput(rgb=smooth[..., :3], alpha=smooth[..., 3:4], depth=depth)
    if with_normals:
        out.normal = smooth[..., 4:7]
        out.extras["normal_rgb"] = smooth[..., 7:10]
    return out


__all__ = ["antialias", "barycentrics", "interpolate", "render_mesh", "vertex_normals"]
