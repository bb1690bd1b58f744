"""Frozen diffusers models as priors: loading the UNet, scheduler and tokenizer, and epsilon prediction.

A model is an alias (``hub.py``: a short name for hub ids tried in order), a hub id or a local
folder in the diffusers pipeline layout (``model_index.json`` plus one subfolder per component).
Aliases and hub ids resolve to a snapshot in the Hugging Face cache, downloaded only when
missing and the hub is reachable (``diffusers_folder.py``); everything after that
loads from the local folder with ``local_files_only``, from ``.safetensors`` only, and
never with remote code. Every failure the user can cause is a one-line ``PriorError``.

The shared base loads the UNet, the scheduler (for its alphas and prediction type) and the
tokenizer; the text encoder and the embedding cache are ``text_embeddings.py``'s. ``sd.py`` adds
the VAE (latent space); ``pixel.py`` and ``deepfloyd.py`` are the pixel-space priors.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dream3d.guidance.diffusion import to_epsilon
from dream3d.guidance.priors.base import Embeddings, Prior, PriorError, PriorSettings
from dream3d.guidance.priors.diffusers_folder import (
    check_safetensors, read_config, read_model_index, resolve_model, without_progress_bars,
)
from dream3d.guidance.priors.precision import LossScale
from dream3d.guidance.priors.random_models import ByteTokenizer, build_component, random_spec
from dream3d.guidance.priors.text_embeddings import TextEmbeddings
from dream3d.guidance.prompts import PromptConfig
from dream3d.representations.cameras import Cameras, to_device

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Camera features a model folder may declare (model_index.json "_camera_features", in order) as the
# input of its UNet's projection class embedding; all zeros means "no camera" (dropped in training).
CAMERA_FEATURES: dict[str, Callable[[Cameras], Tensor]] = {
    "elevation_rad": lambda cams: torch.deg2rad(cams.elevation),
    "sin_azimuth": lambda cams: torch.sin(torch.deg2rad(cams.azimuth)),
    "cos_azimuth": lambda cams: torch.cos(torch.deg2rad(cams.azimuth)),
}
# What a failed load of a component raises (a bad config, a missing or truncated weight file).
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


class DiffusersConfig(BaseModel):
    """How a diffusers prior is loaded and run.

    device: auto (in a run: the run's device), cpu, cuda or cuda:N; the app resolves it (``dream3d.run.device``,
    which checks the GPU index) and builds the prior with ``device=``. dtype applies on CUDA; on the
    CPU weights are always float32. variant picks a weight
    file variant ("fp16" halves the download where the model has one). channels_last
    (CUDA only) and offload_text_encoder (moved to the CPU after embedding) save time and memory.
    """

    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    variant: str | None = None
    channels_last: bool = True
    offload_text_encoder: bool = False


def resize_square(rgb: Tensor, size: int) -> Tensor:
    """rgb [B,3,H,W] -> [B,3,size,size], bilinear (antialiased when shrinking)."""
    if rgb.shape[-2:] == (size, size):
        return rgb
    return F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=rgb.shape[-1] > size)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter gradients (gradients still flow through to the inputs)."""
    module.eval()
    module.requires_grad_(False)
    return module


