"""DMTet: an SDF and per-vertex deformations on a tetrahedral grid, rendered as the mesh marching tets extracts.

The geometry-refinement representation of Magic3D, ProlificDreamer's stage 2 and Fantasia3D (threestudio's
``tetrahedra-sdf-grid``). Each render extracts the surface of the SDF over the deformed grid
(``representations/tets.py``) and rasterizes it; the gradient of the image reaches the SDF and the
deformations through the surface vertices' positions (the linear zero crossings).

- Grid: ``tet_grid(resolution, radius)``, a cube lattice split into six tets per cube, so its vertices are
  also a dense [R+1]^3 grid: the SDF is trilinearly interpolated from it for ``density`` (the export).
- Deformation: each vertex moves by tanh(d) times half a cell along each axis (DMTet's bound), so the grid
  keeps its connectivity while the surface gains sub-cell detail.
- Colour: an albedo field, a dense [3,A,A,A] grid of logits over the cube sampled trilinearly at the
  surface points (``albedo_resolution`` A), the NeRF's dense-grid encoding with one level and no density.
- ``geometry_only``: the rgb given to the guidance is the normal render, (n + 1) / 2 over the background,
  as ProlificDreamer's geometry stage and Fantasia3D's; with ``shading="lambert"`` the albedo is lit by
  ``light`` (Magic3D).

``render`` puts the mesh regularisers in ``RenderOutput.extras`` for the loop to weight:
``normal_consistency`` and ``laplacian_smoothness`` (see their functions).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from pydantic import ConfigDict, Field
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree
from torch import Tensor

from dream3d.representations.base import Representation, RepresentationConfig
from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.marching_cubes import auto_threshold
from dream3d.representations.mesh_extraction import extract_mesh
from dream3d.representations.diff_raster import render_mesh
from dream3d.representations.mesh_raster import face_normals
from dream3d.representations.noise import NoiseFieldConfig
from dream3d.representations.shading import LightConfig, Shading
from dream3d.representations.tets import marching_tets, tet_grid

FieldFn = Callable[[Tensor], Tensor]
POINT_CHUNK = 1 << 18  # points per field evaluation when initialising from another field
# init_from_mesh computes exact distances at vertices at vertices this many cells from the voxelised surface
EXACT_BAND_CELLS = 2.0


class DMTetConfig(RepresentationConfig):
    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(128, ge=2)  # cubes a side (threestudio's isosurface_resolution)
    radius: float = Field(1.0, gt=0)  # the grid spans [-radius, radius]^3
    init_radius: float = Field(0.5, gt=0)  # the sphere a fresh grid starts as (Fantasia3D's shape_init: sphere)
    sdf_lr: float = 0.001  # world units per Adam step: a few steps move the surface a cell at 128
    deformation_lr: float = 0.01  # of the raw offsets, tanh(d) times half a cell
    albedo_lr: float = 0.01
    albedo_resolution: int = Field(64, ge=2)
    geometry_only: bool = False  # the guidance sees the normal render (ProlificDreamer stage 2, Fantasia3D)
    shading: Shading = "none"  # "lambert": the albedo lit by ``light`` (Magic3D)
    light: LightConfig = LightConfig()

    def trained_light(self) -> LightConfig | None:
        return self.light if self.shading == "lambert" and not self.geometry_only else None

    def regularizers(self) -> frozenset[str]:
        return frozenset({"normal_consistency", "laplacian_smoothness"})


class DMTet(Representation):
    """An SDF [V] and deformations [V,3] on ``tet_grid(resolution, radius)``, and an albedo grid.

    Examples:
        >>> rep = DMTet(DMTetConfig(resolution=32))
        >>> rep.init_from(nerf)  # a staged run: the previous stage's surface and colours
        >>> out = rep.render(cameras, background)
        >>> loss = guidance(out.rgb, ...).loss + 0.1 * out.extras["normal_consistency"]
    """

    hull_margin: float = 1.5  # ``density`` rises across about a cell of the tet grid

    def __init__(self, cfg: DMTetConfig, generator: torch.Generator | None = None,
                 noise: NoiseFieldConfig | None = None) -> None:
        """``generator`` is unused (the initial state is the sphere); ``noise`` must be None."""
        super().__init__()
        if noise is not None:
            raise ValueError("dmtet carries no 3D-consistent noise; run it with --noise independent")
        self.cfg = cfg
        vertices, tets = tet_grid(cfg.resolution, cfg.radius)
        # rebuilt from the config, so kept out of checkpoints (the tets alone are 400 MB at 128)
        self.register_buffer("grid_vertices", vertices, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.sdf = torch.nn.Parameter(vertices.norm(dim=-1) - cfg.init_radius)
        self.deformation = torch.nn.Parameter(torch.zeros_like(vertices))
        a = cfg.albedo_resolution
        self.albedo_grid = torch.nn.Parameter(torch.zeros(1, 3, a, a, a))
        self._faces = 0

    @property
    def cell(self) -> float:
        """The grid's spacing in world units."""
        return 2 * self.cfg.radius / self.cfg.resolution

    def param_groups(self) -> list[dict]:
        return [{"params": [self.sdf], "lr": self.cfg.sdf_lr, "name": "sdf"},
                {"params": [self.deformation], "lr": self.cfg.deformation_lr, "name": "deformation"},
                {"params": [self.albedo_grid], "lr": self.cfg.albedo_lr, "name": "albedo"}]

    def deformed_vertices(self) -> Tensor:
        """[V,3] grid vertices moved by their bounded deformations."""
        return self.grid_vertices + torch.tanh(self.deformation) * (self.cell / 2)

    def mesh(self) -> tuple[Tensor, Tensor]:
        """The current surface: (vertices [M,3], faces [F,3]), differentiable in the SDF and deformations."""
        return marching_tets(self.deformed_vertices(), self.tets, self.sdf)

    def stats(self) -> dict[str, float]:
        return {"faces": float(self._faces)}

    # -- fields -----------------------------------------------------------------------
    def _sample(self, grid: Tensor, points: Tensor) -> Tensor:
        """Trilinear lookup of grid [1,C,n,n,n] (axes x, y, z) over the cube at points [N,3] -> [N,C]."""
        # grid_sample's (x, y, z) index the last, middle and first axes: ours are x-first
        coords = (points / self.cfg.radius).flip(-1).view(1, -1, 1, 1, 3).to(grid)
        return F.grid_sample(grid, coords, align_corners=True, padding_mode="border").view(grid.shape[1], -1).t()

    def sdf_at(self, points: Tensor) -> Tensor:
        """The SDF at points [N,3] -> [N], trilinear over the undeformed lattice (deformations ignored: they
        move the surface by under half a cell)."""
        n = self.cfg.resolution + 1
        return self._sample(self.sdf.view(1, 1, n, n, n), points)[:, 0]

    def density(self, points: Tensor) -> Tensor:
        """sigmoid(-sdf / w) / w at points [N,3] -> [N], w one cell: its optical depth reaches ln 2 where the SDF
        is 0, so the export's ``auto_threshold`` (the renders' median depth) finds the SDF's zero level."""
        return torch.sigmoid(-self.sdf_at(points) / self.cell) / self.cell

    def albedo(self, points: Tensor) -> Tensor:
        """Albedo in [0,1] at points [N,3] -> [N,3]."""
        return torch.sigmoid(self._sample(self.albedo_grid, points))

    # -- initialisation -----------------------------------------------------------------
    @torch.no_grad()
    def _set_sdf_from_occupancy(self, inside: np.ndarray) -> None:
        """The SDF at the lattice from its inside/outside voxelisation [n,n,n] bool: the distance to the nearest
        sample of the other kind less half a cell, so the zero level falls midway between them."""
        outside_distance = distance_transform_edt(~inside) - 0.5
        inside_distance = distance_transform_edt(inside) - 0.5
        sdf = np.where(inside, -inside_distance, outside_distance) * self.cell
        self.sdf.copy_(torch.from_numpy(sdf.reshape(-1)).to(self.sdf))
        self.deformation.zero_()

    @torch.no_grad()
    def init_from_density(self, density: FieldFn, threshold: float | None = None,
                          albedo: FieldFn | None = None) -> None:
        """Starts from a density field's surface (a previous stage's NeRF): the SDF from where density > threshold.

        Args:
            density: points [N,3] -> [N] on this grid's device. threshold: the surface level; None picks the
                export's (``auto_threshold``, the renders' median depth). albedo: points [N,3] -> [N,3] in [0,1],
                copied into the albedo grid when given.
        """
        n = self.cfg.resolution + 1
        values = torch.cat([density(p).reshape(-1).float() for p in self.grid_vertices.split(POINT_CHUNK)])
        values = values.view(n, n, n).cpu()
        level = auto_threshold(values, self.cell) if threshold is None else threshold
        self._set_sdf_from_occupancy((values > level).numpy())
        if albedo is not None:
            self.init_albedo(albedo)

    @torch.no_grad()
    def init_albedo(self, albedo: FieldFn) -> None:
        """The albedo grid from a colour field (points [N,3] -> [N,3] in [0,1])."""
        a = self.cfg.albedo_resolution
        axis = torch.linspace(-self.cfg.radius, self.cfg.radius, a, device=self.albedo_grid.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
        rgb = torch.cat([albedo(p).float() for p in points.split(POINT_CHUNK)]).clamp(1e-3, 1 - 1e-3)
        self.albedo_grid.copy_(torch.logit(rgb).t().reshape(1, 3, a, a, a))

    @torch.no_grad()
    def init_from_mesh(self, mesh: trimesh.Trimesh) -> None:
        """Starts from a watertight mesh: inside/outside by ray parity along x (``inside_mesh``), distances from
        that voxelisation, exact (``distance_to_triangles``) within ``EXACT_BAND_CELLS`` of the surface."""
        n = self.cfg.resolution + 1
        triangles = torch.tensor(mesh.triangles, dtype=torch.float64)
        axis = torch.linspace(-self.cfg.radius, self.cfg.radius, n, dtype=torch.float64)
        inside = inside_mesh(triangles, axis)
        self._set_sdf_from_occupancy(inside.numpy())
        sdf = self.sdf.detach().cpu().double()
        band = sdf.abs() < EXACT_BAND_CELLS * self.cell
        distance = distance_to_triangles(self.grid_vertices.cpu().double()[band], triangles)
        sdf[band] = torch.where(inside.reshape(-1)[band], -distance, distance)
        self.sdf.copy_(sdf.to(self.sdf))

    def init_from(self, previous: Representation) -> None:
        """A staged run's start: the previous stage's solid, as its export makes it, and its colours.

        A NeRF's density is a shell with a hollow inside, so its raw iso-surface voxelised as inside/outside
        keeps the shell only (a coarse cube started at volume ratio 0.28); the export's visual hull makes it
        solid (the same cube's export: ratio 0.99)."""
        device = self.sdf.device
        white = torch.ones(3, device=device)

        def alpha(cameras: Cameras) -> Tensor:
            return previous.render(cameras.to(device), white).alpha[..., 0]

        solid = extract_mesh(previous.density, previous.albedo, resolution=max(2 * self.cfg.resolution, 64),
                             bound=self.cfg.radius, device=device, solid="hull", alpha_fn=alpha)
        self.init_from_mesh(solid)
        self.init_albedo(previous.albedo)

    # -- rendering ------------------------------------------------------------------------
    def render(self, cameras: Cameras, background: Tensor, generator: torch.Generator | None = None,
               with_normals: bool = False) -> RenderOutput:
        """B views of the extracted mesh: rgb [B,H,W,3] over ``background`` [3], alpha, depth [B,H,W,1], normals
        [B,H,W,3] with ``with_normals`` or ``geometry_only``; extras: the mesh regularisers (scalars)."""
        vertices, faces = self.mesh()
        self._faces = len(faces)
        if len(faces) == 0:
            return self._empty(cameras, background, with_normals)
        light = self.cfg.trained_light()
        out = render_mesh(vertices, faces, cameras, background, self.albedo, light,
                          with_normals or self.cfg.geometry_only)
        if self.cfg.geometry_only:
            out.rgb = out.extras["normal_rgb"]
        out.extras["normal_consistency"] = normal_consistency(vertices, faces)
        out.extras["laplacian_smoothness"] = laplacian_smoothness(vertices, faces)
        return out

    def _empty(self, cameras: Cameras, background: Tensor, with_normals: bool) -> RenderOutput:
        """The background everywhere; every output depends on the parameters (by a zero), so a backward
        through it runs and leaves zero gradients instead of failing."""
        B, H, W = len(cameras), cameras.height, cameras.width
        zero = 0 * (self.sdf.sum() + self.deformation.sum() + self.albedo_grid.sum())
        rgb = background.to(self.sdf).expand(B, H, W, 3) + zero
        alpha = torch.zeros(B, H, W, 1, device=self.sdf.device) + zero
        normal = torch.zeros(B, H, W, 3, device=self.sdf.device) + zero if with_normals else None
        return RenderOutput(rgb=rgb, alpha=alpha, depth=alpha.clone(), normal=normal,
                            extras={"normal_consistency": zero, "laplacian_smoothness": zero, "normal_rgb": rgb})


def inside_mesh(triangles: Tensor, axis: Tensor, lines_per_chunk: int = 1024) -> Tensor:
    """Which lattice points lie inside a closed mesh: [n,n,n] bool over ``axis`` [n] (x-first, as ``tet_grid``'s).

    Each lattice line along x is cast against the triangles [F,3,3] projected onto the yz-plane; a point is
    inside when an odd number of crossings lies before it. The lines are shifted by a fraction of a cell
    that no mesh aligned with the lattice shares, so no line grazes an edge or vertex and counts it twice.
    """
    n = len(axis)
    shift = (axis[1] - axis[0]) * torch.tensor([1.3e-4, 0.7e-4], dtype=axis.dtype)
    yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).view(-1, 2) + shift  # [n^2,2]
    a, b, c = (triangles[:, k] for k in range(3))
    crossings = torch.zeros(n * n, n + 1, dtype=torch.long)
    for start in range(0, n * n, lines_per_chunk):
        p = yz[start:start + lines_per_chunk, None]  # [L,1,2]

        def area(u: Tensor, v: Tensor) -> Tensor:  # twice the signed area of (p, u, v) in the yz-plane
            return (u[:, 1] - p[..., 0]) * (v[:, 2] - p[..., 1]) - (u[:, 2] - p[..., 1]) * (v[:, 1] - p[..., 0])

        wa, wb, wc = area(b, c), area(c, a), area(a, b)  # [L,F]
        hit = ((wa > 0) & (wb > 0) & (wc > 0)) | ((wa < 0) & (wb < 0) & (wc < 0))
        line, face = hit.nonzero(as_tuple=True)
        w = torch.stack([wa[line, face], wb[line, face], wc[line, face]], -1)
        x = (w / w.sum(-1, keepdim=True) * triangles[face, :, 0]).sum(-1)
        bucket = torch.searchsorted(axis, x)  # crossings before lattice point i: buckets <= i
        crossings[start:start + lines_per_chunk].index_put_((line, bucket), torch.ones_like(line), accumulate=True)
    return (crossings[:, :n].cumsum(-1) % 2 == 1).view(n, n, n).permute(2, 0, 1)  # [y,z,x] -> [x,y,z]


