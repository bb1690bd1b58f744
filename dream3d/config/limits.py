"""Upper bounds on what sizes a run's work, each derived from a fact of the code or of the machine (the error
names it). They live in the typed config, so the CLI, the web app and the batch runner refuse the same inputs
before anything is written."""

from __future__ import annotations

import os

MAX_STEPS = 999_999  # checkpoints are step_XXXXXX.pt and found by sorting names: 6 digits sort right
MAX_PARTICLES = 64
# the diffusion priors' text encoders (CLIP, T5) read 77 tokens, a few hundred characters: more is cut off unread
MAX_PROMPT_CHARS = 1000
# torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; particle i is seeded seed + i
SEED_RANGE = (-(2**63), 2**64 - MAX_PARTICLES)
# Measured peak memory of one training render, forward and backward, on CPU: ~5 KB per pixel for
# the NeRF at 64 samples per ray, 4-11 KB for the Gaussians. Rounded up to 8 KiB per pixel
# (per 64 ray samples for the NeRF); the video renders frames in batches of EXPORT_VIDEO_BATCH.
RENDER_BYTES_PER_PIXEL = 8 * 1024
EXPORT_VIDEO_BATCH = 8
# marching cubes holds the float32 density grid, scikit-image's float64 copy and its masks
MESH_BYTES_PER_CELL = 16


def machine_memory() -> int:
    """Bytes of physical memory of this machine (where representations render and mesh)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_fits(what: str, need: float, how: str) -> None:
    """Raises ValueError (one line) if ``need`` bytes exceed this machine's memory; ``how`` says how ``need`` was counted."""
    have = machine_memory()
    if need > have:
        raise ValueError(f"{what} would need about {_gib(need)} of memory ({how}), more than this machine's {_gib(have)}")


def check_seed(value: int) -> int:
    """``value`` when every particle's seed (seed + i) is a torch seed; ValueError in one line otherwise."""
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        raise ValueError(f"the seed must lie in [-2**63, 2**64 - {MAX_PARTICLES}] (torch seeds are 64-bit and "
                         f"particle i takes seed + i), got {value}")
    return value