class DiffusersPrior(TextEmbeddings, Prior):
    """The Prior protocol over a diffusers UNet + scheduler + text encoder; subclasses define the image space.

    Subclasses set ``name``, ``default_model`` (an alias), ``components`` (the model_index entries they need),
    ``text_max_length`` (None: the tokenizer's), ``text_attention_mask``, ``download_note``
    (added to the how-to-download hint of a missing model) and ``use_cameras`` (pass the cameras
    to a model that declares camera features; False: the features' "no camera" zeros), and implement
    ``check_kind`` (is this folder the right kind of model?), ``encode`` and ``decode``.
    """

    name: str
    default_model: str
    components: tuple[str, ...] = ("unet", "scheduler", "text_encoder", "tokenizer")
    # the bound of a clean x (pixels scaled to [-1, 1]); None for a space without one (SD's scaled latents)
    x0_bound: float | None = 1.0
    text_max_length: int | None = None
    text_attention_mask: bool = False
    download_note: str = ""
    use_cameras: bool = True

    def __init__(self, model: str | None, cfg: DiffusersConfig, prompts: PromptConfig, revision: str | None = None,
                 device: torch.device | None = None) -> None:
        """model: a folder, a hub id or an alias (None: ``default_model``); revision: the commit of a hub id that a
        run recorded (``source``), loaded exactly; device: where it runs (None: ``cfg.device``, which must then name
        one: "auto" is the caller's to resolve)."""
        if device is None and cfg.device == "auto":
            raise PriorError("diffusers.device auto stands for the run's device: build the prior with device=")
        self.model = model or self.default_model
        self.cfg = cfg
        self.prompts = prompts
        self.device = device if device is not None else torch.device(cfg.device)
        self.dtype = torch.float32 if self.device.type == "cpu" else getattr(torch, cfg.dtype)
        # random:NAME builds the published architecture with random weights (random_models.py), no folder
        self.random = random_spec(self.model)
        self.folder, self.source = (None, None) if self.random else resolve_model(
            self.model, self.components, cfg.variant, self.download_note, revision)
        self.index = self.random["model_index"] if self.random else read_model_index(self.folder, self.model)
        self.check_kind()
        missing = [c for c in self.components
                   if c not in self.index or (self.random is None and not (self.folder / c).is_dir())]
        if missing:
            raise PriorError(f"{self.model} is not a complete diffusers model for --prior {self.name}: "
                             f"no {', '.join(missing)} component")
        self._load_scheduler()
        self.unet = self._load_model("unet", self._diffusers_model("UNet2DConditionModel"))
        self.camera_features = self._camera_features()
        self.tokenizer = self._load("tokenizer", self._tokenizer)
        self._text_encoder: torch.nn.Module | None = None
        self._embeddings: dict[str, Embeddings] = {}
        self.generator: torch.Generator | None = None
        self.loss_scale = LossScale(self.dtype, self.device)

    @classmethod
    def from_config(cls, settings: PriorSettings) -> DiffusersPrior:
        return cls(settings.model, settings.diffusers, settings.prompts, revision=settings.revision,
                   device=settings.device)

    def use_generator(self, generator: torch.Generator) -> None:
        """Draw this prior's own randomness (a VAE posterior sample) from ``generator``, the run's checkpointed one."""
        self.generator = generator

    def draw_normal(self, shape: torch.Size) -> Tensor:
        """N(0, I) of ``shape`` on the generator's device (the global CPU generator without one)."""
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=self.generator, device=device)

    # -- loading -----------------------------------------------------------------
    def check_kind(self) -> None:
        """Raises PriorError naming what the folder is when it is not a model this prior runs."""
        raise NotImplementedError

    def component_config(self, component: str) -> dict[str, Any]:
        """config.json of a weighted component (its spec for a random model)."""
        return self.random[component] if self.random else read_config(self.folder, self.model, component)

    @property
    def unet_config(self) -> dict[str, Any]:
        return self.component_config("unet")

    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the x the UNet denoises: the pixels at ``resolution`` unless a subclass
        says otherwise."""
        return 3, self.resolution, self.resolution

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", "unknown pipeline"))

    def _load(self, component: str, load: Callable[[], Any]) -> Any:
        try:
            return load()
        except PriorError:
            raise
        except _LOAD_ERRORS as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PriorError(f"cannot load the {component} of {self.model}: {reason}") from None

    def _load_model(self, component: str, load: Callable[..., torch.nn.Module]) -> torch.nn.Module:
        """A weighted component, from safetensors (or random), frozen on the prior's device and dtype."""
        if self.random:
            # torch's own .to: diffusers' warns about keeping modules in float32, which only applies to loading
            module = torch.nn.Module.to(build_component(self.random, component, self.device), self.dtype)
        else:
            check_safetensors(self.folder, self.model, component)
            with without_progress_bars():
                module = self._load(component, lambda: load(self.folder / component, use_safetensors=True,
                                                            local_files_only=True, variant=self.cfg.variant))
        module = freeze(module).to(self.device)
        if self.device.type == "cuda" and self.cfg.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def _diffusers_model(self, class_name: str) -> Callable[..., torch.nn.Module]:
        import diffusers

        model_class = getattr(diffusers, class_name)
        return lambda path, **kw: model_class.from_pretrained(path, torch_dtype=self.dtype, **kw)

    def _load_scheduler(self) -> None:
        from diffusers import DDPMScheduler

        # Only the training schedule matters (alphas, prediction type), whatever sampler the folder names.
        if self.random:
            scheduler = DDPMScheduler.from_config(self.random["scheduler"])
        else:
            scheduler = self._load("scheduler", lambda: DDPMScheduler.from_pretrained(self.folder / "scheduler"))
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float().to(self.device)  # kept where the lookups run
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise PriorError(f"{self.model}: unknown scheduler prediction_type {self.prediction_type!r}; "
                             f"dream3d handles {', '.join(PREDICTION_TYPES)}")

    def _camera_features(self) -> tuple[str, ...]:
        """The declared camera features, checked against CAMERA_FEATURES and the UNet's class embedding."""
        names = tuple(self.index.get("_camera_features") or ())
        unknown = [n for n in names if n not in CAMERA_FEATURES]
        if unknown:
            raise PriorError(f"{self.model} declares unknown camera features {', '.join(map(str, unknown))}; "
                             f"dream3d computes {', '.join(CAMERA_FEATURES)}")
        unet = self.unet.config
        if names and (unet.class_embed_type != "projection" or unet.projection_class_embeddings_input_dim != len(names)):
            raise PriorError(f"{self.model} declares {len(names)} camera features but its UNet has no projection "
                             f"class embedding of that many inputs")
        return names

    def camera_labels(self, cameras: Cameras | None, batch: int) -> Tensor | None:
        """[B, F] class labels of a camera-conditioned UNet (zeros without cameras), None for other UNets."""
        if not self.camera_features:
            return None
        if cameras is None or not self.use_cameras:
            return torch.zeros(batch, len(self.camera_features), device=self.device, dtype=self.dtype)
        features = [CAMERA_FEATURES[name](cameras).float() for name in self.camera_features]
        return torch.stack(features, dim=-1).to(self.device, self.dtype)

    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self.random:
            return ByteTokenizer(**self.random["tokenizer"])
        return AutoTokenizer.from_pretrained(self.folder / "tokenizer", local_files_only=True, trust_remote_code=False)

    # -- noise -------------------------------------------------------------------
    def predict_noise(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None = None) -> Tensor:
        """Epsilon [B,C,h,w] for x_t [B,C,h,w], t [B] long, text states [B,L,D], cameras (B, or None).

        Cameras condition only a model that declares camera features (``camera_labels``).
        A learned-variance UNet (2C output channels, as DeepFloyd IF) gives epsilon in its first C
        channels; v- and x0-prediction outputs are converted with the scheduler's alphas.
        """
        t = to_device(t, self.device)
        x_in = x_t.to(self.device, self.dtype)
        if self.device.type == "cuda" and self.cfg.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        output = self.unet(x_in, t, encoder_hidden_states=embeddings.to(self.device, self.dtype),
                           class_labels=self.camera_labels(cameras, x_t.shape[0])).sample
        output = output.float()
        channels = x_t.shape[1]
        if output.shape[1] == 2 * channels:
            output = output[:, :channels]
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return to_epsilon(output, x_t.to(self.device).float(), abar, self.prediction_type).to(x_t.dtype)
