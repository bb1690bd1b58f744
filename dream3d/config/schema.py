"""The run's configuration schema: ``RunConfig``, its sections and their validators.

Every component is chosen by name (``prior``, ``guidance``, ``representation``) from ``dream3d.registry`` and
carries its own typed section (one per registered rule and representation, named as the entry); unknown names,
keys and wrong types are errors. What a validator needs to know of a component is a capability on its registry
spec or a hook of its section (``representations.base.RepresentationConfig``), never its name: the names the
config uses are the presets' (``presets.py``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from dream3d import registry
from dream3d.config.io import ConfigError, merge, one_line
from dream3d.config.limits import (
    EXPORT_VIDEO_BATCH, MAX_PARTICLES, MAX_PROMPT_CHARS, MAX_STEPS, MESH_BYTES_PER_CELL, RENDER_BYTES_PER_PIXEL,
    check_fits, check_seed,
)
from dream3d.config.recipes import expand_recipe
from dream3d.config.presets import AUTO, DEFAULT_REPRESENTATION, DEFAULT_RULE, apply_presets
from dream3d.run.device import DEVICE_PATTERN, resolve_device
from dream3d.run.camera_sampling import CameraConfig
from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
from dream3d.guidance.prompts import PromptConfig
from dream3d.guidance.repulsion import RepulsionConfig
from dream3d.guidance.schedule import CheckedSchedule
from dream3d.representations.base import RepresentationConfig
from dream3d.representations.noise import NoiseFieldConfig

PRIORS = registry.PRIORS.names
PRIOR_CHOICES = (AUTO, *PRIORS)
GUIDANCES = registry.RULES.names
REPRESENTATIONS = registry.REPRESENTATIONS.names
EXPORT_FORMATS = ("glb", "obj", "ply")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LossConfig(_Section):
    """Weights (schedules) of the loss terms. Regularizers are threestudio's definitions:
    sparsity = mean sqrt(alpha^2 + 0.01); opaque = binary entropy of alpha;
    orient = weighted ReLU(n . d)^2 (costs normals, so off unless weighted)."""

    lambda_guidance: CheckedSchedule = 1.0
    lambda_sparsity: CheckedSchedule = 0.0
    lambda_opaque: CheckedSchedule = 0.0
    lambda_orient: CheckedSchedule = 0.0
    # geometry regularisers a representation returns in its renders' extras (its section's ``regularizers()``):
    # the mean cosine distance between adjacent faces' normals, and the mean squared Laplacian of the vertices
    lambda_normal_consistency: CheckedSchedule = 0.0
    lambda_laplacian_smoothness: CheckedSchedule = 0.0


# the loss terms a representation computes itself (``RenderOutput.extras``), each weighted by ``lambda_<name>``
REGULARIZERS = ("normal_consistency", "laplacian_smoothness")


class OptimConfig(_Section):
    """Adam over the representation's parameter groups (each group sets its own lr).

    lr_scale multiplies every group's lr (a schedule: decay it to settle the last steps)."""

    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    lr_scale: CheckedSchedule = 1.0


