"""The toy world: prompt grammar, exact SDFs, and renders against analytic ground truth."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.priors.toy_world import (
    ALBEDOS, CLASSES, COLOURS, SDFS, SHAPES, class_index, parse_prompt, render_classes, render_shapes,
)
from dream3d.representations.cameras import Cameras, look_at_cameras

DIST, FOVY = 2.5, 45.0


def side_cameras(n: int, size: int, elevation: float = 0.0) -> Cameras:
    az = torch.linspace(0, 300, n)
    return look_at_cameras(torch.full((n,), elevation), az, torch.full((n,), DIST), FOVY, size, size)


def top_camera(size: int) -> Cameras:
    """Straight down from z = 2.5 with +y up in the image (look_at_cameras is singular there)."""
    c2w = torch.eye(4)
    c2w[2, 3] = DIST
    return Cameras(c2w[None], torch.tensor([math.radians(FOVY)]), size, size,
                   torch.tensor([90.0]), torch.tensor([0.0]), torch.tensor([DIST]))


def pixel_ndc(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[size, size] image-plane coordinates (x right, y up) of pixel centres in units of tan(fovy/2)."""
    c = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(-c, c, indexing="ij")
    return x, y


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---- prompts

def test_class_order_is_shape_major():
    assert len(CLASSES) == 36 and len({c.name for c in CLASSES}) == 36
    assert CLASSES[0].name == "red sphere" and CLASSES[6].name == "red cube" and CLASSES[35].name == "purple pyramid"
    assert class_index("blue", "torus") == SHAPES.index("torus") * 6 + list(COLOURS).index("blue")


@pytest.mark.parametrize("prompt, expected", [
    ("a red cube", [class_index("red", "cube")]),
    ("The RED cube.", [class_index("red", "cube")]),
    ("a red shape", [class_index("red", s) for s in SHAPES]),
    ("an orange object", [class_index("orange", s) for s in SHAPES]),
    ("a cube", [class_index(c, "cube") for c in COLOURS]),
    ("a, purple torus!", [class_index("purple", "torus")]),
    ("", list(range(36))),
    ("the", list(range(36))),
])
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == sorted(expected)


@pytest.mark.parametrize("prompt, named", [
    ("a fluffy cube", ["'fluffy'"]),
    ("a shiny wooden sphere", ["'shiny'", "'wooden'"]),
    ("a cube sphere", ["cube", "sphere"]),
    ("a red blue cone", ["red", "blue"]),
])
def test_parse_prompt_errors(prompt, named):
    with pytest.raises(PriorError) as info:
        parse_prompt(prompt)
    message = str(info.value)
    assert "\n" not in message
    assert all(word in message for word in named)
    assert all(word in message for word in (*COLOURS, *SHAPES))  # the vocabulary


# ---- signed distance functions

