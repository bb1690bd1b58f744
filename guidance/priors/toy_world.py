"""The toy world (docs/architecture.md#the-toy-world): six primitives in six colours, their prompt grammar
and a renderer.

Everything that renders the toy world (the embedded prior's dataset, the quality
benchmark's ground truth) goes through this module so that they agree exactly.
Shapes are signed distance functions (exact, hence 1-Lipschitz, so sphere tracing
never overshoots); rendering is sphere tracing with supersampled anti-aliasing.
"""

from __future__ import annotations

import string
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.prompts import clip
from dream3d.representations.cameras import Cameras, look_at_cameras, ray_aabb

# Bump when anything below changes how the world looks: it keys the prior's dataset cache.
WORLD_VERSION = "toy-world-1"
# Where the world's cameras sit: every view of it (the priors' datasets, the evaluation, the prior
# training and sampling) looks at the origin from this distance with this vertical field of view.
CAMERA_DISTANCE = 2.5
CAMERA_FOVY_DEG = 45.0

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.20, 0.70, 0.25),
    "blue": (0.20, 0.30, 0.85),
    "yellow": (0.90, 0.80, 0.15),
    "orange": (0.95, 0.50, 0.10),
    "purple": (0.55, 0.25, 0.75),
}
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
AMBIENT, DIFFUSE = 0.45, 0.55  # radiance = albedo * (AMBIENT + DIFFUSE * max(0, n_z))


class ToyClass(NamedTuple):
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


# Shape-major: class index = shape_index * len(COLOURS) + colour_index, so CLASSES[0:6] are the six spheres.
CLASSES: tuple[ToyClass, ...] = tuple(ToyClass(c, s) for s in SHAPES for c in COLOURS)
ALBEDOS = torch.tensor([COLOURS[c.colour] for c in CLASSES])  # [36, 3]
CLASS_SHAPE = torch.tensor([SHAPES.index(c.shape) for c in CLASSES])  # [36] shape index of each class

_ARTICLES = {"a", "an", "the"}
_ANY_SHAPE = {"object", "shape"}


def class_index(colour: str, shape: str) -> int:
    return CLASSES.index(ToyClass(colour, shape))


def vocabulary() -> str:
    """The prompt vocabulary as one line, for error messages."""
    return (f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; "
            f"'object'/'shape' for any shape; articles a/an/the are ignored")


def parse_prompt(prompt: str) -> list[int]:
    """Class indices (ascending) a prompt names; "" (or only articles) names the whole world.

    Raises PriorError (one line) on a word outside the vocabulary, two shapes or two colours.
    """
    words = [w.strip(string.punctuation) for w in prompt.lower().split()]
    words = [w for w in words if w and w not in _ARTICLES]
    unknown = [w for w in words if w not in COLOURS and w not in SHAPES and w not in _ANY_SHAPE]
    if unknown:
        bad = clip(", ".join(repr(w) for w in dict.fromkeys(unknown)))
        raise PriorError(f"the toy prior does not know {bad} in prompt {clip(prompt)!r}; {vocabulary()}")
    colours = list(dict.fromkeys(w for w in words if w in COLOURS))
    shapes = list(dict.fromkeys(w for w in words if w in SHAPES))
    for kind, found in (("colour", colours), ("shape", shapes)):
        if len(found) > 1:
            raise PriorError(f"prompt {clip(prompt)!r} names more than one {kind} ({', '.join(found)}); "
                             f"the toy world has one object of one colour; {vocabulary()}")
    return [i for i, c in enumerate(CLASSES)
            if (not colours or c.colour == colours[0]) and (not shapes or c.shape == shapes[0])]


# ---- signed distance functions: points [..., 3] -> distances [...] (Inigo Quilez's exact forms, z up)

def _length2(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


def sdf_sphere(p: Tensor) -> Tensor:
    return p.norm(dim=-1) - 0.6


def sdf_cube(p: Tensor) -> Tensor:
    q = p.abs() - 0.45
    return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)


def sdf_cylinder(p: Tensor) -> Tensor:
    dx = _length2(p[..., 0], p[..., 1]) - 0.45
    dz = p[..., 2].abs() - 0.5
    return torch.maximum(dx, dz).clamp_max(0) + _length2(dx.clamp_min(0), dz.clamp_min(0))


