"""A fixed triangle mesh whose UV texture is the only parameter: what ``dream3d refine`` optimises.

It is a ``Representation``, so the training loop's step (render, guidance, Adam) drives it unchanged.
The texture is stored as logits and rendered through a sigmoid (DreamGaussian's stage 2 does the
same), so Adam can never push a texel out of [0, 1]; texels no visible pixel samples get no gradient
and stay as they were.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dream3d.representations.base import Representation
from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.mesh_raster import render_textured
from dream3d.representations.shading import LightConfig

# the texture's logits are clamped this far from 0 and 1, where the logit is infinite
_EDGE = 1e-3


class TexturedMesh(Representation):
    """A mesh (vertices [V,3], faces [F,3], uv [V,2] or [F,3,2] in OBJ's convention) with a texture [H,W,3] in [0,1]
    (top row first) optimised at learning rate ``lr``."""

    def __init__(self, vertices: Tensor, faces: Tensor, uv: Tensor, texture: Tensor, lr: float = 0.05,
                 light: LightConfig | None = None) -> None:
        """``light``: the texture is albedo, rendered lit by it (a run trained with shading); None: rendered as is."""
        super().__init__()
        self.register_buffer("vertices", vertices.float())
        self.register_buffer("faces", faces.long())
        self.register_buffer("uv", uv.float())
        self.logits = torch.nn.Parameter(torch.logit(texture.float().clamp(_EDGE, 1 - _EDGE)))
        self.lr = lr
        self.light = light

    @property
    def texture(self) -> Tensor:
        """[H,W,3] in [0,1]."""
        return torch.sigmoid(self.logits)

    def render(self, cameras: Cameras, background: Tensor, generator: torch.Generator | None = None,
               with_normals: bool = False) -> RenderOutput:
        """B views: rgb [B,H,W,3] over ``background`` [3], alpha [B,H,W,1] (0 or 1), depth [B,H,W,1]; no normals."""
        return render_textured(self.vertices, self.faces, self.uv, self.texture, cameras, background, self.light)

    def param_groups(self) -> list[dict]:
        return [{"name": "texture", "params": [self.logits], "lr": self.lr}]

    @torch.no_grad()
    def texture_image(self) -> np.ndarray:
        """The texture as [H,W,3] uint8 (top row first), ready for PIL."""
        return (self.texture * 255).round().to(torch.uint8).cpu().numpy()


__all__ = ["TexturedMesh"]
