"""The hash-grid NeRF (``nerf.encoding=hashgrid``, issue 25 item 7): Instant-NGP's encoding in PyTorch."""

from __future__ import annotations

import pytest
import torch

from dream3d.config import build_config
from dream3d.representations.hashgrid import HashEncoding, HashGridConfig, level_resolutions
from dream3d.representations.nerf import NeRF, NeRFConfig
from dream3d.run.camera_sampling import CameraConfig, sample_cameras

# 3 levels of 4, 8 and 16 cells: the first (5^3 = 125 vertices) fits a 2^8 table and is dense, the others hash
SMALL = HashGridConfig(levels=3, features=2, log2_table_size=8, base_resolution=4, per_level_scale=2.0)
CORNERS = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)])


def _encoding(cfg: HashGridConfig = SMALL, seed: int = 0) -> HashEncoding:
    torch.manual_seed(seed)
    encoding = HashEncoding(cfg).double()
    with torch.no_grad():
        encoding.table.normal_()
    return encoding


def test_threestudio_defaults():
    """16 levels from 16 to 4096 cells a side; the five up to 70 cells fit 2^19 rows and are dense."""
    cfg = HashGridConfig()
    resolutions = level_resolutions(cfg)
    assert (cfg.levels, cfg.features, cfg.log2_table_size) == (16, 2, 19)
    assert resolutions[:6] == [16, 23, 33, 48, 70, 101] and resolutions[-1] in (4095, 4096)
    encoding = HashEncoding(cfg)
    assert encoding.dense == [True] * 5 + [False] * 11
    assert encoding.table.shape == (sum((n + 1) ** 3 for n in resolutions[:5]) + 11 * 2**19, 2)
    assert encoding(torch.rand(7, 3)).shape == (7, 32)


def test_the_spatial_hash_is_instant_ngps():
    """A hashed level's row is (x * 1 xor y * 2654435761 xor z * 805459861) mod 2^T in uint32 arithmetic."""
    encoding = _encoding()
    vertices = torch.tensor([[1, 2, 3], [16, 0, 9], [7, 15, 16]])
    for (x, y, z), row in zip(vertices.tolist(), encoding.vertex_rows(2, vertices).tolist()):
        wrapped = ((x * 1) ^ (y * 2654435761) ^ (z * 805459861)) & 0xFFFFFFFF
        assert row == encoding.offsets[2] + wrapped % 2**8
    # the dense level: x + 5 y + 25 z, no collisions
    dense_rows = encoding.vertex_rows(0, torch.cartesian_prod(*[torch.arange(5)] * 3))
    assert sorted(dense_rows.tolist()) == list(range(125))


def test_corners_are_the_cells_vertices_and_weights_are_trilinear():
    encoding = _encoding()
    points = torch.rand(50, 3, dtype=torch.float64)
    for level, n in enumerate(encoding.resolutions):
        rows, weights = encoding.corners(level, points)
        cell = (points * n).floor().long()
        assert torch.equal(rows, encoding.vertex_rows(level, cell[:, None] + CORNERS))
        frac = points * n - cell
        expected = torch.where(CORNERS.bool(), frac[:, None], 1 - frac[:, None]).prod(-1)
        torch.testing.assert_close(weights, expected)


def test_two_points_in_one_cell_interpolate_its_corners_even_where_rows_collide():
    """At a hashed level, vertices that share a row read one feature; points in one cell interpolate the
    same 8 rows, so the encoding is linear between them, and a point on a vertex reads that vertex's row."""
    encoding = _encoding()
    level, n = 2, encoding.resolutions[2]
    grid = torch.cartesian_prod(*[torch.arange(n + 1)] * 3)
    rows = encoding.vertex_rows(level, grid)
    assert rows.unique().numel() < rows.numel()  # 17^3 vertices in 256 rows collide
    first, second = (rows == rows.bincount().argmax()).nonzero()[:2, 0]
    features = encoding(torch.stack([grid[first], grid[second]]).double() / n)[:, 2 * 2 :]
    torch.testing.assert_close(features[0], features[1])
    torch.testing.assert_close(features[0], encoding.table[rows[first]].detach())
    # two points in one cell, apart along x: trilinear is linear along an axis, so their midpoint's
    # encoding is the mean of theirs at every level
    a = torch.tensor([[0.30, 0.41, 0.52]], dtype=torch.float64)
    b = a + torch.tensor([0.01, 0.0, 0.0], dtype=torch.float64)
    assert all(torch.equal((a * m).floor(), (b * m).floor()) for m in encoding.resolutions)
    torch.testing.assert_close(encoding((a + b) / 2), (encoding(a) + encoding(b)) / 2)


