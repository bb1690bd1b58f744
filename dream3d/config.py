"""The typed run configuration: defaults, YAML load/save and ``key=value`` overrides.

Every component is chosen by name (``prior``, ``guidance``, ``representation``) and
carries its own typed section; unknown keys and wrong types are errors. The saved
``config.yaml`` of a run re-runs the same job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dream3d.sampling import CameraConfig
from guidance.csd import CSDConfig
from guidance.ism import ISMConfig
from guidance.priors.diffusers_prior import DiffusersConfig
from guidance.prompts import PromptConfig
from guidance.repulsion import RepulsionConfig
from guidance.schedule import CheckedSchedule
from guidance.sds import CFDConfig, SDSConfig
from guidance.vsd import ESDConfig, VSDConfig
from representations.gaussians import GaussiansConfig
from representations.nerf import NeRFConfig
from representations.noise import NoiseFieldConfig

PRIORS = ("toy", "toy-mv", "toy-unet", "toy-unet-mv", "sd", "if")
# priors that load a diffusers folder (--model picks another)
DIFFUSERS_PRIORS = ("toy-unet", "toy-unet-mv", "sd", "if")
GUIDANCES = ("sds", "csd", "ism", "vsd", "esd", "cfd")
# rules that take 3D-consistent forward noise (--noise consistent); cfd always does
NOISE_GUIDANCES = ("sds", "ism", "cfd")
NOISES = ("independent", "consistent")
# priors without a diffusion network (closed-form denoisers): nothing for VSD/ESD's LoRA to attach to
CLOSED_FORM_PRIORS = ("toy", "toy-mv")
UNET_GUIDANCES = ("vsd", "esd")
REPRESENTATIONS = ("nerf", "gaussians")
EXPORT_FORMATS = ("glb", "obj", "ply")


class ConfigError(ValueError):
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
    hull_margin: float = Field(3.0, ge=0)  # grid cells: how far under the hull's surface the inside is filled
    largest_only: bool = True  # keep only the largest connected piece (else pieces over 5% of its faces)
    max_faces: int | None = Field(40_000, gt=0)  # face budget (quadric decimation); None keeps marching cubes' all
    video: bool = True
    video_frames: int = Field(48, gt=0)
    video_resolution: int = Field(128, gt=0)

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        bad = [f for f in value if f not in EXPORT_FORMATS]
        if bad:
            raise ValueError(f"unknown export format {bad[0]!r}; valid: {', '.join(EXPORT_FORMATS)}")
        return value


class RunConfig(_Section):
    prompt: str
    prior: str = "toy-mv"  # the embedded default: docs/benchmarks.md, "SDS with the trained toy prior"
    # diffusers priors: a hub id or a local diffusers folder (None: the prior's default model)
    model: str | None = None
    guidance: str = "sds"
    # where the forward noise comes from: fresh draws, or fixed noise attached to the 3D representation
    noise: Literal["independent", "consistent"] = "independent"
    representation: str = "nerf"
    steps: int = Field(600, gt=0)
    seed: int = 0
    # independent representations optimised together (export/p{i}/ each); one guidance, VSD's LoRA shared
    particles: int = Field(1, ge=1, le=64)
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
    nerf: NeRFConfig = NeRFConfig()
    gaussians: GaussiansConfig = GaussiansConfig()
    sds: SDSConfig = SDSConfig()
    cfd: CFDConfig = CFDConfig()
    noise_field: NoiseConfig = NoiseConfig()
    csd: CSDConfig = CSDConfig()
    ism: ISMConfig = ISMConfig()
    vsd: VSDConfig = VSDConfig()
    esd: ESDConfig = ESDConfig()
    prompts: PromptConfig = PromptConfig()
    repulsion: RepulsionConfig = RepulsionConfig()
    diffusers: DiffusersConfig = DiffusersConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value.strip()

    @field_validator("prior")
    @classmethod
    def _prior(cls, value: str) -> str:
        return _one_of("prior", value, PRIORS)

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str | None) -> str | None:
        # a local folder is saved absolute, so config.yaml re-runs from any working directory
        if value is not None and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, value: str) -> str:
        return _one_of("guidance", value, GUIDANCES)

    @field_validator("representation")
    @classmethod
    def _representation(cls, value: str) -> str:
        return _one_of("representation", value, REPRESENTATIONS)

    @model_validator(mode="after")
    def _resolution(self) -> "RunConfig":
        sizes = [self.resolution] if isinstance(self.resolution, int) else self.resolution
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if len(sizes) > 1 and len(self.resolution_milestones) != len(sizes) - 1:
            raise ValueError("resolution_milestones needs one step per resolution change")
        return self

    @model_validator(mode="after")
    def _model(self) -> "RunConfig":
        if self.model is not None and self.prior not in DIFFUSERS_PRIORS:
            raise ValueError(f"--model applies to the {', '.join(DIFFUSERS_PRIORS)} priors, not {self.prior!r}")
        return self

    @model_validator(mode="after")
    def _guidance_needs_unet(self) -> "RunConfig":
        if self.guidance in UNET_GUIDANCES and self.prior in CLOSED_FORM_PRIORS:
            works = ", ".join(p for p in PRIORS if p not in CLOSED_FORM_PRIORS)
            raise ValueError(f"guidance {self.guidance} trains a LoRA on the prior's UNet, and prior {self.prior} is "
                             f"closed-form (no UNet); use one of the priors {works}")
        return self

    @model_validator(mode="after")
    def _repulsion(self) -> "RunConfig":
        if self.repulsion.weight > 0 and self.particles < 3:
            raise ValueError(f"repulsion needs --particles 3 or more (got {self.particles}): its kernel bandwidth "
                             "median(d^2) / log(N - 1) is undefined for fewer")
        return self

    @model_validator(mode="after")
    def _noise(self) -> "RunConfig":
        if self.noise == "consistent" and self.guidance not in NOISE_GUIDANCES:
            raise ValueError(f"--noise consistent works with the guidance rules {', '.join(NOISE_GUIDANCES)}, "
                             f"not {self.guidance}")
        return self

    @property
    def consistent_noise(self) -> bool:
        """Whether the forward noise comes from the representation (``--noise consistent`` or ``--guidance cfd``)."""
        return self.noise == "consistent" or self.guidance == "cfd"

    @model_validator(mode="after")
    def _gaussians(self) -> "RunConfig":
        if self.representation == "gaussians":
            if self.loss.lambda_orient != 0:
                raise ValueError("loss.lambda_orient needs normals, which the gaussians representation does not render")
            if self.gaussians.init_points and not Path(self.gaussians.init_points).is_file():
                raise ValueError(f"init points file {self.gaussians.init_points} does not exist")
        return self

    def resolution_at(self, step: int) -> int:
        if isinstance(self.resolution, int):
            return self.resolution
        return self.resolution[sum(step >= m for m in self.resolution_milestones)]


def _one_of(kind: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


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
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value does not parse") from None
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (update wins)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
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


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