class NoiseConfig(NoiseFieldConfig):
    """Consistent noise (``--noise consistent``, always on for ``--guidance cfd``): the representation's
    noise state, and ``refresh``, the gamma of CFD's renewal n <- sqrt(1 - gamma) n + sqrt(gamma) xi
    each step (a schedule; CFD's default 1e-4: a value keeps ~e^-1 of itself after 10k steps)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    refresh: CheckedSchedule = 1e-4


class ExportConfig(_Section):
    formats: list[str] = list(EXPORT_FORMATS)
    mesh_resolution: int = Field(128, gt=8)
    threshold: float | None = None  # None: automatic
    # "hull": the density made solid by the visual hull of the renders (one closed outward surface);
    # "fill": enclosed cavities filled; "none": the raw iso-surface, inner walls included
    solid: Literal["hull", "fill", "none"] = "hull"
    hull_views: int = Field(32, gt=0)  # views over the whole sphere, below the object too
    hull_image_size: int = Field(96, gt=8)
    # grid cells: how far under the hull's surface the inside is filled; None: the representation's own
    # (NeRF 3, Gaussians 1.5: the thickness of their soft surface layers)
    hull_margin: float | None = Field(None, ge=0)
    # the automatic level in "hull" mode: the renders' median depth, or the level whose silhouettes match the
    # renders' (better for slowly falling densities such as tori, worse for pyramids and cubes: docs/benchmarks.md)
    hull_level: Literal["depth", "silhouettes"] = "depth"
    largest_only: bool = True  # keep only the largest connected piece (else pieces over 5% of its faces)
    max_faces: int | None = Field(40_000, gt=0)  # face budget (quadric decimation); None keeps marching cubes' all
    # GLB/OBJ with the albedo baked into a UV texture (xatlas) of texture_size^2 texels; false: vertex colours
    texture: bool = True
    texture_size: int = Field(1024, ge=16, le=4096)
    video: bool = True
    video_frames: int = Field(48, gt=0)
    video_resolution: int = Field(128, gt=0)

    @field_validator("mesh_resolution")
    @classmethod
    def _mesh_fits(cls, value: int) -> int:
        check_fits(f"a mesh resolution of {value}", value**3 * MESH_BYTES_PER_CELL,
                   f"{value}^3 grid cells x {MESH_BYTES_PER_CELL} bytes for the density grid and marching cubes")
        return value

    @field_validator("video_resolution")
    @classmethod
    def _video(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"the video resolution must be even (H.264 yuv420p halves the colour planes), got {value}")
        check_fits(f"a video resolution of {value}", EXPORT_VIDEO_BATCH * value**2 * RENDER_BYTES_PER_PIXEL,
                   f"{EXPORT_VIDEO_BATCH} frames of {value}^2 pixels rendered at once, ~{RENDER_BYTES_PER_PIXEL} bytes a pixel")
        return value

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        bad = [f for f in value if f not in EXPORT_FORMATS]
        if bad:
            raise ValueError(f"unknown export format {bad[0]!r}; valid: {', '.join(EXPORT_FORMATS)}")
        return value


class RefineConfig(_Section):
    """Texture refinement of the exported mesh (``dream3d refine``; ``--refine-steps`` on ``run``), DreamGaussian's
    stage 2: the run's own prior and rule, t limited to [min_step_percent, max_step_percent] (small t: the texture
    gets detail, not a new object), Adam at ``lr`` on the texture's logits. ``steps`` 0: ``run`` does not refine."""

    steps: int = Field(0, ge=0, le=MAX_STEPS)
    lr: float = Field(0.05, gt=0)
    # render size of the refinement (None: the run's last). The prior downsamples larger renders (antialiased), so
    # their gradient reaches 16x more texels of a 1024^2 texture per step at 256 than at the toy prior's 64 pixels
    resolution: int | None = Field(256, gt=0, le=1024)
    min_step_percent: float = Field(0.02, ge=0, lt=1)
    max_step_percent: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _t_range(self) -> "RefineConfig":
        if self.min_step_percent > self.max_step_percent:
            raise ValueError(f"refine.min_step_percent {self.min_step_percent} is above refine.max_step_percent "
                             f"{self.max_step_percent}")
        return self


# a stage is named for its folder, stages/<index>-<name>/
STAGE_NAME = r"[a-z0-9][a-z0-9_-]{0,31}"
MAX_STAGES = 16
# settings of the whole run, which a stage cannot change: the object (prompt, seed), where it runs and is written,
# and what the checkpoints hold (one representation per stage, particles 1)
RUN_ONLY = ("prompt", "seed", "device", "out", "particles", "keep_checkpoints", "stages")
STAGE_INIT = ("previous", "none")
# a stage that names its prior or model takes none of the run's model settings
MODEL_KEYS = ("model", "model_resolved", "model_revision")


