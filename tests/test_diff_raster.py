"""The differentiable mesh renderer: barycentrics as the rasterizer's, antialiased coverage equal to the covered
area at a straight edge, gradients in the vertex positions against central finite differences (whole render and
antialias alone, coarse and pixel-sized triangles), a silhouette fit that works only with antialiasing, an outline
that moves everywhere when the triangles are a pixel wide, CPU against CUDA."""

import pytest
import torch
import trimesh
from torch import Tensor

from dream3d.guidance.priors.toy_world import SHAPES, render_shapes, world_cameras
from dream3d.representations.cameras import Cameras, look_at_cameras
from dream3d.representations.diff_raster import antialias, barycentrics, interpolate, render_mesh
from dream3d.representations.mesh_raster import _project, rasterize
from dream3d.representations.shading import LightConfig

CAMERAS = look_at_cameras(torch.tensor([20.0, -35.0]), torch.tensor([30.0, 160.0]), torch.full((2,), 2.5), 40.0, 20, 20)
FIT_CAMERAS = look_at_cameras(torch.tensor([15.0, 30.0, -20.0, 60.0]), torch.tensor([0.0, 100.0, 200.0, 290.0]),
                              torch.full((4,), 3.0), 40.0, 24, 24)
GREY = torch.tensor([0.2, 0.3, 0.4])


@pytest.fixture(autouse=True)
def one_thread():
    """Renders of a few hundred pixels gain nothing from threads, and on a shared 2-core machine the second
    thread's waits make them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_cameras(resolution: int) -> Cameras:
    """Four of the toy world's cameras (distance 2.5, fovy 45 degrees), around and above and below."""
    return world_cameras(torch.tensor([15.0, 30.0, -20.0, 45.0]), torch.tensor([0.0, 100.0, 200.0, 290.0]), resolution)


def tensors(mesh, dtype=torch.float32):
    return torch.tensor(mesh.vertices, dtype=dtype), torch.tensor(mesh.faces)


def box(dtype=torch.float64):
    """A 12-face box, slightly irregular so that no pixel centre sits on an edge or a vertex's row."""
    vertices, faces = tensors(trimesh.creation.box(extents=(0.9, 1.0, 1.1)), dtype)
    return vertices + 0.03 * torch.sin(torch.arange(vertices.numel(), dtype=dtype) * 1.7).view_as(vertices), faces


def test_barycentrics_are_the_rasterizers():
    vertices, faces = tensors(trimesh.creation.icosphere(2, radius=0.7))
    fragments = rasterize(vertices, faces, CAMERAS)
    bary = barycentrics(vertices, faces, CAMERAS, fragments)
    assert fragments.covered.sum() > 200
    assert torch.allclose(bary, fragments.bary, atol=1e-5)
    assert (bary[~fragments.covered] == 0).all()
    # interpolating the positions gives the surface point at the rasterizer's depth along the ray
    origins, dirs = CAMERAS.rays()
    points = interpolate(vertices, faces, fragments, bary)
    along = origins + fragments.depth.unsqueeze(-1) * dirs
    assert torch.allclose(points[fragments.covered], along[fragments.covered], atol=1e-4)


