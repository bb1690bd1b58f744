"""UV-textured export: xatlas unwrap, texel rasterisation, albedo baking, seam dilation, GLB/OBJ/PLY files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from dream3d import api
from dream3d.config import ConfigError, build_config
from dream3d.export.files import Z_UP_TO_Y_UP, export_mesh, export_representation
from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.texture import bake, dilate, rasterize_uv, texture_mesh, unwrap
from tests.support import TINY_FLAGS, dream3d, run_cli, validate_glb

SIZE = 256
RADIUS = 0.5


def position_colour(points: torch.Tensor) -> torch.Tensor:
    """A field whose colour codes the position: [N,3] -> [N,3] in [0,1] on the sphere of radius 0.5."""
    return (points + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)


@pytest.fixture(scope="module")
def textured(sphere: trimesh.Trimesh) -> trimesh.Trimesh:
    return texture_mesh(sphere, position_colour, SIZE)


@pytest.fixture(scope="module")
def files(textured: trimesh.Trimesh, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_mesh(textured, tmp_path_factory.mktemp("textured"))


def _centroid_uv_and_points(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """Each face's centroid in UV [F,2] and in 3D [F,3]: away from chart borders, one texel each."""
    return mesh.visual.uv[mesh.faces].mean(1), mesh.vertices[mesh.faces].mean(1)


