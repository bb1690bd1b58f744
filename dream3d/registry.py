"""Every swappable part by name: the guidance rules, the priors and the representations.

An entry says what the rest of dream3d needs to know of a part without importing it: its
config class and builder as ``"module:attribute"`` references (imported on first use, so the
CLI's choices and ``--help`` cost no torch import) and its capabilities. The CLI's choices, the
config sections of ``RunConfig``, the web form's dropdowns, the benchmarks and the refusal
messages all read these tables; adding a rule is its module plus one ``RULES.add`` line below.

A rule is built as ``RuleClass(prior, section, context)`` with ``context`` a
``guidance.base.RuleContext``; a representation as ``Class(section, generator=..., noise=...)``;
a prior as ``PriorClass.from_config(settings)`` with ``settings`` a ``guidance.priors.base.PriorSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Generic, TypeVar


def resolve(reference: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imports the module)."""
    module, _, attribute = reference.partition(":")
    return getattr(import_module(module), attribute)


@dataclass(frozen=True)
class RuleSpec:
    name: str
    config: str  # "module:Class", the rule's config section (``NAME:`` in config.yaml)
    builds: str  # "module:Class", called as Class(prior, section, RuleContext)
    summary: str
    needs_unet: bool = False  # trains on the prior's diffusion UNet: refused with closed-form priors
    takes_noise: bool = False  # accepts 3D-consistent forward noise (--noise consistent)
    always_consistent_noise: bool = False  # uses consistent noise whatever --noise says
    multiview_refusal: str = ""  # why it cannot drive a multi-view prior ("" if it can)


@dataclass(frozen=True)
class PriorSpec:
    name: str
    builds: str  # "module:Class", built as Class.from_config(PriorSettings)
    summary: str
    guidance_scale: float  # SDS's default CFG scale with this prior (DreamFusion convention)
    rule_guidance_scales: dict[str, float] = field(default_factory=dict)  # a rule's own default, where it differs
    closed_form: bool = False  # a closed-form denoiser: no UNet for VSD/ESD's LoRA
    loads_model: bool = False  # takes --model (a diffusers folder or hub id)
    open_vocabulary: bool = False  # any text: the references' negative prompts and Perp-Neg apply
    views: int = 1  # views of one object denoised together (a multi-view prior; cameras come in such groups)

    def guidance_scale_for(self, rule: str) -> float:
        return self.rule_guidance_scales.get(rule, self.guidance_scale)


@dataclass(frozen=True)
class RepresentationSpec:
    name: str
    config: str  # "module:Class", the config section
    builds: str  # "module:Class", called as Class(section, generator=..., noise=...)
    summary: str
    renders_normals: bool = True  # renders normals (loss.lambda_orient needs them)
    takes_init_points: bool = False  # its section's init_points starts it from a PLY's points (--init-points)


Spec = TypeVar("Spec", RuleSpec, PriorSpec, RepresentationSpec)


class UnknownName(ValueError):
    """A name no entry has; the message is one line listing the valid names."""