def test_antialiased_alpha_is_the_covered_area_at_a_straight_edge():
    # a square in the plane x = 0 seen head-on from +x: its sides are image columns and rows
    cameras = look_at_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), 40.0, 24, 24)
    vertices = torch.tensor([[0.0, -0.52, -0.61], [0.0, 0.47, -0.61], [0.0, 0.47, 0.58], [0.0, -0.52, 0.58]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    out = render_mesh(vertices, faces, cameras, GREY, torch.ones(4, 3))
    pixels, _ = _project(vertices, cameras)
    (left, right), (top, bottom) = pixels[0, :2, 0].sort().values, pixels[0, 1:3, 1].sort().values
    columns = torch.arange(24) + 0.5
    # a pixel's area covered across one straight edge: the part of [j, j+1] inside [left, right]
    expected = ((columns + 0.5).minimum(right) - (columns - 0.5).maximum(left)).clamp(0, 1)
    assert 0.1 < float(left % 1) < 0.9 and 0.1 < float(right % 1) < 0.9  # the edges cut through pixels
    middle = slice(int(top) + 2, int(bottom) - 1)
    assert torch.allclose(out.alpha[0, middle, :, 0], expected.expand(middle.stop - middle.start, -1), atol=1e-4)
    rows = ((columns + 0.5).minimum(bottom) - (columns - 0.5).maximum(top)).clamp(0, 1)
    assert torch.allclose(out.alpha[0, :, 12, 0], rows, atol=1e-4)
    # the colour blends into the background by the same weights
    assert torch.allclose(out.rgb[0, 12], expected.unsqueeze(-1) + (1 - expected.unsqueeze(-1)) * GREY, atol=1e-4)


def test_silhouettes_do_not_depend_on_winding():
    # a mesh extracted without consistent orientation renders as the oriented one: edges are silhouettes by
    # the sides their faces lie on, so no interior edge blends the colours of its two faces
    vertices, faces = tensors(trimesh.creation.icosphere(1, radius=0.8))
    colours = torch.rand(len(vertices), 3, generator=torch.Generator().manual_seed(5))
    flipped = torch.where((torch.arange(len(faces)) % 2 == 0).unsqueeze(-1), faces.flip(-1), faces)
    oriented = render_mesh(vertices, faces, CAMERAS, GREY, colours)
    mixed = render_mesh(vertices, flipped, CAMERAS, GREY, colours)
    assert torch.allclose(oriented.rgb, mixed.rgb, atol=1e-6) and torch.allclose(oriented.alpha, mixed.alpha, atol=1e-6)
    assert ((oriented.alpha > 0) & (oriented.alpha < 1)).sum() > 20
    fragments = rasterize(vertices, faces, CAMERAS)
    unblended = interpolate(colours, faces, fragments, barycentrics(vertices, faces, CAMERAS, fragments))
    inside = torch.nn.functional.max_pool2d((~fragments.covered).float(), 3, 1, 1) == 0  # away from the outline
    assert inside.sum() > 100 and torch.allclose(mixed.rgb[inside], unblended[inside], atol=1e-6)


def test_a_silhouette_hidden_behind_the_surface_blends_nothing():
    # the outline of a small sphere behind a large one crosses pixel pairs of the large one's faces, which
    # differ at almost every pair when its triangles are about a pixel wide
    front, front_faces = tensors(trimesh.creation.icosphere(3, radius=0.6))
    back, back_faces = tensors(trimesh.creation.icosphere(2, radius=0.3))
    cameras = toy_cameras(32)[:1]
    behind = -0.9 * torch.nn.functional.normalize(cameras.c2w[0, :3, 3], dim=0)  # on the far side from the camera
    vertices = torch.cat([front, back + behind])
    faces = torch.cat([front_faces, back_faces + len(front)])
    colours = torch.rand(len(vertices), 3, generator=torch.Generator().manual_seed(9))
    both = render_mesh(vertices, faces, cameras, GREY, colours)
    alone = render_mesh(front, front_faces, cameras, GREY, colours[:len(front)])
    assert rasterize(back + behind, back_faces, cameras).covered.sum() > 20  # in view were the front not there
    assert torch.allclose(both.rgb, alone.rgb, atol=1e-6) and torch.allclose(both.alpha, alone.alpha, atol=1e-6)


def central_differences(loss, vertices, h, same_faces):
    grad = torch.zeros_like(vertices)
    for k in range(vertices.numel()):
        step = torch.zeros_like(vertices).view(-1)
        step[k] = h
        plus, minus = vertices + step.view_as(vertices), vertices - step.view_as(vertices)
        assert same_faces(plus) and same_faces(minus)  # the step leaves visibility as it is
        grad.view(-1)[k] = (loss(plus) - loss(minus)) / (2 * h)
    return grad


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_render_gradient_matches_finite_differences():
    vertices, faces = box()
    colours = torch.rand(len(vertices), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.rand(2, 20, 20, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    faces_at = rasterize(vertices, faces, CAMERAS).face

    def loss(v):
        out = render_mesh(v, faces, CAMERAS, GREY, colours, LightConfig(direction=(0.3, 0.5, 1.0)), with_normals=True)
        image = torch.cat([out.rgb, out.alpha, out.extras["normal_rgb"], out.depth, out.normal[..., :2]], -1)
        return (weights * image).sum()

    vertices.requires_grad_(True)
    loss(vertices).backward()
    with torch.no_grad():
        numeric = central_differences(loss, vertices.detach(), 1e-6,
                                      lambda v: torch.equal(rasterize(v, faces, CAMERAS).face, faces_at))
    assert relative_error(vertices.grad, numeric) < 1e-5

    def alpha_loss(v):
        return (weights[..., 0] * render_mesh(v, faces, CAMERAS, GREY, colours).alpha[..., 0]).sum()

    vertices.grad = None
    alpha_loss(vertices).backward()
    with torch.no_grad():
        numeric = central_differences(alpha_loss, vertices.detach(), 1e-6,
                                      lambda v: torch.equal(rasterize(v, faces, CAMERAS).face, faces_at))
    assert vertices.grad.abs().sum() > 1 and relative_error(vertices.grad, numeric) < 1e-5


def test_antialias_gradient_matches_finite_differences():
    vertices, faces = tensors(trimesh.creation.icosphere(1, radius=0.8), torch.float64)
    fragments = rasterize(vertices, faces, CAMERAS)
    image = torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(v):
        return (weights * antialias(image, fragments, v, faces, CAMERAS)).sum()

    vertices.requires_grad_(True)
    loss(vertices).backward()
    with torch.no_grad():
        numeric = central_differences(loss, vertices.detach(), 1e-6,
                                      lambda v: torch.equal(rasterize(v, faces, CAMERAS).face, fragments.face))
    assert vertices.grad.abs().sum() > 1 and relative_error(vertices.grad, numeric) < 1e-5
    # only pixels beside a pixel of another face change
    changed = (antialias(image, fragments, vertices.detach(), faces, CAMERAS) != image).any(-1)
    face = torch.nn.functional.pad(fragments.face, (1, 1, 1, 1), value=-2)
    beside = [face[:, 1:-1, :-2], face[:, 1:-1, 2:], face[:, :-2, 1:-1], face[:, 2:, 1:-1]]
    border = torch.stack([fragments.face != f for f in beside]).any(0) & (face[:, 1:-1, 1:-1] != -2)
    assert changed.sum() > 20 and not (changed & ~border).any()


def silhouette_fit(smooth: bool, cameras: Cameras, target: Tensor, subdivisions: int, radius: float, lr: float
                   ) -> tuple[float, float]:
    """IoU of a shifted icosphere's silhouettes against ``target`` alpha [B,H,W,1], before and after 50 Adam steps on
    per-vertex offsets. Without antialiasing, alpha is the coverage interpolated at each pixel's own face: 1
    wherever covered, whatever the vertices, so the loss has no gradient and nothing moves."""
    vertices, faces = tensors(trimesh.creation.icosphere(subdivisions, radius=radius))
    vertices = vertices + torch.tensor([0.1, -0.1, 0.05])
    offsets = torch.zeros_like(vertices, requires_grad=True)
    optimiser = torch.optim.Adam([offsets], lr=lr)

    def iou() -> float:
        covered = rasterize(vertices + offsets.detach(), faces, cameras).covered
        truth = target[..., 0] > 0.5
        return float((covered & truth).sum() / (covered | truth).sum())

    before = iou()
    ones = torch.ones(len(vertices), 1)
    for _ in range(50):
        moved = vertices + offsets
        if smooth:
            alpha = render_mesh(moved, faces, cameras, GREY, ones.expand(-1, 3)).alpha
        else:
            fragments = rasterize(moved.detach(), faces, cameras)
            alpha = interpolate(ones, faces, fragments, barycentrics(moved, faces, cameras, fragments))
        loss = ((alpha - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return before, iou()


def test_silhouette_fit_moves_the_outline_only_with_antialiasing():
    # a larger, shifted sphere
    target = render_mesh(*tensors(trimesh.creation.icosphere(3, radius=0.75)), FIT_CAMERAS, GREY, lambda p: p).alpha
    before, after = silhouette_fit(True, FIT_CAMERAS, target.detach(), 2, 0.5, 0.02)
    assert before < 0.7 and after > 0.9
    before, after = silhouette_fit(False, FIT_CAMERAS, target.detach(), 2, 0.5, 0.02)
    assert after == before < 0.7


def test_a_fine_sphere_fits_the_toy_worlds_sphere():
    # a 1,280-face icosphere at 32 pixels: its triangles are about a pixel wide, less across the outline, where
    # the edge past an outline pixel mostly belongs to another face than the pixel's; looking for it only among
    # the pixel's own face's edges (this renderer before) left IoU at 0.56 after these 50 steps
    cameras = toy_cameras(32)
    target = render_shapes(cameras, [SHAPES.index("sphere")] * len(cameras))["mask"]
    before, after = silhouette_fit(True, cameras, target, 3, 0.4, 0.01)
    assert before < 0.5 and after > 0.85


def outline_share(vertices: Tensor, faces: Tensor, cameras: Cameras) -> float:
    """The share of outline pixels (covered, with an empty 4-neighbour) whose alpha or an empty 4-neighbour's
    changes to first order under a random move of the vertices: the antialiased coverage of a pair moves on
    the side of the pixel centres' midpoint the edge crosses at, so on one pixel of the pair or the other."""
    direction = torch.randn(vertices.shape, generator=torch.Generator().manual_seed(6), dtype=vertices.dtype)
    _, rate = torch.autograd.functional.jvp(
        lambda v: render_mesh(v, faces, cameras, GREY, torch.ones_like(v)).alpha[..., 0], vertices, direction)
    covered = rasterize(vertices, faces, cameras).covered
    empty = torch.nn.functional.pad(~covered, (1, 1, 1, 1), value=True)
    moving = torch.nn.functional.pad(rate != 0, (1, 1, 1, 1))
    sides = [(slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None)), (slice(0, -2), slice(1, -1)),
             (slice(2, None), slice(1, -1))]
    outline = covered & torch.stack([empty[:, y, x] for y, x in sides]).any(0)
    moves = (rate != 0) | torch.stack([empty[:, y, x] & moving[:, y, x] for y, x in sides]).any(0)
    return float((outline & moves).sum() / outline.sum())


@pytest.mark.parametrize("subdivisions,resolution", [(3, 24), (4, 32)])
def test_the_whole_outline_of_pixel_sized_triangles_moves(subdivisions, resolution):
    # the toy world's cameras on its sphere: finding the edge only among the outline pixel's own face's edges
    # (this renderer before) moved 2.5% (1,280 faces at 24 pixels) and 0.5% (5,120 faces at 32) of the outline
    vertices, faces = tensors(trimesh.creation.icosphere(subdivisions, radius=0.6))
    assert outline_share(vertices, faces, toy_cameras(resolution)) > 0.95


def test_the_gradient_of_pixel_sized_triangles_matches_finite_differences():
    # on a 1,280-face icosphere at 24 pixels, where the outline's edges mostly belong to faces that cover no
    # pixel centre: 12 of their vertices (which had no gradient in this renderer before), 4 vertices of faces
    # that cover one and 4 vertices without gradient, against central differences
    vertices, faces = tensors(trimesh.creation.icosphere(3, radius=0.6), torch.float64)
    cameras = toy_cameras(24)[:2]
    colours = torch.rand(len(vertices), 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights = torch.rand(2, 24, 24, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    faces_at = rasterize(vertices, faces, cameras).face
    unseen = torch.ones(len(vertices), dtype=torch.bool)
    unseen[faces[faces_at[faces_at >= 0]].reshape(-1)] = False

    def loss_of(v):
        out = render_mesh(v, faces, cameras, GREY, colours)
        return (weights * torch.cat([out.rgb, out.alpha], -1)).sum()

    vertices.requires_grad_(True)
    loss_of(vertices).backward()
    strength = vertices.grad.norm(dim=-1)
    chosen = torch.cat([torch.where(unseen, strength, -1).topk(12).indices,
                        torch.where(unseen, -1, strength).topk(4).indices, (strength == 0).nonzero().squeeze(1)[:4]])
    grad, vertices = vertices.grad[chosen], vertices.detach()

    def moved(offsets):
        return vertices.index_add(0, chosen, offsets)

    with torch.no_grad():
        numeric = central_differences(lambda o: loss_of(moved(o)), torch.zeros(len(chosen), 3, dtype=torch.float64),
                                      1e-6, lambda o: torch.equal(rasterize(moved(o), faces, cameras).face, faces_at))
    assert (strength[chosen[:16]] > 0).all() and (strength[chosen[16:]] == 0).all()
    assert relative_error(grad, numeric) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_renders_and_differentiates_as_the_cpu_does():
    vertices, faces = tensors(trimesh.creation.icosphere(2, radius=0.7))
    colours = torch.rand(len(vertices), 3, generator=torch.Generator().manual_seed(4))
    results = []
    for device in ("cpu", "cuda"):
        v = vertices.to(device).requires_grad_(True)
        out = render_mesh(v, faces.to(device), CAMERAS.to(device), GREY.to(device), colours.to(device),
                          LightConfig(), with_normals=True)
        (out.rgb.sum() + out.alpha.sum() + out.extras["normal_rgb"].square().sum()).backward()
        results.append([t.detach().cpu() for t in (out.rgb, out.alpha, out.depth, out.normal, v.grad)])
    for cpu, gpu in zip(*results):
        assert torch.allclose(cpu, gpu, atol=1e-4, rtol=1e-4)
