"""MVDream as a prior (``--prior mvdream``): four views of one object denoised jointly, each told its camera.

A model folder is MVDream's diffusers layout (``ashawkey/mvdream-sd2.1-diffusers``): ``vae``,
``text_encoder``, ``tokenizer`` and ``scheduler`` load through the diffusers/transformers classes;
the ``unet`` folder's custom code is never imported: its ``config.json`` sizes our own
``MultiViewUNet`` and its safetensors load into it with strict key matching. Latent space as
Stable Diffusion (``sd.py``), at 256 x 256 pixels (32 x 32 latents) for the released model.

The batch is whole groups of ``num_views`` views, each group's views contiguous (the loop's
``camera.group_views`` sampler makes them); the views of a group share one timestep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from dream3d.guidance.priors.base import Embeddings, PriorError
from dream3d.guidance.diffusion import to_epsilon
from dream3d.guidance.priors.diffusers_folder import read_config
from dream3d.guidance.priors.diffusers_prior import DiffusersConfig, DiffusersPrior
from dream3d.guidance.priors.mvdream_unet import (
    IGNORED_CONFIG_KEYS, CheckpointMismatch, MultiViewUNet, MVDreamUNetConfig, load_unet,
)
from dream3d.guidance.priors.sd import StableDiffusionPrior
from dream3d.guidance.prompts import PromptConfig
from dream3d.representations.cameras import Cameras

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def mvdream_camera(c2w: Tensor) -> Tensor:
    """Our cameras [B,4,4] (OpenGL c2w, world +z up) -> MVDream's camera input [B,16].

    MVDream was trained on OpenGL camera axes in a z-up world, our convention exactly; it only
    wants the translation scaled to unit length (the camera's direction from the object, not its
    distance), then the 4x4 matrix flattened row by row."""
    c2w = c2w.clone()
    c2w[:, :3, 3] = c2w[:, :3, 3] / (c2w[:, :3, 3].norm(dim=-1, keepdim=True) + 1e-8)
    return c2w.flatten(1)


def unet_config(config: dict[str, Any], model: str) -> MVDreamUNetConfig:
    """The network sizes of an MVDream ``unet/config.json``; PriorError for a variant this module does not build."""
    if config.get("ip_dim"):
        raise PriorError(f"{model} is an image-conditioned MVDream (ImageDream, ip_dim {config['ip_dim']}); "
                         f"--prior mvdream runs the text-to-multi-view model")
    if "camera_dim" not in config:
        raise PriorError(f"{model}'s UNet has no camera input ({config.get('_class_name', 'unknown class')}): it is "
                         f"not an MVDream model; use --prior sd for Stable Diffusion")
    try:
        return MVDreamUNetConfig(**{k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS})
    except ValidationError as e:
        first = e.errors()[0]
        raise PriorError(f"{model}/unet/config.json: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


class MVDreamPrior(DiffusersPrior):
    name = "mvdream"
    default_model = "mvdream"  # an alias (hub.py)
    components = ("unet", "scheduler", "text_encoder", "tokenizer", "vae")
    num_views = 4
    encode = StableDiffusionPrior.encode
    decode = StableDiffusionPrior.decode

    def __init__(self, model: str | None, cfg: DiffusersConfig, prompts: PromptConfig, revision: str | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(model, cfg, prompts, revision, device)
        self.load_image_space()

    def load_image_space(self) -> None:
        """The VAE, and the render resolution it maps to the UNet's latent size."""
        self.vae = self._load_model("vae", self._diffusers_model("AutoencoderKL"))
        self.scaling_factor = float(self.vae.config.scaling_factor)
        downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.unet.cfg.image_size * downsampling

    def check_kind(self) -> None:
        if "vae" not in self.index:
            raise PriorError(f"{self.model} is a pixel-space model ({self.pipeline_class}, no VAE); --prior mvdream "
                             f"runs latent MVDream (a pixel-space toy-mvdream folder loads with --prior toy-mvdream)")
        unet_config(self.unet_config, self.model)

    def _diffusers_model(self, class_name: str) -> Any:
        """The UNet is ours (MVDream's own class is custom code); the other components are the libraries'."""
        if class_name == "UNet2DConditionModel":
            return self._multiview_unet
        return super()._diffusers_model(class_name)

    def _multiview_unet(self, path: Path, **_: Any) -> MultiViewUNet:
        from safetensors import SafetensorError

        cfg = unet_config(read_config(self.folder, self.model, "unet"), self.model)
        weights = path / UNET_WEIGHTS
        if not weights.is_file():
            raise PriorError(f"{self.model}/unet has no {UNET_WEIGHTS}")
        try:
            return load_unet(cfg, weights, self.dtype, self.device)
        except CheckpointMismatch as e:
            raise PriorError(f"{self.model}/unet/{UNET_WEIGHTS} does not fit MVDream's UNet: {e}") from None
        except SafetensorError as e:
            raise PriorError(f"{self.model}/unet/{UNET_WEIGHTS} is not a readable safetensors file ({e})") from None

    def _camera_features(self) -> tuple[str, ...]:
        # the camera goes in through the UNet's own camera MLP (mvdream_camera), not a class embedding
        return ()

    def embed(self, prompt: str) -> Embeddings:
        """cond and uncond [L,D] only: the camera input tells each view where it is, so no view prompts."""
        if prompt not in self._embeddings:
            cond, uncond = self.text_embeddings([prompt, self.prompts.negative_prompt])
            self._embeddings[prompt] = Embeddings(prompt, cond, uncond)
        return self._embeddings[prompt]

    def predict_noise(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None = None) -> Tensor:
        """Epsilon [B,C,h,w] for x_t [B,C,h,w] (latents; pixels for the toy) of B / num_views objects, each one's
        views contiguous; t [B] long (one value per group), text states [B,L,D], cameras (B)."""
        B, N = x_t.shape[0], self.num_views
        if cameras is None:
            raise PriorError(f"--prior {self.name} needs each view's camera")
        if B % N or not bool((t.reshape(-1, N) == t.reshape(-1, N)[:, :1]).all()):
            raise PriorError(f"--prior {self.name} denoises groups of {N} views of one object at one timestep; got a "
                             f"batch of {B} with per-view timesteps {t.tolist()} (sample with camera.group_views={N})")
        camera = mvdream_camera(cameras.c2w.float()).to(self.device, self.dtype)
        out = self.unet(x_t.to(self.device, self.dtype), t.to(self.device), embeddings.to(self.device, self.dtype),
                        camera, num_frames=N)
        abar = self.alphas_cumprod.to(self.device)[t.to(self.device)].view(-1, 1, 1, 1)
        return to_epsilon(out.float(), x_t.to(self.device).float(), abar, self.prediction_type).to(x_t.dtype)