def sdf_cone(p: Tensor) -> Tensor:
    """sdCappedCone with radius 0.55 at z=-0.5 and 0 at z=0.55."""
    h, r1 = 0.525, 0.55  # half height; centre at z = 0.025
    qx, qy = _length2(p[..., 0], p[..., 1]), p[..., 2] - 0.025
    # k1 = (0, h), k2 = (-r1, 2h): the slanted side from base rim to apex
    ca_x = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx)))
    ca_y = qy.abs() - h
    s = ((-qx * -r1 + (h - qy) * 2 * h) / (r1 * r1 + 4 * h * h)).clamp(0, 1)
    cb_x, cb_y = qx - r1 * s, qy - h + 2 * h * s
    sign = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
    return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def sdf_torus(p: Tensor) -> Tensor:
    return _length2(_length2(p[..., 0], p[..., 1]) - 0.45, p[..., 2]) - 0.18


def sdf_pyramid(p: Tensor) -> Tensor:
    """sdPyramid (unit base, height h) scaled by 0.9: base half-extent 0.45 at z=-0.45, apex z=0.5."""
    scale, h = 0.9, 0.95 / 0.9
    m2 = h * h + 0.25
    x, z = (p[..., 0].abs() / scale, p[..., 1].abs() / scale)
    y = (p[..., 2] + 0.45) / scale
    x, z = torch.maximum(x, z) - 0.5, torch.minimum(x, z) - 0.5  # fold into the octant with x >= z
    qx, qy, qz = z, h * y - 0.5 * x, h * x + 0.5 * y
    s = (-qx).clamp_min(0)
    t = ((qy - 0.5 * z) / (m2 + 0.25)).clamp(0, 1)
    a = m2 * (qx + s) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0, torch.zeros_like(a), torch.minimum(a, b))
    sides = torch.sqrt((d2 + qz * qz) / m2)
    # IQ's form measures only the slanted faces; the base square is added so the distance is exact below it.
    base = torch.sqrt(x.clamp_min(0) ** 2 + z.clamp_min(0) ** 2 + y * y)
    return scale * torch.minimum(sides, base) * torch.sign(torch.maximum(qz, -y))


SDFS: dict[str, Callable[[Tensor], Tensor]] = {
    "sphere": sdf_sphere, "cube": sdf_cube, "cylinder": sdf_cylinder,
    "cone": sdf_cone, "torus": sdf_torus, "pyramid": sdf_pyramid,
}

# ---- rendering

_BOUND = 0.7  # every shape lies inside this axis-aligned box
_HIT_EPS = 1e-4  # a ray has hit when the SDF falls below this (world units)
_MAX_STEPS = 128
_NORMAL_H = 5e-4
_CHUNK_RAYS = 1 << 20  # rays traced at once: ~150 MB of temporaries


