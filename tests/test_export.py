"""Mesh extraction and export (GLB/OBJ/PLY, orbit video) on an analytic sphere field."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from dream3d.export.files import Z_UP_TO_Y_UP, export_mesh, export_representation, write_orbit_video
from dream3d.representations.cameras import Cameras, RenderOutput, look_at_cameras
from dream3d.eval.mesh_coverage import mesh_silhouettes
from dream3d.representations.marching_cubes import MeshError
from dream3d.representations.mesh_extraction import extract_mesh
from tests.support import validate_glb

REPO = Path(__file__).resolve().parents[1]
RED = (0.85, 0.15, 0.15)
RADIUS = 0.5
BLOB_CENTRE = torch.tensor([0.75, 0.75, 0.75])
BLOB_RADIUS = 0.08
RES = 64


class SphereRep:
    """A soft opaque sphere of radius 0.5 plus a small floater, red everywhere."""

    def density(self, points: torch.Tensor) -> torch.Tensor:
        sphere = 50 * torch.sigmoid((RADIUS - points.norm(dim=-1)) * 40)
        blob = 50 * torch.sigmoid((BLOB_RADIUS - (points - BLOB_CENTRE).norm(dim=-1)) * 200)
        return sphere + blob

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return torch.tensor(RED).expand(len(points), 3)

    def render(self, cameras: Cameras, background: torch.Tensor) -> RenderOutput:
        """Ray-traced hard sphere, shaded like the toy world (light from +z)."""
        origins, dirs = cameras.rays()
        b = (origins * dirs).sum(-1, keepdim=True)
        disc = b.square() - (origins.square().sum(-1, keepdim=True) - RADIUS**2)
        t = -b - disc.clamp_min(0).sqrt()
        hit = (disc > 0) & (t > 0)
        normal = (origins + t * dirs) / RADIUS
        shaded = torch.tensor(RED) * (0.45 + 0.55 * normal[..., 2:].clamp_min(0))
        rgb = torch.where(hit, shaded, background)
        return RenderOutput(rgb=rgb, alpha=hit.float(), depth=torch.where(hit, t, 0.0), normal=normal)


def _radii(mesh: trimesh.Trimesh) -> np.ndarray:
    return np.linalg.norm(mesh.vertices, axis=1)


@pytest.fixture(scope="module")
def rep() -> SphereRep:
    return SphereRep()


@pytest.fixture(scope="module")
def mesh(rep: SphereRep) -> trimesh.Trimesh:
    return extract_mesh(rep.density, rep.albedo, resolution=RES)


@pytest.fixture(scope="module")
def exported(rep: SphereRep, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    return export_representation(rep, out, resolution=RES, video_frames=12, video_resolution=64)


# --- extraction -------------------------------------------------------------------------


def test_auto_threshold_puts_surface_on_the_sphere(mesh: trimesh.Trimesh) -> None:
    r = _radii(mesh)
    # The rendered (median-depth) surface of this soft field is at r ~ 0.5075.
    assert abs(r.mean() - RADIUS) < 0.02
    assert r.std() < 0.01


def test_normals_point_outward(mesh: trimesh.Trimesh) -> None:
    outward = (mesh.face_normals * mesh.triangles_center).sum(-1) > 0
    assert outward.mean() > 0.99
    assert mesh.volume > 0


def test_floater_removed_unless_asked_to_keep(rep: SphereRep, mesh: trimesh.Trimesh) -> None:
    assert len(mesh.split(only_watertight=False)) == 1
    assert (np.linalg.norm(mesh.vertices - BLOB_CENTRE.numpy(), axis=1) > 0.2).all()
    kept = extract_mesh(rep.density, rep.albedo, resolution=RES, min_component_fraction=0.0)
    assert len(kept.split(only_watertight=False)) == 2


def test_vertex_colours_are_the_albedo(mesh: trimesh.Trimesh) -> None:
    colors = mesh.visual.vertex_colors
    assert colors.dtype == np.uint8 and colors.shape == (len(mesh.vertices), 4)
    np.testing.assert_allclose(colors[:, :3] / 255, np.broadcast_to(RED, (len(colors), 3)), atol=1 / 255)
    assert (colors[:, 3] == 255).all()


def test_explicit_threshold_overrides(rep: SphereRep) -> None:
    # sigma = 25 is exactly where the sigmoid crosses the radius 0.5.
    r = _radii(extract_mesh(rep.density, rep.albedo, resolution=RES, threshold=25.0))
    assert abs(r.mean() - RADIUS) < 0.005
    inner = _radii(extract_mesh(rep.density, rep.albedo, resolution=RES, threshold=45.0))
    assert inner.mean() < r.mean() - 0.03


def _constant(value: float):
    return lambda p: torch.full((len(p),), value)


@pytest.mark.parametrize("threshold", [None, 1.0])
def test_empty_field_raises(rep: SphereRep, threshold: float | None) -> None:
    with pytest.raises(MeshError, match="empty"):
        extract_mesh(_constant(0.0), rep.albedo, resolution=16, threshold=threshold)


@pytest.mark.parametrize("threshold", [None, 10.0])
def test_full_field_raises(rep: SphereRep, threshold: float | None) -> None:
    with pytest.raises(MeshError, match="full"):
        extract_mesh(_constant(1e3), rep.albedo, resolution=16, threshold=threshold)


def test_threshold_above_the_field_raises(rep: SphereRep) -> None:
    with pytest.raises(MeshError, match="empty"):
        extract_mesh(rep.density, rep.albedo, resolution=16, threshold=1e3)


# --- files ------------------------------------------------------------------------------


def test_export_writes_only_final_files(exported: dict[str, Path]) -> None:
    assert set(exported) == {"glb", "obj", "ply", "video"}
    folder = exported["glb"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.glb", "model.obj", "model.ply", "orbit.mp4"]


def _assert_red(colors: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(colors)[:, :3] / 255, np.broadcast_to(RED, (len(colors), 3)), atol=2 / 255)


def test_glb_round_trip(exported: dict[str, Path], mesh: trimesh.Trimesh) -> None:
    loaded = trimesh.load(exported["glb"], force="mesh")
    assert 0.5 * len(mesh.vertices) <= len(loaded.vertices) <= 2 * len(mesh.vertices)
    # The GLB has a material, so trimesh reads COLOR_0 into vertex colours only when told
    # to skip materials (otherwise it keeps them as a texture-visual attribute).
    plain = trimesh.load(exported["glb"], force="mesh", skip_materials=True)
    assert len(plain.vertices) == len(loaded.vertices)
    _assert_red(plain.visual.vertex_colors)
    scene = trimesh.load(exported["glb"])
    (geometry,) = scene.geometry.values()
    _assert_red(geometry.visual.vertex_attributes["color"])


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_obj_ply_round_trip(exported: dict[str, Path], mesh: trimesh.Trimesh, fmt: str) -> None:
    loaded = trimesh.load(exported[fmt], force="mesh")
    assert 0.5 * len(mesh.vertices) <= len(loaded.vertices) <= 2 * len(mesh.vertices)
    _assert_red(loaded.visual.vertex_colors)
    # OBJ and PLY stay in the world frame.
    assert abs(_radii(loaded).mean() - _radii(mesh).mean()) < 1e-3


def test_glb_is_y_up(tmp_path: Path) -> None:
    box = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    box.apply_translation((0.0, 0.0, 0.5))
    box.visual.vertex_colors = (255, 0, 0, 255)
    paths = export_mesh(box, tmp_path, formats=("glb", "obj"))
    centre_glb = trimesh.load(paths["glb"], force="mesh").vertices.mean(0)
    np.testing.assert_allclose(centre_glb, (0.0, 0.5, 0.0), atol=1e-6)
    np.testing.assert_allclose(Z_UP_TO_Y_UP[:3, :3] @ (0, 0, 1), (0, 1, 0))
    np.testing.assert_allclose(trimesh.load(paths["obj"], force="mesh").vertices.mean(0), (0.0, 0.0, 0.5), atol=1e-6)


def test_unknown_format_raises(mesh: trimesh.Trimesh, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: glb, obj, ply"):
        export_mesh(mesh, tmp_path, formats=("glb", "fbx"))
    assert list(tmp_path.iterdir()) == []


def test_glb_passes_khronos_validator(exported: dict[str, Path]) -> None:
    validate_glb(exported["glb"])


# --- video ------------------------------------------------------------------------------


def _frames(path: Path) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack(list(reader.iter_data()))


def test_orbit_video_frames(rep: SphereRep, tmp_path: Path) -> None:
    path = write_orbit_video(rep.render, tmp_path / "orbit.mp4", n_frames=10, resolution=48, fps=12)
    frames = _frames(path)
    assert frames.shape == (10, 48, 48, 3)
    # Sphere in the middle, white background in the corners (H.264 is lossy, hence the slack).
    centre, corner = frames[:, 24, 24].astype(int), frames[:, 2, 2].astype(int)
    assert (centre[:, 0] > centre[:, 1] + 60).all()
    assert (corner > 235).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit.mp4"]


def test_export_representation_video(exported: dict[str, Path]) -> None:
    assert _frames(exported["video"]).shape == (12, 64, 64, 3)


def test_odd_video_resolution_raises(rep: SphereRep, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_orbit_video(rep.render, tmp_path / "orbit.mp4", n_frames=2, resolution=33)


# --- mesh silhouettes ---------------------------------------------------


def test_mesh_silhouettes_match_the_ray_traced_sphere(rep: SphereRep, mesh: trimesh.Trimesh) -> None:
    """The extracted sphere's silhouettes against the analytic sphere's: equal but for edge pixels."""
    floater_free = trimesh.creation.icosphere(subdivisions=4, radius=RADIUS)
    cameras = look_at_cameras(torch.tensor([0.0, 40.0]), torch.tensor([0.0, 200.0]), torch.tensor([2.5, 2.0]), 45.0, 48, 32)
    truth = rep.render(cameras, torch.ones(3)).alpha[..., 0] > 0.5
    for m in (floater_free, mesh):
        covered = mesh_silhouettes(m, cameras)
        assert covered.shape == (2, 32, 48)
        iou = float((covered & truth).sum() / (covered | truth).sum())
        assert iou > 0.93, iou
    assert not mesh_silhouettes(floater_free, cameras)[:, 0, :].any()  # the top rows see only background