def _assert_texture_is_the_field(mesh: trimesh.Trimesh, image: Image.Image, atol: float) -> None:
    uv, points = _centroid_uv_and_points(mesh)
    sampled = trimesh.visual.color.uv_to_color(uv, image)[:, :3] / 255  # trimesh's own lookup (nearest texel)
    expected = position_colour(torch.as_tensor(points, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(sampled, expected, atol=atol)


# --- pure functions -----------------------------------------------------------------------


def test_unwrap_keeps_the_faces_and_fits_the_unit_square(sphere: trimesh.Trimesh) -> None:
    vmapping, faces, uv = unwrap(sphere.vertices, sphere.faces, SIZE)
    assert faces.shape == sphere.faces.shape and uv.shape == (len(vmapping), 2)
    np.testing.assert_array_equal(vmapping[faces], sphere.faces)  # same faces, in the same order
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    assert len(vmapping) > len(sphere.vertices)  # a closed surface needs at least one seam
    # no two faces overlap in UV: every texel centre is covered at most once (areas add up)
    edges = uv[faces[:, 1:]] - uv[faces[:, :1]]  # [F,2,2]
    area = 0.5 * np.abs(edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0])
    face_map, _ = rasterize_uv(uv, faces, SIZE)
    assert (face_map >= 0).mean() == pytest.approx(area.sum(), rel=0.05)


def test_rasterize_uv_covers_the_texel_centres_inside_a_triangle() -> None:
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    face_map, bary = rasterize_uv(uv, np.array([[0, 1, 2]]), 8)
    # texel (i, j) has its centre at u = (j + .5) / 8, v = 1 - (i + .5) / 8; inside when u + v < 1, i.e. j < i
    rows, cols = np.mgrid[0:8, 0:8]
    np.testing.assert_array_equal(face_map[cols < rows], 0)
    np.testing.assert_array_equal(face_map[cols > rows], -1)
    # the weights reproduce each covered centre's uv
    centre = np.stack([(cols + 0.5) / 8, 1 - (rows + 0.5) / 8], -1)
    inside = face_map == 0
    np.testing.assert_allclose(bary[inside] @ uv, centre[inside], atol=1e-6)
    np.testing.assert_allclose(bary[inside].sum(-1), 1.0, atol=1e-6)


def test_rasterize_uv_in_small_batches_gives_the_same_texels(sphere: trimesh.Trimesh) -> None:
    _, faces, uv = unwrap(sphere.vertices, sphere.faces, 64)
    whole, whole_bary = rasterize_uv(uv, faces, 64)
    batched, batched_bary = rasterize_uv(uv, faces, 64, batch=100)
    covered = whole >= 0
    np.testing.assert_array_equal(batched >= 0, covered)

    def points(face_map: np.ndarray, bary: np.ndarray) -> np.ndarray:
        return np.einsum("nk,nkd->nd", bary[covered], sphere.vertices[sphere.faces[face_map[covered]]])

    # a centre on a shared edge may go to either face; both put it at the same 3D point
    np.testing.assert_allclose(points(batched, batched_bary), points(whole, whole_bary), atol=1e-6)


def test_bake_evaluates_the_field_at_each_texels_3d_point() -> None:
    vertices = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    faces = np.array([[0, 1, 2]])
    face_map, bary = rasterize_uv(vertices[:, :2], faces, 16)
    seen = []

    def field(points: torch.Tensor) -> torch.Tensor:
        seen.append(len(points))
        return points

    image, mask = bake(field, vertices, faces, face_map, bary, chunk=50)
    assert mask.sum() == sum(seen) and max(seen) <= 50
    rows, cols = np.nonzero(mask)
    np.testing.assert_allclose(image[rows, cols, 0], (cols + 0.5) / 16, atol=1e-6)
    np.testing.assert_allclose(image[rows, cols, 1], 1 - (rows + 0.5) / 16, atol=1e-6)
    assert (image[~mask] == 0).all()


def test_dilate_fills_from_the_nearest_filled_texel() -> None:
    image = np.zeros((9, 9, 3), dtype=np.float32)
    mask = np.zeros((9, 9), dtype=bool)
    image[1, 1], mask[1, 1] = (1.0, 0.0, 0.0), True
    image[7, 7], mask[7, 7] = (0.0, 0.0, 1.0), True
    full = dilate(image, mask)
    assert (full[:3, :3] == (1.0, 0.0, 0.0)).all() and (full[6:, 6:] == (0.0, 0.0, 1.0)).all()
    assert (full.max(-1) > 0).all()
    near = dilate(image, mask, pixels=2)
    rows, cols = np.mgrid[0:9, 0:9]
    distance = np.minimum(np.hypot(rows - 1, cols - 1), np.hypot(rows - 7, cols - 7))
    assert (near.max(-1)[distance <= 2] > 0).all() and (near[distance > 2] == 0).all()
    np.testing.assert_array_equal(near[mask], image[mask])


# --- the textured mesh --------------------------------------------------------------------


def test_baked_texture_sampled_at_the_uvs_is_the_field(textured: trimesh.Trimesh, sphere: trimesh.Trimesh) -> None:
    image = textured.visual.material.baseColorTexture
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    # a texel is about 0.006 world units here; the field changes by 1 per unit
    _assert_texture_is_the_field(textured, image, atol=0.02)
    assert len(textured.faces) == len(sphere.faces)
    # seam copies keep the unsplit mesh's normals, so shading is smooth across seams
    merged = textured.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    assert len(merged.vertices) == len(sphere.vertices) and merged.is_watertight


def test_no_background_texel_is_left_after_dilation(textured: trimesh.Trimesh) -> None:
    """Every texel holds a chart's colour (the field is never black on this sphere): none is left empty."""
    pixels = np.asarray(textured.visual.material.baseColorTexture)
    assert pixels.max(-1).min() >= 0.1 * 255


def test_every_mip_level_of_a_one_colour_field_is_that_colour(sphere: trimesh.Trimesh) -> None:
    """Mip-mapping averages texels across chart borders: with the seams dilated over the whole
    atlas no level mixes in a dark background, down to the 1x1 level."""
    red = torch.tensor([0.8, 0.1, 0.1])
    image = texture_mesh(sphere, lambda p: red.expand(len(p), 3), 64).visual.material.baseColorTexture
    for factor in (1, 2, 4, 8, 16, 32, 64):
        level = np.asarray(image.reduce(factor)).reshape(-1, 3)
        assert (level == (204, 26, 26)).all(), factor


# --- files --------------------------------------------------------------------------------


def test_textured_export_writes_glb_obj_mtl_png_ply(files: dict[str, Path]) -> None:
    assert set(files) == {"glb", "obj", "mtl", "texture", "ply"}
    folder = files["glb"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.glb", "model.mtl", "model.obj", "model.ply", "model.png"]
    mtl = files["mtl"].read_text()
    assert "map_Kd model.png" in mtl and "Kd 1.00000000 1.00000000 1.00000000" in mtl
    assert "mtllib model.mtl" in files["obj"].read_text()


def test_glb_loads_back_with_uv_and_texture(files: dict[str, Path], textured: trimesh.Trimesh) -> None:
    loaded = trimesh.load(files["glb"], force="mesh").apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals) and loaded.visual.uv.shape == (len(loaded.vertices), 2)
    image = loaded.visual.material.baseColorTexture
    assert image.size == (SIZE, SIZE)
    material = loaded.visual.material
    assert material.metallicFactor == 0.0 and material.roughnessFactor == 1.0
    _assert_texture_is_the_field(loaded, image, atol=0.02)
    validate_glb(files["glb"])


def test_obj_loads_back_with_uv_and_texture(files: dict[str, Path]) -> None:
    loaded = trimesh.load(files["obj"], force="mesh")
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals) and loaded.visual.uv is not None
    assert loaded.visual.material.image.size == (SIZE, SIZE)
    _assert_texture_is_the_field(loaded, loaded.visual.material.image, atol=0.02)
    assert Image.open(files["texture"]).format == "PNG"


