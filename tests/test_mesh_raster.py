"""The PyTorch mesh rasterizer: silhouettes and depths against analytic ones, textures rendered back where they
belong, the texture gradient against finite differences, the depth test, chunking, CPU against CUDA."""

import pytest
import torch
import trimesh

from dream3d.representations.cameras import look_at_cameras, ray_aabb
from dream3d.representations.mesh_raster import rasterize, render_textured
from dream3d.representations.textured_mesh import TexturedMesh

CAMERAS = look_at_cameras(torch.tensor([0.0, 30.0, -20.0, 75.0]), torch.tensor([0.0, 45.0, 130.0, 200.0]),
                          torch.full((4,), 2.5), 45.0, 64, 64)
WHITE = torch.ones(3)


def tensors(mesh):
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)


def iou(a, b):
    return float((a & b).sum() / (a | b).sum())


def test_cube_silhouette_and_depth_are_the_analytic_ones():
    fragments = rasterize(*tensors(trimesh.creation.box()), CAMERAS)
    origins, dirs = CAMERAS.rays()
    t_near, _, hit = ray_aabb(origins, dirs, 0.5)
    assert iou(fragments.covered, hit) > 0.98
    both = fragments.covered & hit
    assert torch.allclose(fragments.depth[both], t_near[both], atol=1e-4)  # distance along the unit ray
    assert (fragments.depth[~fragments.covered] == 0).all()


def test_sphere_silhouette_is_the_analytic_one():
    radius = 0.6
    fragments = rasterize(*tensors(trimesh.creation.icosphere(4, radius=radius)), CAMERAS)
    origins, dirs = CAMERAS.rays()
    b = (origins * dirs).sum(-1)
    hit = b * b - ((origins * origins).sum(-1) - radius**2) > 0
    assert iou(fragments.covered, hit) > 0.98


def cube_with_face_colours():
    """A unit cube whose six sides sample six colour blocks of a [4,24,3] texture (per-corner uv [F,3,2]),
    the colours, and each face's side index."""
    box = trimesh.creation.box()
    normals = torch.tensor(box.face_normals, dtype=torch.float32)
    side = normals.abs().argmax(-1) * 2 + (normals.sum(-1) < 0).long()  # +x, -x, +y, -y, +z, -z
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.float32)
    texture = colours.repeat_interleave(4, 0).unsqueeze(0).repeat(4, 1, 1)  # block k covers columns 4k..4k+3
    uv = torch.stack([(side.float() + 0.5) / 6, torch.full_like(side.float(), 0.5)], -1)
    return box, uv.unsqueeze(1).expand(-1, 3, -1).contiguous(), texture, colours, side


def test_texture_renders_back_at_the_right_pixels():
    box, uv, texture, colours, _ = cube_with_face_colours()
    out = render_textured(*tensors(box), uv, texture, CAMERAS, WHITE)
    origins, dirs = CAMERAS.rays()
    t_near, _, hit = ray_aabb(origins, dirs, 0.5)
    point = origins + t_near.unsqueeze(-1) * dirs
    axis = point.abs().argmax(-1)
    side = axis * 2 + (point.gather(-1, axis.unsqueeze(-1)).squeeze(-1) < 0).long()
    clear = hit & (point.abs().sort(-1).values[..., 1] < 0.45)  # away from the cube's edges
    assert clear.sum() > 1000
    assert torch.allclose(out.rgb[clear], colours[side[clear]], atol=1e-5)
    assert (out.rgb[~out.alpha[..., 0].bool()] == 1).all() and ((out.alpha == 0) | (out.alpha == 1)).all()