def _trace(sdf: Callable[[Tensor], Tensor], origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sphere-traces rays [R,3] -> (hit [R] bool, depth [R], shade [R]); depth and shade 0 where missed."""
    R = origins.shape[0]
    depth, shade = origins.new_zeros(R), origins.new_zeros(R)
    hit = torch.zeros(R, dtype=torch.bool, device=origins.device)
    t, t_far, in_box = ray_aabb(origins, dirs, _BOUND)
    # Only rays still marching are kept (compacted every step): most finish in a few steps.
    idx = in_box.nonzero().squeeze(-1)
    o, d, t, t_far = origins[idx], dirs[idx], t[idx], t_far[idx]
    for _ in range(_MAX_STEPS):
        if idx.numel() == 0:
            break
        dist = sdf(o + t.unsqueeze(-1) * d)
        done = dist < _HIT_EPS
        hit[idx[done]] = True
        depth[idx[done]] = t[done]
        t = t + dist
        keep = ~done & (t < t_far)
        idx, o, d, t, t_far = idx[keep], o[keep], d[keep], t[keep], t_far[keep]
    # Rays still marching here (~0.1%) are grazing a silhouette, within a sliver of a pixel: misses.
    hit_idx = hit.nonzero().squeeze(-1)
    if hit_idx.numel():
        p = origins[hit_idx] + depth[hit_idx].unsqueeze(-1) * dirs[hit_idx]
        offsets = torch.eye(3, dtype=p.dtype, device=p.device) * _NORMAL_H
        grad = torch.stack([sdf(p + e) - sdf(p - e) for e in offsets], dim=-1)
        n_z = grad[:, 2] / grad.norm(dim=-1).clamp_min(1e-12)
        shade[hit_idx] = AMBIENT + DIFFUSE * n_z.clamp_min(0)
    return hit, depth, shade


def render_shapes(cameras: Cameras, shape_ids: Sequence[int] | Tensor, supersample: int = 2) -> dict[str, Tensor]:
    """Renders one shape per camera, anti-aliased by supersampling.

    Args:
        cameras: B cameras (H x W output). shape_ids: [B] indices into SHAPES.
        supersample: rays per pixel along each axis.
    Returns dict of [B,H,W,1] tensors: ``mask`` (coverage in [0,1]), ``shade`` (the
    shading factor averaged over the covered subsamples, 0 where empty) and ``depth``
    (mean distance along the unit ray over the covered subsamples, 0 where empty).
    """
    shape_ids = torch.as_tensor(shape_ids, dtype=torch.long).cpu()
    B, H, W, s = len(cameras), cameras.height, cameras.width, supersample
    fine = cameras.resized(W * s, H * s)
    out = {k: torch.zeros(B, H, W, 1, device=cameras.device) for k in ("mask", "shade", "depth")}
    per_chunk = max(1, _CHUNK_RAYS // (H * W * s * s))
    for shape in shape_ids.unique().tolist():
        sdf = SDFS[SHAPES[shape]]
        cams = (shape_ids == shape).nonzero().squeeze(-1)
        for start in range(0, len(cams), per_chunk):
            sel = cams[start:start + per_chunk].to(cameras.device)
            origins, dirs = fine[sel].rays()
            hit, depth, shade = _trace(sdf, origins.reshape(-1, 3), dirs.reshape(-1, 3))
            n = len(sel)
            planes = torch.stack([hit.float(), hit * shade, depth], dim=1).view(n, H * s, W * s, 3)
            pooled = F.avg_pool2d(planes.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)  # [n,H,W,3]
            mask = pooled[..., :1]
            covered = mask.clamp_min(1e-12)
            out["mask"][sel] = mask
            out["shade"][sel] = pooled[..., 1:2] / covered
            out["depth"][sel] = pooled[..., 2:3] / covered
    return out


def render_classes(cameras: Cameras, class_ids: Sequence[int] | Tensor, supersample: int = 2) -> dict[str, Tensor]:
    """Renders one class per camera over a white background.

    Args: cameras: B cameras; class_ids: [B] indices into CLASSES.
    Returns dict: ``rgb`` [B,H,W,3] (each pixel the mean of its subsamples' colours),
    ``mask`` [B,H,W,1], ``depth`` [B,H,W,1] as in render_shapes.
    """
    class_ids = torch.as_tensor(class_ids, dtype=torch.long).cpu()
    shapes = render_shapes(cameras, CLASS_SHAPE[class_ids], supersample)
    albedo = ALBEDOS[class_ids].to(cameras.device).view(-1, 1, 1, 3)
    return {"rgb": composite(shapes["mask"], shapes["shade"], albedo),
            "mask": shapes["mask"], "depth": shapes["depth"]}


def world_cameras(elevation: Tensor, azimuth: Tensor, resolution: int) -> Cameras:
    """The world's cameras at elevation, azimuth [B] (degrees), ``resolution`` pixels square."""
    return look_at_cameras(elevation, azimuth, torch.full_like(azimuth, CAMERA_DISTANCE), CAMERA_FOVY_DEG,
                           resolution, resolution)


def class_images(cameras: Cameras) -> Tensor:
    """[36, V, 3, r, r]: every class at every one of the V cameras (each shape traced once, coloured after)."""
    shapes = [render_shapes(cameras, [s] * len(cameras)) for s in range(len(SHAPES))]
    rgb = [composite(shapes[s]["mask"], shapes[s]["shade"], ALBEDOS[c].view(1, 1, 1, 3))
           for c, s in enumerate(CLASS_SHAPE.tolist())]
    return torch.stack(rgb).permute(0, 1, 4, 2, 3)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """[B, ...] bool masks -> [B] intersection over union (an empty union counts as 0)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp_min(1)
    return inter / union


def composite(mask: Tensor, shade: Tensor, albedo: Tensor) -> Tensor:
    """rgb [...,3] over white from coverage [...,1], mean covered shade [...,1] and albedo [...,3] (broadcast)."""
    # mask * shade is the shade summed over covered subsamples / all subsamples, so edges blend by coverage.
    return (1 - mask) + mask * shade * albedo


__all__ = [
    "WORLD_VERSION", "CAMERA_DISTANCE", "CAMERA_FOVY_DEG", "world_cameras", "class_images", "mask_iou", "COLOURS", "SHAPES", "CLASSES", "ALBEDOS", "CLASS_SHAPE", "ToyClass", "SDFS",
    "class_index", "vocabulary", "parse_prompt", "render_shapes", "render_classes", "composite",
    "sdf_sphere", "sdf_cube", "sdf_cylinder", "sdf_cone", "sdf_torus", "sdf_pyramid",
]
