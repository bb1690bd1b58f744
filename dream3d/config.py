"""The typed run configuration: defaults, YAML load/save and ``key=value`` overrides.

Every component is chosen by name (``prior``, ``guidance``, ``representation``) from
``dream3d.registry`` and carries its own typed section (one per registered rule and
representation, named as the entry); unknown names, keys and wrong types are errors. The
saved ``config.yaml`` of a run re-runs the same job.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from dream3d.errors import UserError
from dream3d import registry
from dream3d.run.device import DEVICE_PATTERN, resolve_device
from dream3d.run.camera_sampling import CameraConfig
from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
from dream3d.guidance.prompts import PromptConfig
from dream3d.guidance.repulsion import RepulsionConfig
from dream3d.guidance.schedule import CheckedSchedule
from dream3d.representations.noise import NoiseFieldConfig

PRIORS = registry.PRIORS.names
# --prior auto (the default) picks one of PRIORS from the prompt and the rule when the config is built
AUTO = "auto"
PRIOR_CHOICES = (AUTO, *PRIORS)
GUIDANCES = registry.RULES.names
REPRESENTATIONS = registry.REPRESENTATIONS.names
EXPORT_FORMATS = ("glb", "obj", "ply")


# Upper bounds on what sizes a run's work, each derived from a fact of the code or of the machine
# (the error names it). They live here, in the typed config, so the CLI, the web app and the batch
# runner refuse the same inputs before anything is written.
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


class ConfigError(UserError, ValueError):
    """A configuration the user gave cannot be used; the message is one line."""


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


def multiview_defaults(prior: str, steps: int) -> dict[str, Any]:
    """MVDream-threestudio's distillation settings scaled to a run of ``steps``: groups of 4 cameras 90 degrees
    apart, x0-reconstruction SDS with CFG rescale 0.5 and t annealed from 0.98 to U[0.02, 0.5] over the first
    80% of the run; for mvdream 64 then 256 pixels from half-way (the toy keeps its own sizes). The user's
    values win."""
    anneal = max(int(0.8 * steps), 1)
    views = registry.PRIORS[prior].views
    sizes = {"resolution": [64, 256], "resolution_milestones": [steps // 2]} if prior == "mvdream" else {}
    return {"camera": {"group_views": views, "batch_size": views, "elevation_range": [0.0, 30.0]}, **sizes,
            "sds": {"recon_loss": True, "recon_std_rescale": 0.5, "min_step_percent": [0, 0.98, 0.02, anneal],
                    "max_step_percent": [0, 0.98, 0.5, anneal]}}


def toy_refusal(prompt: str) -> str | None:
    """Why the toy world's grammar (a colour and/or a shape, a few other words) does not take ``prompt``, in one
    line with the vocabulary; None when it does."""
    from dream3d.guidance.priors.base import PriorError
    from dream3d.guidance.priors.toy_world import parse_prompt

    try:
        parse_prompt(prompt)
    except PriorError as e:
        return str(e)
    return None


def auto_prior(data: dict[str, Any]) -> str:
    """The prior ``--prior auto`` picks for a config layer: a toy-world prompt gets a toy prior (the trained
    toy-unet-mv where the rule trains on a UNet or a --model is given, else the closed-form toy-mv), any other
    prompt Stable Diffusion; both in their multi-view form (toy-mvdream, mvdream) where the config asks for
    groups of views (camera.group_views > 1, as a multi-view recipe sets). A model alias (``--model if-i-xl``)
    picks the prior it is for."""
    from dream3d.guidance.priors.hub import ALIASES

    if data.get("model") in ALIASES:
        return ALIASES[data["model"]].prior
    camera = data.get("camera")
    views = camera.get("group_views") if isinstance(camera, dict) else None
    multiview = isinstance(views, int) and views > 1
    prompt = data.get("prompt")
    if isinstance(prompt, str) and toy_refusal(prompt) is None:
        guidance = data.get("guidance", RunSettings.model_fields["guidance"].default)
        trains_unet = guidance in registry.RULES and registry.RULES[guidance].needs_unet
        if multiview:
            return "toy-mvdream"
        return "toy-unet-mv" if trains_unet or data.get("model") is not None else "toy-mv"
    return "mvdream" if multiview else "sd"


class RunSettings(_Section):
    """The run's own settings; ``RunConfig`` adds one section per registered rule and representation."""

    prompt: str
    # auto: chosen from the prompt and the rule (auto_prior) when the config is built, so config.yaml names the prior
    prior: str = AUTO
    # diffusers priors: an alias, a hub id or a local diffusers folder (None: the prior's default alias)
    model: str | None = None
    # recorded by a run: the hub id and commit the model resolved to; a resume, an export or a re-run of the
    # config.yaml loads exactly these (remove both to resolve the alias again)
    model_resolved: str | None = None
    model_revision: str | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    guidance: str = "sds"
    # where the forward noise comes from: fresh draws, or fixed noise attached to the 3D representation
    noise: Literal["independent", "consistent"] = "independent"
    representation: str = "nerf"
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

    @model_validator(mode="before")
    @classmethod
    def _multiview_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("prior", AUTO) == AUTO:
            data = {**data, "prior": auto_prior(data)}
        if isinstance(data, dict) and data.get("prior") in registry.PRIORS and registry.PRIORS[data["prior"]].views > 1:
            steps = data.get("steps", cls.model_fields["steps"].default)
            return merge(multiview_defaults(data["prior"], steps if isinstance(steps, int) else 1), data)
        return data

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
        return _check_seed(value)

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
        per_pixel = RENDER_BYTES_PER_PIXEL * (self.nerf.num_samples / 64 if self.representation == "nerf" else 1)
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
    def _nerf_sampler(self) -> "RunSettings":
        # a run on the CPU is known before any work; a GPU whose nerfacc build fails shows at the first render
        if self.representation == "nerf" and self.nerf.sampler == "occupancy" and self.device in ("auto", "cpu"):
            from dream3d.representations.nerf import occupancy_unavailable

            device = resolve_device(self.device)
            if device.type != "cuda":
                raise ValueError(occupancy_unavailable(device))
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
        if self.sds.perp_neg:
            raise ValueError(f"sds.perp_neg needs view prompts, and prior {self.prior} is told each view's camera instead")
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
        """Optimisation steps of every stage of the run: training, then texture refinement (``refine.steps``).
        A stage added to the run adds its steps here, so the web app's --max-steps bounds it too."""
        return self.steps + self.refine.steps

    @model_validator(mode="after")
    def _gaussians(self) -> "RunSettings":
        if self.representation == "gaussians" and self.loss.lambda_orient != 0:
            raise ValueError("loss.lambda_orient needs normals, which the gaussians representation does not render")
        if self.gaussians.init_points:
            if self.representation != "gaussians":
                raise ValueError(f"--init-points (gaussians.init_points) starts the gaussians representation, "
                                 f"not {self.representation}")
            if not Path(self.gaussians.init_points).is_file():
                raise ValueError(f"init points file {self.gaussians.init_points} does not exist")
        return self

    def resolution_at(self, step: int) -> int:
        if isinstance(self.resolution, int):
            return self.resolution
        return self.resolution[sum(step >= m for m in self.resolution_milestones)]