INSIDE = {
    "sphere": [(0, 0, 0), (0, 0, 0.59), (0.34, 0.34, 0.34)],
    "cube": [(0.44, 0.44, 0.44), (-0.44, 0.0, -0.44)],
    "cylinder": [(0.44, 0, 0), (0, 0, 0.49), (0.3, 0.3, -0.49)],
    "cone": [(0, 0, 0.54), (0.54, 0, -0.49), (0.28, 0, 0)],
    "torus": [(0.45, 0, 0), (0, -0.62, 0), (0.45, 0, 0.17)],
    "pyramid": [(0, 0, -0.44), (0, 0, 0.49), (0.44, -0.44, -0.44), (0.22, 0.22, 0.025)],
}
OUTSIDE = {
    "sphere": [(0, 0, 0.61), (0.35, 0.35, 0.35)],
    "cube": [(0.46, 0, 0), (0.44, 0.44, 0.46)],
    "cylinder": [(0, 0, 0.51), (0.32, 0.32, 0)],
    "cone": [(0, 0, 0.56), (0, 0, -0.51), (0.3, 0, 0), (0.56, 0, -0.49)],
    "torus": [(0, 0, 0), (0.64, 0, 0), (0.45, 0, 0.19)],
    "pyramid": [(0, 0, 0.51), (0, 0, -0.46), (0.46, 0, -0.44), (0.23, 0, 0.025)],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_sign(shape):
    assert (SDFS[shape](torch.tensor(INSIDE[shape])) < 0).all()
    assert (SDFS[shape](torch.tensor(OUTSIDE[shape])) > 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_is_exact(shape):
    """1-Lipschitz, and stepping |f| along -sign(f) grad f lands on the surface: so |f| is the true distance."""
    sdf = SDFS[shape]
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20000, 3, generator=g) * 2 - 1
    b = a + torch.randn(20000, 3, generator=g) * 0.02
    assert ((sdf(a) - sdf(b)).abs() / (a - b).norm(dim=-1)).max() <= 1 + 1e-4
    p = a.clone().requires_grad_()
    d = sdf(p)
    (grad,) = torch.autograd.grad(d.sum(), p)
    assert sdf(a - d.detach().unsqueeze(-1) * F.normalize(grad, dim=-1)).abs().max() < 1e-5


def test_sdf_known_distances():
    def dist(shape, *p):
        return float(SDFS[shape](torch.tensor([p]))[0])
    assert dist("sphere", 1.0, 0, 0) == pytest.approx(0.4)
    assert dist("cube", 0, 1.0, 0) == pytest.approx(0.55)
    assert dist("cube", 1.45, 1.45, 0.45) == pytest.approx(math.sqrt(2))
    assert dist("pyramid", 0, 0, -0.6) == pytest.approx(0.15)  # below the base, not to the slanted faces
    assert dist("pyramid", 0, 0, 1.0) == pytest.approx(0.5)
    assert dist("cone", 0, 0, 1.0) == pytest.approx(0.45)
    assert dist("torus", 0, 0, 0) == pytest.approx(0.27)


# ---- rendering

def test_sphere_silhouette_is_the_analytic_disk():
    size, r = 64, 0.6
    out = render_shapes(side_cameras(3, size, elevation=20.0), [0, 0, 0])
    radius = (r / math.sqrt(DIST**2 - r**2)) / math.tan(math.radians(FOVY) / 2)  # in units of tan(fovy/2)
    x, y = pixel_ndc(size)
    disk = x**2 + y**2 < radius**2
    for mask in out["mask"][..., 0]:
        assert iou(mask > 0.5, disk) > 0.97
        assert float(mask.sum()) == pytest.approx(math.pi * (radius * size / 2) ** 2, rel=0.01)


def test_cube_from_above_is_its_top_face():
    size = 64
    out = render_classes(top_camera(size), [class_index("green", "cube")])
    half = 0.45 / (DIST - 0.45) / math.tan(math.radians(FOVY) / 2)
    x, y = pixel_ndc(size)
    square = (x.abs() < half) & (y.abs() < half)
    mask = out["mask"][0, ..., 0]
    assert iou(mask > 0.5, square) > 0.95
    full = mask == 1
    # the top face is lit straight on: radiance = albedo * 1
    green = ALBEDOS[class_index("green", "cube")]
    assert torch.allclose(out["rgb"][0][full], green.expand(int(full.sum()), 3), atol=1e-4)
    assert float(out["depth"][0, size // 2, size // 2, 0]) == pytest.approx(DIST - 0.45, abs=1e-3)


def test_sphere_shading_and_depth():
    size = 65  # odd and one ray per pixel, so the centre ray goes straight at the sphere's centre
    side = render_classes(side_cameras(1, size), [class_index("red", "sphere")], supersample=1)
    top = render_classes(top_camera(size), [class_index("red", "sphere")], supersample=1)
    albedo = torch.tensor(COLOURS["red"])
    c = size // 2
    assert torch.allclose(side["rgb"][0, c, c], albedo * 0.45, atol=1e-4)  # n_z = 0 at the equator
    assert torch.allclose(top["rgb"][0, c, c], albedo * 1.0, atol=1e-4)  # n_z = 1 at the pole
    assert float(side["depth"][0, c, c, 0]) == pytest.approx(DIST - 0.6, abs=2e-4)
    for out in (side, top):
        assert float(out["mask"][0, 0, 0, 0]) == 0 and float(out["depth"][0, 0, 0, 0]) == 0
        assert torch.equal(out["rgb"][0, 0, 0], torch.ones(3))  # white background


def test_supersampling_averages_subsamples():
    """A 2x-supersampled pixel is exactly the mean of the four rays a 2x larger render shoots."""
    cams = side_cameras(2, 32, elevation=30.0)
    ids = [class_index("blue", "torus"), class_index("yellow", "pyramid")]
    coarse = render_classes(cams, ids, supersample=2)
    fine = render_classes(cams.resized(64, 64), ids, supersample=1)
    pool = lambda t: F.avg_pool2d(t.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # noqa: E731
    assert torch.allclose(coarse["rgb"], pool(fine["rgb"]), atol=1e-5)
    assert torch.allclose(coarse["mask"], pool(fine["mask"]), atol=1e-6)
    edge = (coarse["mask"] > 0) & (coarse["mask"] < 1)
    assert edge.any()  # anti-aliased: partial coverage along silhouettes


def test_mixed_batch_matches_separate_renders():
    cams = side_cameras(4, 24, elevation=10.0)
    ids = [3, 1, 3, 5]
    batch = render_shapes(cams, ids)
    for i, s in enumerate(ids):
        alone = render_shapes(cams[i], [s])
        for key in ("mask", "shade", "depth"):
            assert torch.allclose(batch[key][i], alone[key][0], atol=1e-6)
    assert set(batch) == {"mask", "shade", "depth"} and batch["mask"].shape == (4, 24, 24, 1)
