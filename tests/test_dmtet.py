"""The tet grid, marching tetrahedra and the DMTet representation (issue 28)."""

import math

import numpy as np
import pytest
import torch
import trimesh

from dream3d.guidance.priors.toy_world import SHAPES, mask_iou, render_shapes, sdf_torus, world_cameras
from dream3d.representations.dmtet import DMTet, DMTetConfig, laplacian_smoothness, normal_consistency
from dream3d.representations.tets import marching_tets, tet_grid


@pytest.fixture(autouse=True)
def one_thread():
    """Small renders gain nothing from a second thread on the shared 2-core machine, and lose to its waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sphere(points: torch.Tensor, radius: float = 0.6) -> torch.Tensor:
    return points.norm(dim=-1) - radius


def trimesh_of(vertices: torch.Tensor, faces: torch.Tensor) -> trimesh.Trimesh:
    return trimesh.Trimesh(vertices.detach().double().numpy(), faces.numpy(), process=False)


def test_the_grid_fills_the_cube_with_positive_tets():
    vertices, tets = tet_grid(3, 0.5)
    assert vertices.shape == (64, 3) and tets.shape == (6 * 27, 4)
    assert vertices.amin(0).tolist() == [-0.5] * 3 and vertices.amax(0).tolist() == [0.5] * 3
    volumes = torch.linalg.det(vertices[tets[:, 1:]] - vertices[tets[:, :1]]) / 6
    assert bool((volumes > 0).all())
    assert float(volumes.sum()) == pytest.approx(1.0)
    # conforming: every interior triangle is shared by exactly two tets, every boundary one by one
    triangles = torch.sort(tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3), -1).values
    counts = torch.unique(triangles, dim=0, return_counts=True)[1]
    assert set(counts.tolist()) == {1, 2}
    assert int((counts == 1).sum()) == 6 * 2 * 9  # each cube face on the boundary: two triangles


def test_marching_tets_is_differentiable_in_sdf_and_vertices():
    vertices, tets = tet_grid(3, 1.0)
    vertices = vertices.double()
    generator = torch.Generator().manual_seed(0)
    vertices = vertices + 0.05 * torch.randn(vertices.shape, generator=generator, dtype=torch.float64)
    sdf = sphere(vertices, 0.7) + 0.05 * torch.randn(len(vertices), generator=generator, dtype=torch.float64)
    assert float(sdf.abs().min()) > 1e-3  # no sign flips under gradcheck's perturbation
    weights = torch.randn(len(marching_tets(vertices, tets, sdf)[0]), 3, generator=generator, dtype=torch.float64)

    def f(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (marching_tets(v, tets, s)[0] * weights).sum().sin()

    assert torch.autograd.gradcheck(f, (sdf.requires_grad_(), vertices.requires_grad_()))


def test_a_sphere_extracts_watertight_outward_and_of_the_right_volume():
    vertices, tets = tet_grid(24, 1.0)
    mesh = trimesh_of(*marching_tets(vertices, tets, sphere(vertices)))
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert len(mesh.split(only_watertight=False)) == 1
    assert mesh.euler_number == 2
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.03)  # positive: outward


def test_a_torus_keeps_its_hole():
    vertices, tets = tet_grid(24, 1.0)
    mesh = trimesh_of(*marching_tets(vertices, tets, sdf_torus(vertices)))
    assert mesh.is_watertight and mesh.euler_number == 0
    assert mesh.volume == pytest.approx(2 * math.pi**2 * 0.45 * 0.18**2, rel=0.05)


def test_no_sign_change_gives_an_empty_mesh():
    vertices, tets = tet_grid(4, 1.0)
    mesh_vertices, faces = marching_tets(vertices, tets, torch.ones(len(vertices)))
    assert mesh_vertices.shape == (0, 3) and faces.shape == (0, 3)


def test_the_regularisers_are_zero_on_flat_ground_and_positive_on_a_crease():
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1).view(-1, 2)
    flat = torch.cat([grid, torch.zeros(9, 1)], -1)
    faces = torch.tensor([[i * 3 + j, (i + 1) * 3 + j, i * 3 + j + 1] for i in range(2) for j in range(2)]
                         + [[(i + 1) * 3 + j, (i + 1) * 3 + j + 1, i * 3 + j + 1] for i in range(2) for j in range(2)])
    assert float(normal_consistency(flat, faces)) == pytest.approx(0.0, abs=1e-6)
    creased = flat.clone()
    creased[4, 2] = 1.0  # the centre vertex lifted
    assert float(normal_consistency(creased, faces)) > 0.05
    neighbours = [set() for _ in range(9)]
    for a, b, c in faces.tolist():
        neighbours[a] |= {b, c}
        neighbours[b] |= {a, c}
        neighbours[c] |= {a, b}
    expected = np.mean([np.sum((creased[v].numpy() - creased[sorted(n)].numpy().mean(0)) ** 2)
                        for v, n in enumerate(neighbours)])
    assert float(laplacian_smoothness(creased, faces)) == pytest.approx(expected, rel=1e-5)


def cameras(resolution: int = 32, views: int = 3):
    return world_cameras(torch.full((views,), 30.0), torch.linspace(0, 240, views), resolution)


def rep_of(sdf, resolution: int = 20, **fields) -> DMTet:
    rep = DMTet(DMTetConfig(resolution=resolution, albedo_resolution=8, **fields))
    with torch.no_grad():
        rep.sdf.copy_(sdf(rep.grid_vertices))
    return rep


def test_a_torus_renders_with_its_hole_and_its_true_silhouette():
    rep = rep_of(sdf_torus, 24)
    assert trimesh_of(*rep.mesh()).euler_number == 0
    views = cameras(48)
    out = rep.render(views, torch.ones(3), with_normals=True)
    truth = render_shapes(views, [SHAPES.index("torus")] * len(views))["mask"]
    assert float(mask_iou(out.alpha[..., 0] > 0.5, truth[..., 0] > 0.5).min()) > 0.9
    assert out.rgb.shape == (3, 48, 48, 3) and out.normal.shape == (3, 48, 48, 3)
    assert float(out.extras["normal_consistency"].detach()) > 0
    assert float(out.extras["laplacian_smoothness"].detach()) > 0


def test_the_image_gradient_reaches_sdf_and_deformation():
    rep = rep_of(sphere, 12)
    out = rep.render(cameras(24), torch.zeros(3), with_normals=True)
    loss = out.rgb.square().mean() + out.normal[..., 2].mean() + out.extras["normal_consistency"]
    loss.backward()
    for p in (rep.sdf, rep.deformation, rep.albedo_grid):
        assert bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0


def test_geometry_only_hands_the_normal_render_to_the_guidance():
    rep = rep_of(sphere, 12, geometry_only=True)
    out = rep.render(cameras(24, 1), torch.zeros(3))
    # over a black background, (n + 1) / 2 weighted by coverage; normal is already weighted by it
    assert float(out.alpha.detach().sum()) > 50
    assert torch.allclose(out.rgb, (out.normal + out.alpha) / 2, atol=1e-5)
    assert rep.cfg.trained_light() is None


def test_an_empty_grid_renders_the_background_and_backpropagates():
    rep = rep_of(lambda p: torch.ones(len(p)), 8)
    out = rep.render(cameras(16, 2), torch.tensor([0.2, 0.4, 0.6]), with_normals=True)
    assert torch.allclose(out.rgb, torch.tensor([0.2, 0.4, 0.6]).expand(2, 16, 16, 3))
    assert float(out.alpha.abs().sum()) == 0
    (out.rgb.sum() + out.extras["normal_consistency"]).backward()
    assert float(rep.sdf.grad.abs().sum()) == 0


def test_a_silhouette_loss_pulls_the_surface_to_a_target_sphere():
    # a grid of 20 at 32 pixels gives triangles about a pixel wide, whose outline pixels' own faces mostly do
    # not hold the silhouette edge: an antialias that looked only there left this loss where it was (ratio 1.0)
    rep = rep_of(lambda p: sphere(p, 0.35), 20, sdf_lr=0.05)
    views = cameras(32, 4)
    target = render_shapes(views, [SHAPES.index("sphere")] * 4)["mask"]
    optimizers = [torch.optim.Adam([g], lr=g["lr"]) for g in rep.param_groups()]
    losses = []
    for _ in range(8):
        loss = (rep.render(views, torch.zeros(3)).alpha - target).square().mean()
        losses.append(float(loss.detach()))
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]


def test_init_from_density_recovers_the_solid():
    rep = DMTet(DMTetConfig(resolution=24, albedo_resolution=8))
    red = torch.tensor([0.9, 0.1, 0.2])
    rep.init_from_density(lambda p: 20.0 * (sphere(p) < 0).float(), 10.0, lambda p: red.expand(len(p), 3))
    mesh = trimesh_of(*rep.mesh())
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.05)
    assert torch.allclose(rep.albedo(torch.zeros(2, 3)), red, atol=1e-3)


def test_init_from_a_mesh_recovers_it():
    rep = DMTet(DMTetConfig(resolution=24, albedo_resolution=8))
    rep.init_from_mesh(trimesh.creation.box((0.9, 0.7, 0.5)))
    mesh = trimesh_of(*rep.mesh())
    assert mesh.is_watertight
    assert np.allclose(mesh.bounds, [[-0.45, -0.35, -0.25], [0.45, 0.35, 0.25]], atol=1e-4)  # faces exact
    assert mesh.volume == pytest.approx(0.9 * 0.7 * 0.5, rel=0.04)  # less the edges and corners it bevels


def test_the_density_puts_the_export_surface_on_the_zero_level():
    from dream3d.representations.mesh_extraction import extract_mesh

    rep = rep_of(sphere, 24)
    mesh = extract_mesh(rep.density, rep.albedo, resolution=48, bound=1.0)
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.05)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(float(np.median(radii)) - 0.6) < 0.02


def test_distance_to_triangles_equals_brute_force():
    """The nearest-centroid candidates find the nearest triangle: the same distances as testing every triangle."""
    from dream3d.representations.dmtet import distance_to_triangles

    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    triangles = torch.tensor(mesh.triangles)
    points = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    points = points / points.norm(dim=-1, keepdim=True) * torch.linspace(0.45, 0.75, 500, dtype=torch.float64)[:, None]
    fast = distance_to_triangles(points, triangles)
    brute = distance_to_triangles(points, triangles, candidates=len(triangles))
    assert torch.allclose(fast, brute, atol=1e-12)
    assert torch.allclose(brute, (points.norm(dim=-1) - 0.6).abs(), atol=0.01)  # the icosphere is near the sphere


class _HollowSphere(torch.nn.Module):
    """A previous stage as a NeRF often ends: density only in a shell 0.5 < r < 0.6, renders of a solid ball."""

    def density(self, points: torch.Tensor) -> torch.Tensor:
        r = points.norm(dim=-1)
        return 40.0 * torch.sigmoid((0.6 - r) / 0.01) * torch.sigmoid((r - 0.5) / 0.01)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.2, 0.3, 0.9]).expand(len(points), 3)

    def render(self, cameras, background):
        from dream3d.representations.cameras import RenderOutput

        origins, dirs = cameras.rays()
        along = -(origins * dirs).sum(-1, keepdim=True)  # the ray's closest approach to the centre
        hit = ((origins + along * dirs).norm(dim=-1, keepdim=True) < 0.6).float()
        return RenderOutput(rgb=hit * 0.5, alpha=hit, depth=hit * along)


def test_a_staged_start_from_a_hollow_density_is_the_solid():
    """init_from makes the previous stage solid as its export does. Voxelising the raw density (the old start)
    kept the shell: 0.41 of the ball's volume, Euler characteristic -80."""
    rep = DMTet(DMTetConfig(resolution=24, albedo_resolution=8))
    rep.init_from(_HollowSphere())
    mesh = trimesh_of(*rep.mesh())
    assert mesh.is_watertight and mesh.euler_number == 2 and len(mesh.split(only_watertight=False)) == 1
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.08)
    assert torch.allclose(rep.albedo(torch.zeros(1, 3)), torch.tensor([[0.2, 0.3, 0.9]]), atol=1e-3)
