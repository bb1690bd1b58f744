"""Lambertian shading: the formula, the NeRF's shaded renders (albedo lit at the density's normals), a lit
textured mesh, and which runs' textures are rendered lit."""

import pytest
import torch
import trimesh

from dream3d.config import build_config
from dream3d.guidance.priors.toy_world import AMBIENT, DIFFUSE, world_cameras
from dream3d.export.refine import trained_light
from dream3d.representations.cameras import look_at_cameras
from dream3d.representations.mesh_raster import face_normals, render_textured
from dream3d.representations.nerf import NeRF, NeRFConfig
from dream3d.representations.shading import LightConfig, lambert

WHITE = torch.ones(3)


def test_lambert_is_albedo_times_ambient_plus_diffuse_cosine():
    g = torch.Generator().manual_seed(0)
    albedo = torch.rand(50, 3, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(50, 3, generator=g), dim=-1)
    light = LightConfig(direction=(0.0, 3.0, 4.0), ambient=0.2, diffuse=0.7)  # not unit: the direction is normalised
    cosine = (normals @ torch.tensor([0.0, 0.6, 0.8])).clamp_min(0)
    assert torch.allclose(lambert(albedo, normals, light), albedo * (0.2 + 0.7 * cosine)[:, None], atol=1e-6)


def test_the_default_light_is_the_toy_worlds():
    light = LightConfig()
    assert light.direction == (0.0, 0.0, 1.0) and (light.ambient, light.diffuse) == (AMBIENT, DIFFUSE)


def test_a_light_without_a_direction_is_refused():
    with pytest.raises(ValueError, match="zero vector"):
        LightConfig(direction=(0.0, 0.0, 0.0))


def test_nerf_shading_with_ambient_light_only_scales_the_colour_exactly():
    cameras = world_cameras(torch.tensor([10.0, 60.0]), torch.tensor([0.0, 90.0]), 16)
    plain = NeRF(NeRFConfig()).render(cameras, WHITE)
    lit = NeRF(NeRFConfig(shading="lambert", light=LightConfig(ambient=0.3, diffuse=0.0))).render(cameras, WHITE)
    assert torch.equal(lit.alpha, plain.alpha)
    # rgb = colour + (1 - alpha) background: the colour part scales by the ambient term
    assert torch.allclose(lit.rgb - (1 - lit.alpha), 0.3 * (plain.rgb - (1 - plain.alpha)), atol=1e-6)


def test_nerf_shading_lights_the_side_that_faces_the_light():
    """The density blob is a ball: seen from above, the light from above falls head-on; seen from the side, the
    centre pixel shows the equator, which the light grazes."""
    nerf = NeRF(NeRFConfig(shading="lambert", light=LightConfig(ambient=0.0, diffuse=1.0)))
    out = nerf.render(world_cameras(torch.tensor([89.0, 0.0]), torch.zeros(2), 33), WHITE)
    colour = out.rgb[:, 16, 16] - (1 - out.alpha[:, 16, 16])  # the albedo starts at sigmoid(0) = 0.5
    assert out.alpha[0, 16, 16] > 0.99
    assert colour[0].min() > 0.8 * 0.5 and colour[1].max() < 0.15 * 0.5


def test_nerf_shading_passes_the_gradient_to_the_density():
    """With shading the colour depends on the normals, so a colour-only loss moves the density grid too."""
    cameras = world_cameras(torch.tensor([30.0]), torch.tensor([0.0]), 16)
    grads = {}
    for shading in ("none", "lambert"):
        nerf = NeRF(NeRFConfig(shading=shading, light=LightConfig(direction=(1.0, 0.0, 0.0))))
        out = nerf.render(cameras, WHITE)
        (out.rgb - (1 - out.alpha)).sum().backward()
        grads[shading] = nerf.grids[-1].grad[0, 0]
    assert not torch.allclose(grads["none"], grads["lambert"], atol=1e-6)


def test_a_lit_mesh_shows_each_face_at_its_cosine():
    box = trimesh.creation.box()  # faces wound outward
    vertices, faces = torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces)
    assert torch.allclose(face_normals(vertices, faces), torch.tensor(box.face_normals, dtype=torch.float32), atol=1e-6)
    texture = torch.full((4, 4, 3), 0.8)
    uv = torch.full((len(vertices), 2), 0.5)
    cameras = look_at_cameras(torch.tensor([89.0, 0.0]), torch.zeros(2), torch.full((2,), 2.5), 45.0, 33, 33)
    lit = render_textured(vertices, faces, uv, texture, cameras, WHITE, LightConfig())
    assert torch.allclose(lit.rgb[0, 16, 16], torch.full((3,), 0.8 * (AMBIENT + DIFFUSE)), atol=1e-5)  # the top face
    assert torch.allclose(lit.rgb[1, 16, 16], torch.full((3,), 0.8 * AMBIENT), atol=1e-5)  # a side face
    plain = render_textured(vertices, faces, uv, texture, cameras, WHITE)
    assert torch.allclose(plain.rgb[1, 16, 16], torch.full((3,), 0.8), atol=1e-5)


def test_only_a_shaded_nerf_run_renders_its_texture_lit():
    assert trained_light(build_config({"prompt": "a red cube"})) is None
    shaded = build_config({"prompt": "a red cube", "nerf": {"shading": "lambert"}})
    assert trained_light(shaded) == LightConfig()
    gaussians = build_config({"prompt": "a red cube", "representation": "gaussians", "nerf": {"shading": "lambert"}})
    assert trained_light(gaussians) is None
