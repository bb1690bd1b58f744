"""A tetrahedral grid and differentiable marching tetrahedra (DMTet, Shen et al. 2021).

``tet_grid`` fills the cube [-radius, radius]^3 with a regular lattice of cubes, each split into six
tetrahedra along its main diagonal (the Kuhn / Freudenthal split). Every cube is split the same way, so
the two triangles a shared cube face gets from either side coincide and the grid is conforming; that is
what makes ``marching_tets``' surface watertight. threestudio ships grids made by quartet instead
(``tets/{res}_tets.npz``); a cube split needs no file and its vertices are the lattice points, so a field
on them is also a dense [R+1,R+1,R+1] grid (``DMTet`` samples it with ``grid_sample``).

``marching_tets`` places one surface vertex on each grid edge whose end points differ in sign, at the
linear zero crossing of the SDF along it, and joins them with the 0, 1 or 2 triangles of the tet's case
(16 cases of inside/outside corners). The positions are a closed-form function of the SDF and of the
(deformed) grid vertices, so gradients reach both; which edges cross is decided without gradient.
Negative SDF is inside; faces are wound counter-clockwise seen from outside (right-hand normals outward).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

# the six edges of a tet as pairs of its corners; a case's triangles index into this list
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _kuhn_tets() -> np.ndarray:
    """[6,4] corners (0..7, bit k = offset along axis k) of the cube's six tets, each positively oriented."""
    corners = np.array([[(c >> k) & 1 for k in range(3)] for c in range(8)], dtype=np.float64)
    tets = []
    for order in itertools.permutations(range(3)):
        # the monotone path 000 -> 111 stepping along the axes in this order: all six share the diagonal
        path, corner = [0], 0
        for axis in order:
            corner |= 1 << axis
            path.append(corner)
        p = corners[path]
        if np.linalg.det(p[1:] - p[0]) < 0:
            path[2], path[3] = path[3], path[2]
        tets.append(path)
    return np.array(tets)


def _case_table() -> np.ndarray:
    """[16,6] for each case (bit i set: corner i outside) two triangles as indices into ``TET_EDGES`` (-1: none),
    wound outward for a positively oriented tet."""
    reference = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    edge_index = {frozenset(e): i for i, e in enumerate(TET_EDGES)}
    table = np.full((16, 6), -1, dtype=np.int64)
    for case in range(1, 15):
        outside = [i for i in range(4) if case >> i & 1]
        inside = [i for i in range(4) if not case >> i & 1]
        if len(outside) == 2:  # a quad around the four crossing edges, in cyclic order, split in two
            (a, b), (c, d) = inside, outside
            quad = [(a, c), (a, d), (b, d), (b, c)]
            triangles = [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
        else:
            lone = (outside if len(outside) == 1 else inside)[0]
            triangles = [[(lone, j) for j in range(4) if j != lone]]
        direction = reference[outside].mean(0) - reference[inside].mean(0)
        row = []
        for triangle in triangles:
            p = np.array([reference[list(e)].mean(0) for e in triangle])
            if np.cross(p[1] - p[0], p[2] - p[0]) @ direction < 0:
                triangle = [triangle[0], triangle[2], triangle[1]]
            row += [edge_index[frozenset(e)] for e in triangle]
        table[case, : len(row)] = row
    return table


KUHN_TETS = _kuhn_tets()
CASE_TABLE = _case_table()


def tet_grid(resolution: int, radius: float) -> tuple[Tensor, Tensor]:
    """A conforming tetrahedral grid of ``resolution`` cubes a side over [-radius, radius]^3.

    Args:
        resolution: cubes per side (R). radius: half the cube's side, in world units.
    Returns:
        vertices [(R+1)^3, 3] float32, the lattice points, vertex (i, j, k) at index (i (R+1) + j) (R+1) + k
        with i along x; tets [6 R^3, 4] long, each positively oriented (det[v1-v0, v2-v0, v3-v0] > 0).
    """
    n = resolution + 1
    axis = torch.linspace(-radius, radius, n)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
    cell = torch.arange(resolution)
    i, j, k = (c.reshape(-1) for c in torch.meshgrid(cell, cell, cell, indexing="ij"))
    base = (i * n + j) * n + k  # [R^3] each cube's corner 000
    offsets = torch.tensor([((c & 1) * n + (c >> 1 & 1)) * n + (c >> 2 & 1) for c in range(8)])
    tets = base[:, None, None] + offsets[torch.from_numpy(KUHN_TETS)][None]  # [R^3,6,4]
    return vertices, tets.view(-1, 4)


def marching_tets(vertices: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """The zero level set of ``sdf`` over the tet grid as a triangle mesh, differentiable in ``sdf`` and ``vertices``.

    Args:
        vertices: [V,3] grid vertices (deformed or not). tets: [T,4] long, positively oriented as ``tet_grid``'s.
        sdf: [V] signed distance, negative inside.
    Returns:
        (mesh_vertices [M,3], faces [F,3] long): one vertex per grid edge with a sign change (shared by every
        tet around that edge, so the mesh is watertight where the surface stays inside the grid), faces wound
        outward. M = F = 0 when nothing crosses.
    """
    device = vertices.device
    with torch.no_grad():
        outside = sdf > 0
        corners_out = outside[tets]  # [T,4]
        count = corners_out.sum(-1)
        crossing = (count > 0) & (count < 4)
        cut_tets = tets[crossing]
        case = (corners_out[crossing].long() << torch.arange(4, device=device)).sum(-1)
        edges = cut_tets[:, torch.tensor(TET_EDGES, device=device)].view(-1, 2)  # [6T',2]
        edges = torch.sort(edges, dim=-1).values
        key = edges[:, 0] * vertices.shape[0] + edges[:, 1]
        unique_key, edge_of = torch.unique(key, return_inverse=True)
        ends = torch.stack([unique_key // vertices.shape[0], unique_key % vertices.shape[0]], -1)
        cuts = outside[ends[:, 0]] != outside[ends[:, 1]]
        vertex_of_edge = torch.full_like(unique_key, -1)
        vertex_of_edge[cuts] = torch.arange(int(cuts.sum()), device=device)
        local = vertex_of_edge[edge_of].view(-1, 6)  # [T',6] mesh vertex on each of the tet's edges
        table = torch.from_numpy(CASE_TABLE).to(device)[case]  # [T',6]
        faces = torch.gather(local, 1, table.clamp_min(0)).view(-1, 3)
        faces = faces[(table >= 0).view(-1, 3).all(-1)]
        ends = ends[cuts]
    s = sdf[ends]  # [M,2], of opposite signs
    p = vertices[ends]  # [M,2,3]
    mesh_vertices = (p[:, 0] * s[:, 1:] - p[:, 1] * s[:, :1]) / (s[:, 1:] - s[:, :1])
    return mesh_vertices, faces


__all__ = ["CASE_TABLE", "KUHN_TETS", "TET_EDGES", "marching_tets", "tet_grid"]