def test_ply_keeps_vertex_colours_welded(files: dict[str, Path], sphere: trimesh.Trimesh) -> None:
    loaded = trimesh.load(files["ply"], process=False)
    assert len(loaded.vertices) == len(sphere.vertices) and loaded.is_watertight
    expected = position_colour(torch.as_tensor(loaded.vertices, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(loaded.visual.vertex_colors[:, :3] / 255, expected, atol=0.03)


def test_a_new_texture_on_a_loaded_mesh_exports_the_same_files(files: dict[str, Path], tmp_path: Path) -> None:
    """What a texture-refinement stage does: load the OBJ, replace its image, export again."""
    loaded = trimesh.load(files["obj"], force="mesh")
    loaded.visual.material.image = Image.new("RGB", (64, 64), (10, 200, 30))
    out = export_mesh(loaded, tmp_path)
    assert set(out) == {"glb", "obj", "mtl", "texture", "ply"}
    assert np.asarray(Image.open(out["texture"])).reshape(-1, 3).tolist()[0] == [10, 200, 30]
    glb = trimesh.load(out["glb"], force="mesh")
    assert glb.visual.material.baseColorTexture.size == (64, 64)
    validate_glb(out["glb"])


# --- the representation's export ----------------------------------------------------------


class ColourBall:
    """A soft opaque sphere of radius 0.5 coloured by position."""

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return 50 * torch.sigmoid((RADIUS - points.norm(dim=-1)) * 40)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return position_colour(points)

    def render(self, cameras: Cameras, background: torch.Tensor) -> RenderOutput:
        raise AssertionError("not rendered: solid='none' and no video")


def test_export_texture_then_vertex_colours_leaves_no_stale_texture(tmp_path: Path) -> None:
    rep = ColourBall()
    options = dict(resolution=32, solid="none", video=False)
    textured = export_representation(rep, tmp_path, texture_size=64, **options)
    assert {"mtl", "texture"} <= set(textured)
    plain = export_representation(rep, tmp_path, **options)
    assert set(plain) == {"glb", "obj", "ply"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.glb", "model.obj", "model.ply"]
    obj = trimesh.load(plain["obj"], force="mesh")
    assert obj.visual.kind == "vertex"
    expected = position_colour(torch.as_tensor(obj.vertices, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(obj.visual.vertex_colors[:, :3] / 255, expected, atol=2 / 255)


def test_a_ply_alone_is_not_unwrapped(tmp_path: Path) -> None:
    files = export_representation(ColourBall(), tmp_path, formats=["ply"], resolution=32, solid="none", video=False, texture_size=64)
    assert set(files) == {"ply"}
    ply = trimesh.load(files["ply"], process=False)
    expected = position_colour(torch.as_tensor(ply.vertices, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ply.visual.vertex_colors[:, :3] / 255, expected, atol=1 / 255)  # the field itself


def test_texture_size_must_be_sensible() -> None:
    assert build_config({"prompt": "a red cube"}).export.texture_size == 1024
    with pytest.raises(ConfigError, match="texture_size"):
        build_config({"prompt": "a red cube", "export": {"texture_size": 8}})


def test_default_demo_glb_is_one_closed_textured_surface(monkeypatch, capsys, tmp_path: Path) -> None:
    """The README's demo with tiny settings, but the default texture size (the other tiny runs bake 64^2)."""
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--out", tmp_path, *TINY_FLAGS, "export.texture_size=1024")
    assert status == 0, err
    (export,) = [run_dir / "export" for run_dir in tmp_path.iterdir()]
    assert sorted(p.name for p in export.iterdir()) == ["model.glb", "model.mtl", "model.obj", "model.ply", "model.png", "orbit.mp4"]
    loaded = trimesh.load(export / "model.glb", force="mesh")
    assert loaded.visual.uv is not None and loaded.visual.material.baseColorTexture.size == (1024, 1024)
    loaded.merge_vertices(merge_tex=True, merge_norm=True)  # UV seams split vertices
    assert loaded.is_watertight and len(loaded.split(only_watertight=False)) == 1 and loaded.volume > 0
    validate_glb(export / "model.glb")
    scores = api.evaluate(export.parent)  # eval reads the GLB: seams must not count as openings
    assert scores["watertight"] and scores["components"] == 1


def test_texture_false_gives_vertex_colours(monkeypatch, capsys, tmp_path: Path) -> None:
    run_dir = run_cli(monkeypatch, capsys, tmp_path, "export.texture=false")
    export = run_dir / "export"
    assert sorted(p.name for p in export.iterdir()) == ["model.glb", "model.obj", "model.ply", "orbit.mp4"]
    plain = trimesh.load(export / "model.glb", force="mesh", skip_materials=True)
    assert plain.visual.kind == "vertex" and plain.is_watertight