def distance_to_triangles(points: Tensor, triangles: Tensor, candidates: int = 32) -> Tensor:
    """Unsigned distance from points [N,3] to the nearest of triangles [F,3,3] -> [N].

    Each point is measured against the ``candidates`` triangles whose centroids are nearest it (scipy's
    cKDTree): on a mesh of even-sized triangles, such as a marching-cubes surface, the nearest triangle is
    among them, and brute force over all of them took 69 s for one DMTet start from a 15k-face export. The
    nearest point of a triangle is the projection onto its plane when that falls inside, else the nearest
    point of one of its edges."""
    if len(points) == 0 or len(triangles) == 0:
        return points.new_zeros(len(points))
    k = min(candidates, len(triangles))
    _, nearest = cKDTree(triangles.mean(1).numpy()).query(points.numpy(), k=k)
    a, b, c = triangles[torch.as_tensor(nearest).view(len(points), k)].unbind(2)  # [N,k,3] each
    normal = F.normalize(torch.linalg.cross(b - a, c - a), dim=-1)
    q = points[:, None]  # [N,1,3]
    height = ((q - a) * normal).sum(-1)
    foot = q - height[..., None] * normal
    sides = [(torch.linalg.cross(v - u, foot - u) * normal).sum(-1) for u, v in ((a, b), (b, c), (c, a))]
    inside = (sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)
    edge = torch.stack([_segment_distance(q, u, v) for u, v in ((a, b), (b, c), (c, a))]).amin(0)
    return torch.where(inside, height.abs(), edge).amin(-1)


