"""``dream3d sample`` and ``dream3d eval-prior``'s options: the numbers that size the work, checked up front by
``check_options`` under the same one-line errors as a run's config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dream3d.config.limits import RENDER_BYTES_PER_PIXEL, check_fits, check_seed

# DDIM picks its steps among the 1000 training timesteps of every shipped prior's scheduler
MAX_DDIM_STEPS = 1000
# prior samples are drawn in one batch of images of at most this size (toy-unet 32, IF stage I 64)
SAMPLE_PIXELS = 64 * 64


class SampleOptions(BaseModel):
    """``dream3d sample`` and ``dream3d eval-prior``: the numbers that size the work, checked up front."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    n: int = Field(4, gt=0)  # images drawn at once (eval-prior: 36 classes x views)
    steps: int = Field(50, gt=0, le=MAX_DDIM_STEPS)
    seed: int = 0
    elevation: float = 15.0
    azimuth: float | None = None
    guidance_scale: float | None = None

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("n")
    @classmethod
    def _n_fits(cls, value: int) -> int:
        check_fits(f"{value} samples", value * SAMPLE_PIXELS * RENDER_BYTES_PER_PIXEL,
                   f"one batch of {value} images of up to {SAMPLE_PIXELS} pixels, ~{RENDER_BYTES_PER_PIXEL} bytes a pixel")
        return value