class RunSettings(_Section):
    """The run's own settings; ``RunConfig`` adds one section per registered rule and representation.

    ``stages``: a pipeline. Each stage is a ``name``, ``init`` (``previous``, the default after the first stage:
    its representation starts from the previous stage's final one; ``none``) and any settings that override the
    run's for that stage; its effective config (``stage_config``) is the run's, without ``stages``, merged with
    them. Empty: the run is one stage, its own settings."""

    prompt: str
    # auto: chosen from the prompt and the rule (auto_prior) when the config is built, so config.yaml names the prior
    prior: str = AUTO
    # diffusers priors: an alias, a hub id or a local diffusers folder (None: the prior's default alias)
    model: str | None = None
    # recorded by a run: the hub id and commit the model resolved to; a resume, an export or a re-run of the
    # config.yaml loads exactly these (remove both to resolve the alias again)
    model_resolved: str | None = None
    model_revision: str | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    guidance: str = DEFAULT_RULE
    # where the forward noise comes from: fresh draws, or fixed noise attached to the 3D representation
    noise: Literal["independent", "consistent"] = "independent"
    representation: str = DEFAULT_REPRESENTATION
    steps: int = Field(600, gt=0)
    seed: int = 0
    # where the representation, cameras, renders, prior and guidance live: auto (CUDA if any), cpu, cuda, cuda:N
    device: str = "auto"
    # independent representations optimised together (export/p{i}/ each); one guidance, VSD's LoRA shared
    particles: int = Field(1, ge=1, le=MAX_PARTICLES)
    # render size per step: one int, or sizes switched at resolution_milestones (threestudio's form)
    resolution: int | list[int] = [32, 64]
    resolution_milestones: list[int] = [400]
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    out: str = "runs"
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    preview_every: int = Field(100, gt=0)
    max_nan_steps: int = Field(20, gt=0)
    camera: CameraConfig = CameraConfig()
    noise_field: NoiseConfig = NoiseConfig()
    prompts: PromptConfig = PromptConfig()
    repulsion: RepulsionConfig = RepulsionConfig()
    diffusers: DiffusersConfig = DiffusersConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    export: ExportConfig = ExportConfig()
    refine: RefineConfig = RefineConfig()
    stages: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_STAGES)

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        # presets.py: --prior auto resolved, then the prior's preset under the given layers
        return apply_presets(data, cls.model_fields["steps"].default) if isinstance(data, dict) else data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        if len(value.strip()) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is {len(value.strip())} characters long; the limit is {MAX_PROMPT_CHARS} "
                             "(the priors' text encoders read 77 tokens)")
        return value.strip()

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value > MAX_STEPS:
            raise ValueError(f"at most {MAX_STEPS} steps (checkpoint names hold 6 digits), got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("prior")
    @classmethod
    def _prior(cls, value: str) -> str:
        if value not in registry.PRIORS:
            raise ValueError(f"unknown prior {value!r}; valid: {', '.join(PRIORS)}, {AUTO} (the default: picked for the prompt)")
        return value

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str | None) -> str | None:
        # a local folder is saved absolute, so config.yaml re-runs from any working directory
        if value is not None and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"unknown device {value!r}; valid: auto, cpu, cuda, cuda:N")
        return value

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, value: str) -> str:
        return registry.RULES[value].name

    @field_validator("representation")
    @classmethod
    def _representation(cls, value: str) -> str:
        return registry.REPRESENTATIONS[value].name

    @model_validator(mode="after")
    def _resolution(self) -> "RunSettings":
        sizes = [self.resolution] if isinstance(self.resolution, int) else self.resolution
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if len(sizes) > 1 and len(self.resolution_milestones) != len(sizes) - 1:
            raise ValueError("resolution_milestones needs one step per resolution change")
        views = self.particles * self.camera.batch_size
        per_pixel = RENDER_BYTES_PER_PIXEL * self.representation_section.render_cost()
        check_fits(f"resolution {max(sizes)}", views * max(sizes) ** 2 * per_pixel,
                   f"{views} view(s) of {max(sizes)}^2 pixels, ~{per_pixel:.0f} bytes a pixel for a training render")
        return self

    @model_validator(mode="after")
    def _finite(self) -> "RunSettings":
        where = _non_finite(self.model_dump())
        if where is not None:
            raise ValueError(f"{where[0]}: must be a finite number, got {where[1]}")
        return self

    @model_validator(mode="after")
    def _model(self) -> "RunSettings":
        if (self.model or self.model_resolved) is not None and not registry.PRIORS[self.prior].loads_model:
            loaders = ", ".join(p.name for p in registry.PRIORS if p.loads_model)
            raise ValueError(f"--model applies to the {loaders} priors, not {self.prior!r}")
        return self

    @model_validator(mode="after")
    def _device_refusal(self) -> "RunSettings":
        # a run on the CPU is known before any work; a GPU whose kernels fail to build shows at the first render
        if self.device in ("auto", "cpu"):
            refusal = self.representation_section.device_refusal(resolve_device(self.device))
            if refusal:
                raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _guidance_needs_unet(self) -> "RunSettings":
        if registry.RULES[self.guidance].needs_unet and registry.PRIORS[self.prior].closed_form:
            works = ", ".join(p.name for p in registry.PRIORS if not p.closed_form)
            raise ValueError(f"guidance {self.guidance} trains a LoRA on the prior's UNet, and prior {self.prior} is "
                             f"closed-form (no UNet); use one of the priors {works}")
        return self

    @model_validator(mode="after")
    def _multiview(self) -> "RunSettings":
        views = registry.PRIORS[self.prior].views
        if views == 1:
            return self
        refusal = registry.RULES[self.guidance].multiview_refusal
        if refusal:
            works = ", ".join(r.name for r in registry.RULES if not r.multiview_refusal)
            raise ValueError(f"guidance {self.guidance} cannot drive prior {self.prior}: it {refusal}; use {works}")
        if self.camera.group_views != views:
            raise ValueError(f"prior {self.prior} denoises {views} views of one object together: set "
                             f"camera.group_views={views} (and camera.batch_size a multiple of {views})")
        if getattr(getattr(self, self.guidance), "perp_neg", False):
            raise ValueError(f"{self.guidance}.perp_neg needs view prompts, and prior {self.prior} is told each view's "
                             "camera instead")
        return self

    @model_validator(mode="after")
    def _repulsion(self) -> "RunSettings":
        if self.repulsion.weight > 0 and self.particles < 3:
            raise ValueError(f"repulsion needs --particles 3 or more (got {self.particles}): its kernel bandwidth "
                             "median(d^2) / log(N - 1) is undefined for fewer")
        return self

    @model_validator(mode="after")
    def _noise(self) -> "RunSettings":
        if self.noise == "consistent" and not registry.RULES[self.guidance].takes_noise:
            takers = ", ".join(r.name for r in registry.RULES if r.takes_noise)
            raise ValueError(f"--noise consistent works with the guidance rules {takers}, not {self.guidance}")
        return self

    @model_validator(mode="after")
    def _refine(self) -> "RunSettings":
        if not self.refine.steps:
            return self
        if self.consistent_noise:
            raise ValueError(f"refine.steps: texture refinement draws fresh forward noise, and guidance {self.guidance} "
                             "with consistent noise needs it on the representation; refine a run with independent noise")
        if not self.export.texture or not {"obj", "glb"} & set(self.export.formats):
            raise ValueError("refine.steps: texture refinement needs a textured export (export.texture=true and obj or "
                             "glb among export.formats)")
        return self

    @property
    def consistent_noise(self) -> bool:
        """Whether the forward noise comes from the representation (``--noise consistent`` or ``--guidance cfd``)."""
        return self.noise == "consistent" or registry.RULES[self.guidance].always_consistent_noise

    @property
    def total_steps(self) -> int:
        """Optimisation steps of every stage of the run: each training stage, then texture refinement (the last
        stage's ``refine.steps``), so the web app's --max-steps bounds them all."""
        configs = self.stage_configs()
        return sum(c.steps for c in configs) + configs[-1].refine.steps

    @property
    def training_steps(self) -> int:
        """Optimisation steps of the training stages (texture refinement not counted)."""
        return sum(c.steps for c in self.stage_configs())

    def stage_configs(self) -> list["RunSettings"]:
        """The effective config of each stage, in order; a run without ``stages`` is its own one stage."""
        return [self.stage_config(i) for i in range(len(self.stages))] if self.stages else [self]

    def stage_config(self, index: int) -> "RunSettings":
        """Stage ``index``'s effective config: the run's without ``stages``, merged with the stage's settings (a
        stage that names its prior or model takes none of the run's model settings); ConfigError in one line."""
        stage = self.stages[index]
        bad = next((k for k in stage if k not in type(self).model_fields and k not in ("name", "init")), None)
        if bad is not None:
            raise ConfigError(f"{bad}: unknown key")
        fixed = next((k for k in stage if k in RUN_ONLY), None)
        if fixed is not None:
            raise ConfigError(f"{fixed}: a setting of the whole run; a stage cannot change it")
        settings = {k: v for k, v in stage.items() if k not in ("name", "init")}
        base = self.model_dump(mode="json", exclude={"stages"})
        if "prior" in settings or "model" in settings:
            base = {k: v for k, v in base.items() if k not in MODEL_KEYS}
        try:
            return type(self).model_validate(merge(base, settings))
        except ValidationError as e:
            raise ConfigError(one_line(e)) from None

    def stage_name(self, index: int) -> str:
        return self.stages[index]["name"]

    def stage_init(self, index: int) -> str:
        return self.stages[index].get("init", "previous" if index else "none")

    @model_validator(mode="after")
    def _stages(self) -> "RunSettings":
        names: set[str] = set()
        for index, stage in enumerate(self.stages):
            name = stage.get("name")
            where = f"stages[{index}]" + (f" ({name})" if isinstance(name, str) else "")
            if not isinstance(name, str) or not re.fullmatch(STAGE_NAME, name):
                raise ValueError(f"{where}: name must be a short lowercase word (letters, digits, - and _), got "
                                 f"{str(name)[:40]!r}")
            if name in names:
                raise ValueError(f"{where}: the name {name!r} is taken by an earlier stage")
            names.add(name)
            init = stage.get("init", "previous" if index else "none")
            if init not in STAGE_INIT:
                raise ValueError(f"{where}: init must be one of {', '.join(STAGE_INIT)}, got {str(init)[:40]!r}")
            if index == 0 and init != "none":
                raise ValueError(f"{where}: init: the first stage has no previous stage to start from")
            try:
                self.stage_config(index)
            except ConfigError as e:
                raise ValueError(f"{where}: {e}") from None
        if self.stages and self.particles > 1:
            raise ValueError(f"stages: a staged run optimises one representation (particles 1), got particles "
                             f"{self.particles}")
        return self

    @model_validator(mode="after")
    def _representation_capabilities(self) -> "RunSettings":
        if not registry.REPRESENTATIONS[self.representation].renders_normals and self.loss.lambda_orient != 0:
            raise ValueError(f"loss.lambda_orient needs normals, which the {self.representation} representation does "
                             "not render")
        returned = self.representation_section.regularizers()
        for name in REGULARIZERS:
            if getattr(self.loss, f"lambda_{name}") != 0 and name not in returned:
                raise ValueError(f"loss.lambda_{name} weights a regulariser the {self.representation} representation "
                                 "does not compute")
        for spec in registry.REPRESENTATIONS:
            points = getattr(self, spec.name).init_points if spec.takes_init_points else None
            if points and self.representation != spec.name:
                raise ValueError(f"--init-points ({spec.name}.init_points) starts the {spec.name} representation, "
                                 f"not {self.representation}")
            if points and not Path(points).is_file():
                raise ValueError(f"init points file {points} does not exist")
        return self

    @property
    def representation_section(self) -> RepresentationConfig:
        """The chosen representation's config section (``NAME:`` in config.yaml)."""
        return getattr(self, self.representation)

    def resolution_at(self, step: int) -> int:
        if isinstance(self.resolution, int):
            return self.resolution
        return self.resolution[sum(step >= m for m in self.resolution_milestones)]