def _segment_distance(q: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Distance from points q [P,1,3] to segments u-v [P,F,3] (or [F,3]) -> [P,F]."""
    d = v - u
    t = (((q - u) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-30)).clamp(0, 1)
    return (q - u - t[..., None] * d).norm(dim=-1)


def _edges(faces: Tensor) -> tuple[Tensor, Tensor]:
    """Each face's three edges, (a, b) with a < b: (edges [3F,2], the face of each [3F])."""
    edges = torch.sort(faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2), dim=-1).values
    return edges, torch.arange(len(faces), device=faces.device).repeat_interleave(3)


def normal_consistency(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean over edges shared by two faces of 1 - cos(n_a, n_b), n the unit face normals; vertices [V,3], faces [F,3].
    0 for a flat surface; scalar, differentiable in the vertices."""
    edges, face = _edges(faces)
    key = edges[:, 0] * len(vertices) + edges[:, 1]
    order = torch.argsort(key)
    shared = key[order][1:] == key[order][:-1]  # neighbours in sorted order with one edge: a pair of faces
    a, b = face[order][:-1][shared], face[order][1:][shared]
    normals = face_normals(vertices, faces)
    return (1 - (normals[a] * normals[b]).sum(-1)).mean()


def laplacian_smoothness(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean over vertices [V,3] of |v - mean of its neighbours|^2 (the uniform Laplacian); faces [F,3]. Scalar."""
    edges = torch.unique(_edges(faces)[0], dim=0)
    ends = torch.cat([edges, edges.flip(-1)])  # both directions
    total = torch.zeros_like(vertices).index_add(0, ends[:, 0], vertices[ends[:, 1]])
    degree = torch.zeros(len(vertices), dtype=vertices.dtype, device=vertices.device).index_add(
        0, ends[:, 0], torch.ones(len(ends), dtype=vertices.dtype, device=vertices.device))
    used = degree > 0
    offsets = vertices[used] - total[used] / degree[used, None]
    return offsets.square().sum(-1).mean()


__all__ = ["DMTet", "DMTetConfig", "distance_to_triangles", "inside_mesh", "laplacian_smoothness", "normal_consistency"]
