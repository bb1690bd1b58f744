import os
from pathlib import Path

import pytest

# No test may download: the Hugging Face hub is offline for every test (set before any import of it).
os.environ["HF_HUB_OFFLINE"] = "1"
# One prior dataset cache for the whole test session (built on first use, reused by later runs).
os.environ.setdefault("DREAM3D_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "dream3d-test"))

# Small settings that keep an end-to-end run to seconds.
TINY = {
    "steps": 12,
    "resolution": 16,
    "checkpoint_every": 5,
    "preview_every": 5,
    "nerf": {"grid_resolutions": [8, 16], "num_samples": 24, "occupancy_resolution": 16, "occupancy_every": 4},
    "gaussians": {"num_points": 256},
    "export": {"mesh_resolution": 32, "video_frames": 4, "video_resolution": 32},
}


@pytest.fixture
def tiny(tmp_path):
    """Config layers for a tiny run writing under tmp_path."""
    return {**TINY, "out": str(tmp_path / "runs")}