def _non_finite(tree: Any, where: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN or infinite float in a dumped config, or None."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    if isinstance(tree, float) and not math.isfinite(tree):
        return where, tree
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where and isinstance(key, str) else
                            f"{where}[{key}]" if where else str(key))
        if found:
            return found
    return None


def run_config_model() -> type[RunSettings]:
    """RunSettings plus one config section per registered rule and representation, named as the entry. Built
    when this module is imported; a component registered later needs the model built again (as a test does)."""
    sections = {}
    for spec in (*registry.RULES, *registry.REPRESENTATIONS):
        config_class = registry.resolve(spec.config)
        sections[spec.name] = (config_class, Field(default_factory=config_class))
    return create_model("RunConfig", __base__=RunSettings, __module__=__name__, **sections)


RunConfig = run_config_model()


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Validates the merge of the layers (later wins) into a RunConfig; raises ConfigError in one line.

    The prior's preset goes under the merged layers, and a ``recipe`` named in them goes under them too (with its
    toy block for a toy prior: ``recipes.py``); ``presets.py`` says the order."""
    data: dict[str, Any] = {}
    for layer in layers:
        data = merge(data, layer)
    data = expand_recipe(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None


def check_export_options(formats: list[str] | None, resolution: int | None) -> None:
    """``dream3d export``'s options under the same rules as a run's export section; raises ConfigError in one line."""
    given = {"formats": formats, "mesh_resolution": resolution}
    try:
        ExportConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None
