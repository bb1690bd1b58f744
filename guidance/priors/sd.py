"""Stable Diffusion 1.x/2.x as a prior: latent space through the VAE (docs/guidance-math.md#conventions).

x = scaling_factor * VAE_enc(2 rgb - 1) with the render bilinearly resized to the model's
resolution (512 for SD 2.1-base); the gradient passes back through the encoder to the render.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.priors.diffusers_prior import DiffusersPrior, DiffusersConfig, resize_square
from dream3d.guidance.prompts import PromptConfig
from dream3d.representations.cameras import to_device


class StableDiffusionPrior(DiffusersPrior):
    name = "sd"
    default_model = "sd-2.1-base"  # an alias (hub.py): the hub ids tried in order
    components = ("unet", "scheduler", "text_encoder", "tokenizer", "vae")

    def __init__(self, model: str | None, cfg: DiffusersConfig, prompts: PromptConfig, revision: str | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(model, cfg, prompts, revision, device)
        self.vae = self._load_model("vae", self._diffusers_model("AutoencoderKL"))
        self.scaling_factor = float(self.vae.config.scaling_factor)
        downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.unet.config.sample_size) * downsampling

    x0_bound = None  # scaled latents are about unit variance, not bounded

    def sample_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return int(self.unet.config.in_channels), size, size

    def check_kind(self) -> None:
        if "vae" not in self.index:
            raise PriorError(f"{self.model} is a pixel-space model ({self.pipeline_class}, no VAE), not Stable "
                             f"Diffusion; use --prior if for DeepFloyd IF stage I")
        unet = self.unet_config
        if unet.get("addition_embed_type") == "text_time":
            raise PriorError(f"{self.model} is an SDXL-type model ({self.pipeline_class}) that needs extra "
                             f"conditioning; --prior sd runs Stable Diffusion 1.x/2.x")
        latent = self.component_config("vae").get("latent_channels", 4)
        if unet.get("in_channels") != latent:
            raise PriorError(f"{self.model}'s UNet takes {unet.get('in_channels')} input channels but its VAE makes "
                             f"{latent} ({self.pipeline_class}: an inpainting or image-conditioned model?); "
                             f"--prior sd needs a text-to-image model")

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> latents [B,4,r/8,r/8] float32 (a posterior sample, as threestudio), differentiable.

        The sample is mean + std * eps with eps ~ N(0, I) from ``generator`` (``use_generator``)."""
        rgb = resize_square(rgb.to(self.device), self.resolution)
        # float16 weights: the backward through the encoder runs on a scaled gradient (precision.py)
        posterior = self.vae.encode(self.loss_scale.enter(2 * rgb - 1)).latent_dist
        # the posterior's eps comes from the run's generator (checkpointed), not the device's global one
        eps = to_device(self.draw_normal(posterior.mean.shape), posterior.mean.device).to(posterior.mean)
        return self.loss_scale.leave(posterior.mean + posterior.std * eps) * self.scaling_factor

    def decode(self, x: Tensor) -> Tensor:
        """latents [B,4,h,w] -> rgb [B,3,r,r] in [0,1]."""
        image = self.vae.decode((x / self.scaling_factor).to(self.device, self.dtype)).sample
        return ((image.float() + 1) / 2).clamp(0, 1)