def test_the_tables_gradient_matches_finite_differences():
    encoding = _encoding()
    points = torch.rand(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(40, encoding.output_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(table: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            encoding.table.copy_(table)
        return (torch.tanh(encoding(points)) * weights).sum()

    base = encoding.table.detach().clone()
    loss(base).backward()
    analytic = encoding.table.grad.clone()
    touched = analytic.abs().sum(-1).nonzero()[:, 0]
    assert touched.numel() > 40
    h = 1e-6
    for row in touched[torch.randperm(touched.numel(), generator=torch.Generator().manual_seed(3))[:25]]:
        for f in range(2):
            plus, minus = base.clone(), base.clone()
            plus[row, f] += h
            minus[row, f] -= h
            with torch.no_grad():
                numeric = (loss(plus) - loss(minus)) / (2 * h)
            assert abs(float(numeric) - float(analytic[row, f])) < 1e-6 * max(1.0, abs(float(numeric)))


def _small_nerf(**settings) -> NeRF:
    return NeRF(NeRFConfig(encoding="hashgrid", hashgrid=SMALL.model_copy(update={"log2_table_size": 12}),
                           num_samples=24, occupancy_resolution=16, **settings))


def test_the_hashgrid_nerf_renders_shapes_and_has_its_parameter_groups():
    model = _small_nerf()
    cams = sample_cameras(CameraConfig(batch_size=2), 12, torch.Generator().manual_seed(0))
    out = model.render(cams, torch.ones(3), generator=torch.Generator().manual_seed(0), with_normals=True)
    assert out.rgb.shape == (2, 12, 12, 3) and out.alpha.shape == (2, 12, 12, 1) and out.normal.shape == (2, 12, 12, 3)
    assert [g["name"] for g in model.param_groups()] == ["encoding", "decoder"]
    assert [g["lr"] for g in model.param_groups()] == [0.01, 0.001]
    assert float(out.alpha.max()) > 0.5  # the blob: an object from the first render


def test_a_short_fit_forms_the_silhouette():
    """Adam on the hash grid and its decoder, fitting 2 views of a dense NeRF holding a small box: the
    alpha error falls to under a third."""
    cams = sample_cameras(CameraConfig(batch_size=2), 12, torch.Generator().manual_seed(0))
    teacher = NeRF(NeRFConfig(grid_resolutions=[16], blob_density=0.0, num_samples=24, occupancy_resolution=16))
    axis = torch.linspace(-1, 1, 16)
    box = (torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).abs().amax(0) < 0.4).float()
    with torch.no_grad():
        teacher.grids[0][0, 0] = torch.where(box.bool(), 50.0, -50.0)
    teacher.update_occupancy()
    target = teacher.render(cams, torch.ones(3)).alpha.detach()
    torch.manual_seed(0)
    model = _small_nerf(hashgrid_lr=0.05, decoder_lr=0.01)
    optimizers = [torch.optim.Adam(g["params"], lr=g["lr"]) for g in model.param_groups()]
    errors = []
    for _ in range(40):
        loss = ((model.render(cams, torch.ones(3)).alpha - target) ** 2).mean()
        errors.append(float(loss))
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    assert errors[-1] < errors[0] / 3


def test_the_encoding_is_a_config_choice():
    cfg = build_config({"prompt": "a red cube", "nerf": {"encoding": "hashgrid", "hashgrid": {"levels": 4}}})
    assert cfg.nerf.encoding == "hashgrid" and cfg.nerf.hashgrid.levels == 4
    with pytest.raises(ValueError, match="nerf.encoding: Input should be 'dense' or 'hashgrid'"):
        build_config({"prompt": "a red cube", "nerf": {"encoding": "tcnn"}})
