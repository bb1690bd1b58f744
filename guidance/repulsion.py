"""Kernel repulsion between particles (Repulsive Score Distillation; docs/guidance-math.md#particles-and-repulsion).

For N >= 3 particles seen from the same camera, with features f_i of their images:

    d_ij = ||f_i - f_j||,  h = median_i(median_j d_ij^2) / log(N - 1),  k_ij = exp(-d_ij^2 / h),
    loss = sum_i log sum_{j != i} exp(-||f_i - sg(f_j)||^2 / h)     (h detached),

so d loss / d f_i = -r_i of the reference, which descends f_i away from the other particles
(-grad_{f_i} log sum_j k_ij) while each f_j is held fixed, as the reference's autograd of
sum f . sg(phi) does. The reference takes the features of the noisy x_t inside the IF rule;
dream3d takes them from the rendered images, so that repulsion adds to any rule.

Features: ``pixel_features`` (no download: the image average-pooled to 16 x 16) or
``DinoFeatures`` (a ViT's CLS output, e.g. DINO ViT-S/16, from a local folder).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dream3d.guidance.base import GuidanceError

FeatureFn = Callable[[Tensor], Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepulsionConfig(BaseModel):
    """``weight`` 0 switches repulsion off; ``features`` "dino" loads ``dino_model``, a local
    transformers ViT folder (or a hub id already in the local cache; nothing is downloaded)."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.0, ge=0)
    features: Literal["pixels", "dino"] = "pixels"
    dino_model: str | None = None


def pixel_features(images: Tensor, size: int = 16) -> Tensor:
    """images [M,3,H,W] in [0,1] -> [M, 3*size*size]: the images average-pooled to size x size."""
    return F.adaptive_avg_pool2d(images, size).flatten(1)


class DinoFeatures(torch.nn.Module):
    """A frozen transformers ViT (DINO's ``facebook/dino-vits16`` or any ViTModel folder): images
    [M,3,H,W] in [0,1] -> the CLS token of the last layer [M, hidden], with ImageNet normalisation."""

    def __init__(self, model: str) -> None:
        super().__init__()
        from transformers import AutoModel

        try:
            self.vit = AutoModel.from_pretrained(model, local_files_only=True).eval().requires_grad_(False)
        except (OSError, ValueError, pickle.UnpicklingError) as error:  # a pickled .bin is refused, never run
            raise GuidanceError(f"repulsion features 'dino': no local ViT model at {model!r} "
                                f"({type(error).__name__}); use repulsion.features=pixels or a local folder") from None
        self.size = int(self.vit.config.image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.vit(pixel_values=(x - self.mean) / self.std).last_hidden_state[:, 0]


def build_features(cfg: RepulsionConfig) -> FeatureFn:
    """The feature function ``cfg.features`` names; "dino" needs ``cfg.dino_model``."""
    if cfg.features == "pixels":
        return pixel_features
    if not cfg.dino_model:
        raise GuidanceError("repulsion features 'dino' need repulsion.dino_model=<a local ViT folder>")
    if not Path(cfg.dino_model).exists() and "/" not in cfg.dino_model:
        raise GuidanceError(f"repulsion.dino_model {cfg.dino_model!r} is neither a folder nor a hub id")
    return DinoFeatures(cfg.dino_model)


def repulsion_loss(features: Tensor) -> Tensor:
    """features [N,B,D] (N particles, each seen from the same B cameras) -> the summed loss above,
    averaged over the B views. Needs N >= 3 (log(N - 1) = 0 at N = 2)."""
    N = features.shape[0]
    if N < 3:
        raise ValueError(f"repulsion needs at least 3 particles, got {N}")
    f = features.transpose(0, 1)  # [B,N,D]
    d2 = ((f[:, :, None] - f.detach()[:, None]) ** 2).sum(-1)  # [B,N,N]: row i moves f_i, the others held fixed
    off = ~torch.eye(N, dtype=torch.bool, device=features.device)
    h = d2.detach()[:, off].view(-1, N, N - 1).median(-1).values.median() / math.log(N - 1)
    logits = (-d2 / h.clamp_min(1e-12)).masked_fill(~off, float("-inf"))
    return torch.logsumexp(logits, dim=-1).sum(-1).mean()
