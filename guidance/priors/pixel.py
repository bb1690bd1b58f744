"""A pixel-space diffusers prior: x = 2 rgb - 1 at the UNet's resolution, no VAE.

Any text-conditioned UNet2DConditionModel folder (UNet, scheduler, text encoder, tokenizer)
whose UNet takes 3 channels; DeepFloyd IF stage I is one (``deepfloyd.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.priors.diffusers_prior import DiffusersPrior, DiffusersConfig, resize_square
from dream3d.guidance.prompts import PromptConfig


class PixelPrior(DiffusersPrior):
    # DeepFloyd IF's pipeline masks the padding of its T5 prompt
    text_attention_mask = True

    def __init__(self, model: str | None, cfg: DiffusersConfig, prompts: PromptConfig, revision: str | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(model, cfg, prompts, revision, device)
        self.resolution = int(self.unet.config.sample_size)

    def check_kind(self) -> None:
        if "vae" in self.index:
            raise PriorError(f"{self.model} is a latent-diffusion model ({self.pipeline_class}, with a VAE), not a "
                             f"pixel-space model; use --prior sd for Stable Diffusion")
        unet = self.unet_config
        if unet.get("in_channels") != 3 or unet.get("out_channels") not in (3, 6):
            raise PriorError(f"{self.model}'s UNet maps {unet.get('in_channels')} to {unet.get('out_channels')} "
                             f"channels ({self.pipeline_class}: a super-resolution stage?); --prior {self.name} "
                             f"needs a text-to-image pixel model (3 in, 3 or 6 with learned variance out)")

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> x [B,3,r,r] = 2 rgb - 1 at the UNet's resolution, differentiable."""
        return 2 * resize_square(rgb.to(self.device), self.resolution) - 1

    def decode(self, x: Tensor) -> Tensor:
        """x [B,3,r,r] -> rgb in [0,1]."""
        return ((x + 1) / 2).clamp(0, 1)