class Registry(Generic[Spec]):
    """Entries of one kind by name, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Spec] = {}

    def add(self, spec: Spec) -> Spec:
        if spec.name in self._entries:
            raise ValueError(f"{self.kind} {spec.name!r} is registered twice")
        self._entries[spec.name] = spec
        return spec

    def remove(self, name: str) -> Spec:
        """Takes an entry out (a test's throwaway component)."""
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> Spec:
        if name not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


# a multi-view prior denoises a group of views at one shared t (docs/mvdream.md)
PER_IMAGE_T = "draws a timestep per image, and a multi-view prior denoises its views at one shared t"

RULES: Registry[RuleSpec] = Registry("guidance")
RULES.add(RuleSpec("sds", "dream3d.guidance.sds:SDSConfig", "dream3d.guidance.sds:SDSGuidance",
                   "Score Distillation Sampling (DreamFusion)", takes_noise=True))
RULES.add(RuleSpec("csd", "dream3d.guidance.csd:CSDConfig", "dream3d.guidance.csd:CSDGuidance", "Classifier Score Distillation",
                   multiview_refusal=PER_IMAGE_T))
RULES.add(RuleSpec("ism", "dream3d.guidance.ism:ISMConfig", "dream3d.guidance.ism:ISMGuidance",
                   "Interval Score Matching (LucidDreamer)", takes_noise=True))
RULES.add(RuleSpec("vsd", "dream3d.guidance.vsd:VSDConfig", "dream3d.guidance.vsd:VSDGuidance",
                   "Variational Score Distillation (ProlificDreamer)", needs_unet=True))
RULES.add(RuleSpec("esd", "dream3d.guidance.vsd:ESDConfig", "dream3d.guidance.vsd:VSDGuidance",
                   "Entropic Score Distillation (VSD with camera-free CFG)", needs_unet=True))
RULES.add(RuleSpec("cfd", "dream3d.guidance.sds:CFDConfig", "dream3d.guidance.sds:SDSGuidance",
                   "Consistent Flow Distillation", takes_noise=True, always_consistent_noise=True))
RULES.add(RuleSpec("nfsd", "dream3d.guidance.nfsd:NFSDConfig", "dream3d.guidance.nfsd:NFSDGuidance", "Noise-Free Score Distillation",
                   multiview_refusal=PER_IMAGE_T))

PRIORS: Registry[PriorSpec] = Registry("prior")
PRIORS.add(PriorSpec("toy", "dream3d.guidance.priors.toy:ToyPrior", "closed-form denoiser of the toy world, camera-free",
                     3.0, closed_form=True))
PRIORS.add(PriorSpec("toy-mv", "dream3d.guidance.priors.toy:ToyPrior",
                     "closed-form denoiser of the toy world, camera-conditioned (the default)", 3.0, closed_form=True))
PRIORS.add(PriorSpec("toy-unet", "dream3d.guidance.priors.toy_unet:ToyUNetPrior",
                     "the trained toy diffusion model (assets/toy-unet), camera-free", 3.0, loads_model=True))
PRIORS.add(PriorSpec("toy-unet-mv", "dream3d.guidance.priors.toy_unet:ToyUNetMVPrior",
                     "the trained toy diffusion model, camera-conditioned", 3.0, loads_model=True))
PRIORS.add(PriorSpec("sd", "dream3d.guidance.priors.sd:StableDiffusionPrior", "Stable Diffusion 1.x/2.x (latent)", 100.0,
                     {"cfd": 70.0}, loads_model=True, open_vocabulary=True))
PRIORS.add(PriorSpec("if", "dream3d.guidance.priors.deepfloyd:DeepFloydIFPrior", "DeepFloyd IF stage I (64x64 pixels)", 20.0,
                     loads_model=True, open_vocabulary=True))
# MVDream's CFG 50 is the diffusers convention, eps_u + 50 (eps_y - eps_u): DreamFusion's 49 (docs/mvdream.md)
PRIORS.add(PriorSpec("mvdream", "dream3d.guidance.priors.mvdream:MVDreamPrior", "MVDream (SD 2.1-base, 4 views jointly)", 49.0,
                     loads_model=True, views=4))
PRIORS.add(PriorSpec("toy-mvdream", "dream3d.guidance.priors.toy_mvdream:ToyMVDreamPrior",
                     "the MVDream network at toy size (dream3d train-prior --arch mvdream); CFG untuned", 3.0,
                     loads_model=True, views=4))

REPRESENTATIONS: Registry[RepresentationSpec] = Registry("representation")
REPRESENTATIONS.add(RepresentationSpec("nerf", "dream3d.representations.nerf:NeRFConfig", "dream3d.representations.nerf:NeRF",
                                       "a NeRF: dense multi-resolution grids, or an Instant-NGP hash grid with nerf.encoding=hashgrid (density blob)"))
REPRESENTATIONS.add(RepresentationSpec("gaussians", "dream3d.representations.gaussians:GaussiansConfig",
                                       "dream3d.representations.gaussians:Gaussians", "3D Gaussian splats",
                                       renders_normals=False, takes_init_points=True))
REPRESENTATIONS.add(RepresentationSpec("dmtet", "dream3d.representations.dmtet:DMTetConfig", "dream3d.representations.dmtet:DMTet",
                                       "DMTet: an SDF on a tet grid, marching tets, a differentiable mesh rasterizer"))