def quad(z, size=0.5):
    """A square facing +z at height z, uv spanning [0,1]^2 (u along +x, v along +y)."""
    vertices = torch.tensor([[-size, -size, z], [size, -size, z], [size, size, z], [-size, size, z]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return vertices, torch.tensor([[0, 1, 2], [0, 2, 3]]), uv


def test_uv_orientation_follows_obj():
    # seen from above, +x is the image's right and +y its top (camera up is +y when looking down -z from +z)
    cameras = look_at_cameras(torch.tensor([89.999]), torch.tensor([-90.0]), torch.tensor([2.5]), 45.0, 32, 32)
    vertices, faces, uv = quad(0.0, size=1.0)
    texture = torch.zeros(8, 8, 3)
    texture[:4, :4] = torch.tensor([1.0, 0, 0])  # top-left of the image: u < 0.5, v > 0.5
    texture[4:, 4:] = torch.tensor([0, 0, 1.0])  # bottom-right: u > 0.5, v < 0.5
    rgb = render_textured(vertices, faces, uv, texture, cameras, WHITE).rgb[0]
    assert torch.allclose(rgb[10, 10], torch.tensor([1.0, 0, 0])) and torch.allclose(rgb[21, 21], torch.tensor([0, 0, 1.0]))


@pytest.mark.parametrize("front_first", [True, False])
def test_nearest_surface_wins(front_first):
    cameras = look_at_cameras(torch.tensor([60.0]), torch.tensor([20.0]), torch.tensor([2.5]), 45.0, 32, 32)
    near, faces, uv = quad(0.3)
    far, _, _ = quad(-0.3, size=0.8)
    first, second = (near, far) if front_first else (far, near)
    vertices = torch.cat([first, second])
    texture = torch.stack([torch.tensor([1.0, 0, 0]).expand(4, 4, 3), torch.tensor([0, 1.0, 0]).expand(4, 4, 3)], 1)
    texture = texture.reshape(4, 8, 3)  # left half red, right half green
    red_uv, green_uv = uv * torch.tensor([0.2, 1.0]) + 0.05, uv * torch.tensor([0.2, 1.0]) + torch.tensor([0.6, 0.05])
    all_uv = torch.cat([red_uv, green_uv] if front_first else [green_uv, red_uv])
    out = render_textured(vertices, torch.cat([faces, faces + 4]), all_uv, texture, cameras, WHITE)
    near_only = rasterize(near, faces, cameras).covered[0]
    far_only = rasterize(far, faces, cameras).covered[0]
    both = near_only & far_only
    assert both.sum() > 50 and (far_only & ~near_only).sum() > 20
    assert torch.allclose(out.rgb[0][both], torch.tensor([1.0, 0, 0]), atol=1e-5)  # the near quad's colour
    assert torch.allclose(out.rgb[0][far_only & ~near_only], torch.tensor([0, 1.0, 0]), atol=1e-5)


def test_texture_gradient_equals_finite_differences_and_reaches_only_visible_texels():
    box, uv, texture, _, side = cube_with_face_colours()
    vertices, faces = tensors(box)
    cameras = look_at_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.5]), 45.0, 24, 24)
    texture = torch.rand(4, 24, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.randn(1, 24, 24, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(t):
        return (render_textured(vertices, faces, uv, t, cameras, WHITE.double()).rgb * weights).sum()

    texture.requires_grad_()
    loss(texture).backward()
    eps = 1e-6
    finite = torch.zeros_like(texture)
    with torch.no_grad():
        for index in range(texture.numel()):
            step = torch.zeros(texture.numel(), dtype=torch.float64)
            step[index] = eps
            step = step.view_as(texture)
            finite.view(-1)[index] = (loss(texture + step) - loss(texture - step)) / (2 * eps)
    assert torch.allclose(texture.grad, finite, atol=1e-6)
    # seen from azimuth 30, elevation 20: the +x, +y and +z sides; the blocks of the other three get nothing
    visible = texture.grad.abs().sum((0, 2)).view(6, 4).sum(-1) > 0
    assert visible.tolist() == [True, False, True, False, True, False]


def test_chunking_does_not_change_the_result():
    vertices, faces = tensors(trimesh.creation.icosphere(2, radius=0.7))
    whole = rasterize(vertices, faces, CAMERAS)
    chunked = rasterize(vertices, faces, CAMERAS, max_pairs=37)
    assert torch.equal(whole.face, chunked.face) and torch.equal(whole.depth, chunked.depth)
    assert torch.equal(whole.bary, chunked.bary)


def test_textured_mesh_is_a_representation_whose_texture_learns():
    box, uv, _, colours, _ = cube_with_face_colours()
    mesh = TexturedMesh(*tensors(box), uv, torch.full((4, 24, 3), 0.5), lr=0.1)
    goal = 0.1 + 0.8 * colours.repeat_interleave(4, 0).expand(4, 24, 3)  # inside the sigmoid's reach
    target = render_textured(*tensors(box), uv, goal, CAMERAS, WHITE).rgb
    (group,) = mesh.param_groups()
    optimizer = torch.optim.Adam(group["params"], lr=group["lr"])
    for _ in range(60):
        optimizer.zero_grad()
        loss = ((mesh.render(CAMERAS, WHITE).rgb - target) ** 2).mean()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 1e-4
    assert mesh.texture_image().dtype.name == "uint8" and mesh.texture_image().shape == (4, 24, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_renders_as_the_cpu_does():
    box, uv, texture, _, _ = cube_with_face_colours()
    vertices, faces = tensors(box)
    cpu = render_textured(vertices, faces, uv, texture, CAMERAS, WHITE)
    gpu = render_textured(vertices.cuda(), faces.cuda(), uv.cuda(), texture.cuda(), CAMERAS.to("cuda"), WHITE.cuda())
    assert torch.equal(cpu.alpha, gpu.alpha.cpu())
    assert torch.allclose(cpu.rgb, gpu.rgb.cpu(), atol=1e-5) and torch.allclose(cpu.depth, gpu.depth.cpu(), atol=1e-5)
