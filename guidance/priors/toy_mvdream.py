"""The toy world's multi-view prior ("toy-mvdream"): MVDream's network at toy size, in pixel space.

The folder ``dream3d train-prior --arch mvdream`` writes holds our ``MultiViewUNet`` (3 pixel
channels in and out, v-prediction on a cosine schedule, as toy-unet), the toy word-level tokenizer
and a tiny ``CLIPTextModel``; no VAE. Everything else — strict weight loading, the camera
conversion, joint-view attention, one t per group of 4 views — is ``MVDreamPrior``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from dream3d.guidance.priors.base import Embeddings, PriorError
from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
from dream3d.guidance.priors.mvdream import MVDreamPrior, unet_config
from dream3d.guidance.priors.mvdream_unet import MVDreamUNetConfig
from dream3d.guidance.priors.pixel import PixelPrior
from dream3d.guidance.priors.toy_unet import VIEW_WORDS
from dream3d.guidance.priors.toy_world import parse_prompt
from dream3d.guidance.prompts import PromptConfig

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "toy-mvdream"


class ToyMVDreamArch(BaseModel):
    """The sizes of the toy-mvdream model."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = 32
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = (2, 4)
    num_head_channels: int = 16
    norm_groups: int = 8
    text_dim: int = 64
    text_layers: int = 2
    attention_heads: int = 4
    max_tokens: int = 12

    def unet(self) -> MVDreamUNetConfig:
        return MVDreamUNetConfig(
            in_channels=3, out_channels=3, model_channels=self.model_channels, channel_mult=self.channel_mult,
            num_res_blocks=1, attention_resolutions=self.attention_resolutions,
            num_head_channels=self.num_head_channels, context_dim=self.text_dim, image_size=self.resolution,
            norm_groups=self.norm_groups)


class ToyMVDreamPrior(MVDreamPrior):
    name = "toy-mvdream"
    default_model = str(SHIPPED_MODEL)
    components = ("unet", "scheduler", "text_encoder", "tokenizer")
    text_attention_mask = True
    encode = PixelPrior.encode
    decode = PixelPrior.decode

    def __init__(self, model: str | None, cfg: DiffusersConfig, prompts: PromptConfig, revision: str | None = None,
                 device: torch.device | None = None) -> None:
        if model is None and not SHIPPED_MODEL.is_dir():
            raise PriorError("toy-mvdream has no shipped weights yet: train them with `dream3d train-prior --arch "
                             "mvdream` (writes assets/toy-mvdream), or pass --model FOLDER")
        super().__init__(model, cfg, prompts, revision, device)

    def check_kind(self) -> None:
        if "vae" in self.index:
            raise PriorError(f"{self.model} is a latent-diffusion model (with a VAE); use --prior mvdream")
        cfg = unet_config(self.unet_config, self.model)
        if cfg.in_channels != 3 or cfg.out_channels != 3:
            raise PriorError(f"{self.model}'s UNet maps {cfg.in_channels} to {cfg.out_channels} channels; "
                             f"--prior toy-mvdream needs a pixel-space model (3 to 3)")

    def load_image_space(self) -> None:
        self.resolution = self.unet.cfg.image_size

    def embed(self, prompt: str) -> Embeddings:
        """As MVDreamPrior (the word-level tokenizer rejects unknown words), then the toy grammar."""
        embeddings = super().embed(prompt)
        parse_prompt(" ".join(w for w in prompt.replace(",", " ").split() if w.lower() not in VIEW_WORDS))
        return embeddings

