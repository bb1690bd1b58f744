"""Instant-NGP's multi-resolution hash encoding in PyTorch (the NeRF's ``nerf.encoding=hashgrid``).

L levels of grids over the unit cube, from ``base_resolution`` cells a side growing by ``per_level_scale`` a
level. Each level stores F features per grid vertex in a table of at most 2^``log2_table_size`` rows: a level
whose (N+1)^3 vertices fit is indexed densely (no collisions), a finer one through Instant-NGP's spatial hash
(x * 1 xor y * 2654435761 xor z * 805459861, mod the table size), so distinct vertices may share a row and the
training sorts out the collisions. A point's encoding is, per level, the trilinear interpolation of its cell's
8 corner features; the levels are concatenated ([N, L*F]).

tiny-cuda-nn is the reference implementation; it does not install here, so this is the same arithmetic in
PyTorch: a gather of 8 rows a point and level, and a hand-written backward (``_HashLookup``), on any device.
The table is drawn from torch's global generator, which the run seeds and checkpoints.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

PRIMES = (1, 2654435761, 805459861)


class HashGridConfig(BaseModel):
    """threestudio's hash grid (its ``implicit-volume`` geometry's encoding): 16 levels x 2 features, a 2^19
    table, 16 to 4096 cells a side (per-level scale 4096/16 over 15 steps = 1.4473)."""

    model_config = ConfigDict(extra="forbid")

    levels: int = Field(16, ge=1, le=32)
    features: int = Field(2, ge=1, le=8)
    log2_table_size: int = Field(19, ge=4, le=24)
    base_resolution: int = Field(16, ge=2)
    per_level_scale: float = Field(1.447269237440378, ge=1.0)


def level_resolutions(cfg: HashGridConfig) -> list[int]:
    """Cells a side of each level: floor(base * scale^l)."""
    return [int(math.floor(cfg.base_resolution * cfg.per_level_scale**level)) for level in range(cfg.levels)]


class HashEncoding(torch.nn.Module):
    """points [N,3] in [0,1]^3 -> features [N, levels * features]; one flat parameter ``table`` holds every level."""

    def __init__(self, cfg: HashGridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolutions = level_resolutions(cfg)
        limit = 2**cfg.log2_table_size
        self.dense = [(n + 1) ** 3 <= limit for n in self.resolutions]
        sizes = [(n + 1) ** 3 if dense else limit for n, dense in zip(self.resolutions, self.dense)]
        self.offsets = [sum(sizes[:level]) for level in range(cfg.levels)]
        # tiny-cuda-nn's initialisation: small uniform features, so the decoder starts from ~0
        self.table = torch.nn.Parameter(torch.empty(sum(sizes), cfg.features).uniform_(-1e-4, 1e-4))

    @property
    def output_dim(self) -> int:
        return self.cfg.levels * self.cfg.features

    def vertex_rows(self, level: int, vertices: Tensor) -> Tensor:
        """Integer vertex coordinates [...,3] of ``level`` -> their rows in ``table`` [...]."""
        if self.dense[level]:
            side = self.resolutions[level] + 1
            index = vertices[..., 0] + side * (vertices[..., 1] + side * vertices[..., 2])
        else:
            # int64 products of coordinates <= 2^13 and 32-bit primes do not overflow, and their low bits (all the
            # power-of-two modulus keeps) are those of tiny-cuda-nn's wrapping uint32 arithmetic
            index = (vertices[..., 0] * PRIMES[0]) ^ (vertices[..., 1] * PRIMES[1]) ^ (vertices[..., 2] * PRIMES[2])
            index = index & (2**self.cfg.log2_table_size - 1)
        return index + self.offsets[level]

    def corners(self, level: int, points: Tensor) -> tuple[Tensor, Tensor]:
        """points [N,3] in [0,1]^3 -> the table rows [N,8] of their cell's corners at ``level`` and the
        trilinear weights [N,8] of those corners (corner c: x offset bit 0, y bit 1, z bit 2), as
        ``vertex_rows`` would give them, formed per axis: the 8 corners are outer products of each axis's
        two, which costs a third of forming [N,8,3] and reducing it."""
        n = self.resolutions[level]
        scaled = points * n
        cell = scaled.floor().long().clamp(0, n - 1)  # [N,3]
        frac = scaled - cell
        coords = cell[..., None] + torch.arange(2, device=points.device)  # [N,3,2]
        weights = torch.stack([1 - frac, frac], -1)  # [N,3,2]
        if self.dense[level]:
            side = n + 1
            terms = coords * torch.tensor([1, side, side * side], device=points.device)[:, None]
            combine = torch.add
        else:
            terms = coords * torch.tensor(PRIMES, device=points.device)[:, None]
            combine = torch.bitwise_xor
        rows = combine(combine(terms[:, 2, :, None, None], terms[:, 1, None, :, None]), terms[:, 0, None, None, :])
        if not self.dense[level]:
            rows = rows & (2**self.cfg.log2_table_size - 1)
        w = weights[:, 2, :, None, None] * weights[:, 1, None, :, None] * weights[:, 0, None, None, :]
        return rows.flatten(1) + self.offsets[level], w.flatten(1)

    def forward(self, points: Tensor) -> Tensor:
        """points [N,3] in [0,1]^3 (clamped) -> [N, levels * features], level-major. Differentiable in the
        table only (the NeRF's normals are finite differences, so nothing needs d/d points)."""
        return _HashLookup.apply(self.table, points.detach().clamp(0, 1), self)


class _HashLookup(torch.autograd.Function):
    """The encoding's gathers with a hand-written backward: one zero table and an ``index_add_`` per level,
    the rows and weights recomputed from the points. Autograd's own backward of a gather (``embedding``)
    materialises a table-sized gradient per level (16 x 12.6 M floats a call), and saving the rows would
    keep 128 int64 a point alive until the backward."""

    @staticmethod
    def forward(ctx, table: Tensor, points: Tensor, encoding: HashEncoding) -> Tensor:
        ctx.save_for_backward(points)
        ctx.encoding, ctx.table_shape = encoding, table.shape
        out = []
        for level in range(encoding.cfg.levels):
            rows, weights = encoding.corners(level, points)
            out.append(torch.einsum("nc,ncf->nf", weights, table[rows]))
        return torch.cat(out, -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (points,) = ctx.saved_tensors
        encoding, width = ctx.encoding, ctx.encoding.cfg.features
        table_grad = grad.new_zeros(ctx.table_shape)
        for level in range(encoding.cfg.levels):
            rows, weights = encoding.corners(level, points)
            level_grad = grad[:, level * width : (level + 1) * width]  # [N,F]
            table_grad.index_add_(0, rows.flatten(), (weights[..., None] * level_grad[:, None, :]).flatten(0, 1))
        return table_grad, None, None