def _check_seed(value: int) -> int:
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        raise ValueError(f"the seed must lie in [-2**63, 2**64 - {MAX_PARTICLES}] (torch seeds are 64-bit and "
                         f"particle i takes seed + i), got {value}")
    return value


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


def _sections() -> dict[str, Any]:
    """One config section per registered rule and representation, named as the entry."""
    sections = {}
    for spec in (*registry.RULES, *registry.REPRESENTATIONS):
        config_class = registry.resolve(spec.config)
        sections[spec.name] = (config_class, Field(default_factory=config_class))
    return sections


RunConfig = create_model("RunConfig", __base__=RunSettings, __module__=__name__, **_sections())


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" if where else message


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["sds.weighting=uniform", "steps=300"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below a value")
        try:
            node[leaf] = safe_yaml(raw, f"override {key!r}")
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value does not parse") from None
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (update wins)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# no config nests deeper than a few levels; PyYAML and json build nested values by recursion, which a
# 20,000-deep list turns into a RecursionError
MAX_NESTING = 100


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, refused in one ConfigError (naming ``what``) when it nests deeper than MAX_NESTING.

    The depth is counted on PyYAML's event stream, which its parser makes without recursion."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise ConfigError(f"{what} is nested more than {MAX_NESTING} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return yaml.safe_load(text)


def check_nesting(value: Any, what: str) -> Any:
    """``value`` (from json.loads) as it is, or one ConfigError when it nests deeper than MAX_NESTING."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > MAX_NESTING:
            raise ConfigError(f"{what} is nested more than {MAX_NESTING} levels deep")
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = safe_yaml(Path(path).read_text(encoding="utf-8"), f"config {path}")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path} does not parse as YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return data


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Validates the merge of the layers (later wins) into a RunConfig; raises ConfigError in one line."""
    data: dict[str, Any] = {}
    for layer in layers:
        data = merge(data, layer)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def check_export_options(formats: list[str] | None, resolution: int | None) -> None:
    """``dream3d export``'s options under the same rules as a run's export section; raises ConfigError in one line."""
    given = {"formats": formats, "mesh_resolution": resolution}
    try:
        ExportConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


# DDIM picks its steps among the 1000 training timesteps of every shipped prior's scheduler
MAX_DDIM_STEPS = 1000
# prior samples are drawn in one batch of images of at most this size (toy-unet 32, IF stage I 64)
SAMPLE_PIXELS = 64 * 64


class SampleOptions(_Section):
    """``dream3d sample`` and ``dream3d eval-prior``: the numbers that size the work, checked up front."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: int = Field(4, gt=0)  # images drawn at once (eval-prior: 36 classes x views)
    steps: int = Field(50, gt=0, le=MAX_DDIM_STEPS)
    seed: int = 0
    elevation: float = 15.0
    azimuth: float | None = None
    guidance_scale: float | None = None

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return _check_seed(value)

    @field_validator("n")
    @classmethod
    def _n_fits(cls, value: int) -> int:
        check_fits(f"{value} samples", value * SAMPLE_PIXELS * RENDER_BYTES_PER_PIXEL,
                   f"one batch of {value} images of up to {SAMPLE_PIXELS} pixels, ~{RENDER_BYTES_PER_PIXEL} bytes a pixel")
        return value


def check_options(model: type[BaseModel], **values: Any) -> Any:
    """``model`` validated from command-line values; raises ConfigError in one line."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
