"""The toy evaluation's view-consistency (Janus) measures on ground-truth renders."""

import pytest
import torch

from dream3d.eval.scores import EVAL_AZIMUTHS, eval_cameras, evaluate_renders, janus_rate
from dream3d.guidance.priors.toy_world import class_index, render_classes


def _renders(classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = render_classes(eval_cameras(), classes)
    return out["rgb"], out["mask"]


def test_the_true_object_is_consistent_from_every_side():
    rgb, alpha = _renders([class_index("red", "cube")] * 2 * EVAL_AZIMUTHS)
    scores = evaluate_renders(rgb, alpha, "a red cube")
    assert scores["iou"] > 0.99 and scores["r_precision"] == 1.0
    assert scores["janus"] == 0.0
    assert scores["view_iou_spread"] < 0.02


def test_a_two_faced_object_is_seen():
    """A red cube from the front half of the orbit, a red sphere from the back half."""
    cube, sphere = class_index("red", "cube"), class_index("red", "sphere")
    half = EVAL_AZIMUTHS // 2
    per_elevation = [cube] * half + [sphere] * half
    rgb, alpha = _renders(per_elevation * 2)
    scores = evaluate_renders(rgb, alpha, "a red cube")
    assert scores["janus"] == 1.0  # every opposite pair: a cube against a sphere
    assert scores["view_iou_spread"] > 0.1


@pytest.mark.parametrize("differing, expected", [(0, 0.0), (1, 0.25), (4, 1.0)])
def test_janus_rate_counts_opposite_pairs(differing, expected):
    nearest = torch.zeros(2, EVAL_AZIMUTHS, dtype=torch.long)
    nearest[:, EVAL_AZIMUTHS // 2: EVAL_AZIMUTHS // 2 + differing] = 5
    assert janus_rate(nearest.flatten()) == expected
