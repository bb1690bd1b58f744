"""The 3D measure of exported meshes: winding-number occupancy and volumetric IoU against the toy solids."""

from __future__ import annotations

import mcubes
import numpy as np
import pytest
import trimesh

from dream3d.eval.bench import markdown_table
from dream3d.eval.scores import _shape_sdf, evaluate_mesh_3d, solid_volume
from dream3d.guidance.priors.toy_world import SHAPES
from dream3d.eval.mesh_coverage import grid_centres, mesh_occupancy

RES = 96


def _shape_mesh(shape: str, rotation_deg: float = 0.0) -> trimesh.Trimesh:
    """Marching cubes of the toy shape's SDF on a fine grid: a closed outward surface."""
    sdf = _shape_sdf(SHAPES.index(shape), rotation_deg, RES, 1.0).numpy()
    vertices, faces = mcubes.marching_cubes(-sdf, 0.0)  # normals toward decreasing -sdf: outward
    step = 2.0 / RES
    mesh = trimesh.Trimesh(grid_centres(RES, 1.0)[0] + vertices * step, faces)
    mesh.update_faces(mesh.nondegenerate_faces())  # cells the surface cuts through a corner, as the export does
    return mesh


@pytest.mark.parametrize("shape", SHAPES)
def test_meshes_of_the_true_shapes_score_near_one(shape: str) -> None:
    scores = evaluate_mesh_3d(_shape_mesh(shape), f"a red {shape}")
    assert scores["volume_iou"] > 0.95
    assert scores["volume_ratio"] == pytest.approx(1.0, abs=0.04)
    assert scores["watertight"] and scores["components"] == 1


def test_rotation_about_z_is_searched() -> None:
    turned = _shape_mesh("pyramid", 20.0)
    assert evaluate_mesh_3d(turned, "a pyramid")["volume_iou"] > 0.95


def test_wrong_shape_scores_low() -> None:
    assert evaluate_mesh_3d(_shape_mesh("torus"), "a red sphere")["volume_iou"] < 0.4


def _hollow_sphere(outer: float, inner: float) -> trimesh.Trimesh:
    wall = trimesh.creation.icosphere(4, inner)
    wall.invert()  # an inner surface facing inward, as a shell-shaped density field gives
    return trimesh.util.concatenate([trimesh.creation.icosphere(4, outer), wall])


def test_hollow_shell_scores_low() -> None:
    scores = evaluate_mesh_3d(_hollow_sphere(0.6, 0.5), "a sphere")
    shell_fraction = 1 - (0.5 / 0.6) ** 3
    assert scores["volume_iou"] == pytest.approx(shell_fraction, abs=0.03)  # 0.42, only the wall counts
    assert scores["volume_ratio"] == pytest.approx(shell_fraction, abs=0.03)
    assert scores["components"] == 2


def test_occupancy_counts_the_winding_number() -> None:
    """Inside a closed surface, not in a hollow shell's cavity, nothing inside an inverted surface."""
    centres = grid_centres(32, 1.0)
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    sphere = mesh_occupancy(trimesh.creation.icosphere(4, 0.6), 32, 1.0)
    assert np.array_equal(sphere[np.abs(radius - 0.6) > 0.03], (radius < 0.6)[np.abs(radius - 0.6) > 0.03])
    shell = mesh_occupancy(_hollow_sphere(0.6, 0.4), 32, 1.0)
    assert not shell[radius < 0.37].any() and shell[(radius > 0.43) & (radius < 0.57)].all()
    inverted = trimesh.creation.icosphere(4, 0.6)
    inverted.invert()
    assert not mesh_occupancy(inverted, 32, 1.0).any()


def test_big_faces_cover_every_column_they_span() -> None:
    """A 12-triangle box: faces span many grid columns; shared diagonals are counted once."""
    box = trimesh.creation.box((0.9, 0.9, 0.9))
    assert evaluate_mesh_3d(box, "a cube")["volume_iou"] == pytest.approx(1.0, abs=1e-6)


def test_solid_volume_matches_the_formulas() -> None:
    assert solid_volume(SHAPES.index("cube")) == pytest.approx(0.9**3, rel=2e-3)
    assert solid_volume(SHAPES.index("sphere")) == pytest.approx(4 / 3 * np.pi * 0.6**3, rel=2e-3)
    assert solid_volume(SHAPES.index("torus")) == pytest.approx(2 * np.pi**2 * 0.45 * 0.18**2, rel=2e-3)


def test_bench_table_has_the_3d_columns() -> None:
    rows = [{"prompt": "a red cube", "seed": s, "matched_class": "red cube", "iou": 0.9, "r_precision": 1.0,
             "colour_error": 0.05, "janus": 0.0, "view_iou_spread": 0.05, "mesh_iou": 0.9, "volume_iou": v, "volume_ratio": 0.9, "watertight": w,
             "components": 1, "seconds_per_step": 0.1, "wall_seconds": 60.0, "peak_memory_mb": 1000.0}
            for s, (v, w) in enumerate([(0.9, True), (0.5, False), (0.8, True)])]
    lines = markdown_table(rows).strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    median = dict(zip(header, (c.strip() for c in lines[-1].strip("|").split("|"))))
    assert median["volume_iou"] == "0.800" and median["watertight"] == "2/3" and median["components"] == "1"


def _uv_box(texture_uv: np.ndarray) -> trimesh.Trimesh:
    """A unit box whose vertices sample the texture at ``texture_uv`` [V,2] (OBJ convention)."""
    box = trimesh.creation.box()
    box.visual = trimesh.visual.TextureVisuals(uv=texture_uv)
    return box


def test_albedo_error_is_zero_for_the_true_colour_and_grows_with_the_light_baked_in() -> None:
    from dream3d.eval.scores import albedo_error
    from dream3d.guidance.priors.toy_world import ALBEDOS, parse_prompt

    red = ALBEDOS[parse_prompt("a red cube")[0]].numpy()
    texture = np.zeros((8, 8, 3), dtype=np.uint8)
    texture[:, :4] = np.round(red * 255)  # left half: the albedo
    texture[:, 4:] = np.round(red * 0.45 * 255)  # right half: the albedo in the ambient light only
    left, right = np.full((8, 2), 0.25), np.full((8, 2), 0.75)
    assert albedo_error(_uv_box(left), texture, "a red cube") < 0.005
    assert albedo_error(_uv_box(right), texture, "a red cube") == pytest.approx(float((red * 0.55).mean()), abs=0.005)
    # a prompt that names no colour: each face is compared with the nearest of its classes' colours
    assert albedo_error(_uv_box(left), texture, "a cube") < 0.005
