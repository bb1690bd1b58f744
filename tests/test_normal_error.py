"""The normal error of ``evaluate_mesh_3d``: the angle between a mesh's face normals and the toy shape's true
normals at the nearest surface point (dream3d/eval/scores.py)."""

import math

import mcubes
import numpy as np
import pytest
import trimesh

from dream3d.eval.mesh_coverage import grid_centres
from dream3d.eval.scores import _shape_sdf, evaluate_mesh_3d, normal_errors
from dream3d.guidance.priors.toy_world import SHAPES

CUBE_HALF = 0.45  # sdf_cube's half extent
SPHERE_RADIUS = 0.6  # sdf_sphere's radius
RESOLUTION = 32  # the volume grid: coarse, so each evaluation's rotation search costs about a second


def _score(mesh: trimesh.Trimesh, prompt: str) -> dict:
    return evaluate_mesh_3d(mesh, prompt, resolution=RESOLUTION)


def _box() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(2 * CUBE_HALF,) * 3)


def _rounded_box(radius: float) -> trimesh.Trimesh:
    """The toy cube with edges and corners rounded to ``radius``: a finely split box whose vertices move onto
    the rounded surface (flat faces stay flat), as a smooth field's export rounds a cube."""
    box = _box()
    vertices, faces = trimesh.remesh.subdivide_to_size(box.vertices, box.faces, max_edge=0.02)
    core = np.clip(vertices, -(CUBE_HALF - radius), CUBE_HALF - radius)
    offset = vertices - core
    return trimesh.Trimesh(core + radius * offset / np.linalg.norm(offset, axis=1, keepdims=True), faces)


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_RADIUS)


def test_sphere_scores_its_facets_only(sphere):
    scores = _score(sphere, "a red sphere")
    # an icosphere of 2562 vertices: its flat facets lean about a degree from the true sphere's normal
    assert scores["normal_error_deg"] < 2
    assert scores["normal_error_median_deg"] < 2
    again = normal_errors(sphere, SHAPES.index("sphere"), 0.0)
    assert float(again.mean()) == pytest.approx(scores["normal_error_deg"])  # a fixed seed: the same points


def test_box_scores_zero_and_a_sphere_against_a_cube_scores_large(sphere):
    box = _score(_box(), "a green cube")
    assert box["normal_error_deg"] < 0.5
    assert box["normal_error_median_deg"] < 1e-3
    assert _score(sphere, "a green cube")["normal_error_deg"] > 15


def test_rounded_edges_score_worse_than_sharp_ones_at_the_same_volume_iou():
    sharp, rounded = _score(_box(), "a green cube"), _score(_rounded_box(0.1), "a green cube")
    assert rounded["volume_iou"] > 0.95 and sharp["volume_iou"] > 0.95  # the volume barely sees the rounding
    assert rounded["normal_error_deg"] > sharp["normal_error_deg"] + 5
    # a larger rounding is a larger error: the measure grows with the rounded area, not just flags it
    assert normal_errors(_rounded_box(0.05), SHAPES.index("cube"), 0.0).mean() < rounded["normal_error_deg"] - 2


def test_a_turned_mesh_is_scored_in_the_frame_the_volume_iou_matched():
    turned = _box()
    turned.apply_transform(trimesh.transformations.rotation_matrix(math.radians(20), [0, 0, 1]))
    assert _score(turned, "a green cube")["normal_error_deg"] < 0.5
    # unturned, its four side faces would be 20 degrees off: the rotation is what keeps the score low
    assert normal_errors(turned, SHAPES.index("cube"), 0.0).mean() > 10


@pytest.mark.parametrize("shape", SHAPES)
def test_every_toy_shape_meshed_coarsely_scores_a_few_degrees(shape):
    """Marching cubes of each true shape on a 48^3 grid: the SDF gradients behind the true normals hold on
    every shape's creases (the cone's rim, the pyramid's edges), so only the grid's facets cost degrees."""
    res = 48
    vertices, faces = mcubes.marching_cubes(-_shape_sdf(SHAPES.index(shape), 0.0, res, 1.0).numpy(), 0.0)
    mesh = trimesh.Trimesh(grid_centres(res, 1.0)[0] + vertices * 2 / res, faces)
    mesh.update_faces(mesh.nondegenerate_faces())
    errors = normal_errors(mesh, SHAPES.index(shape), 0.0)
    assert errors.mean() < 5  # measured 1.5 (sphere) to 3.9 (pyramid)
    assert errors.median() < 4


def test_inverted_faces_score_near_180():
    inside_out = _box()
    inside_out.invert()
    assert normal_errors(inside_out, SHAPES.index("cube"), 0.0).mean() > 179
