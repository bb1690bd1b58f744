"""What every representation is to the training loop, the particles and the export.

The loop renders, steps the parameter groups and calls the hooks around each step; the export
reads the density and albedo fields (marching cubes, vertex colours) and asks for extra files
(the Gaussians' splat PLY). The hooks default to doing nothing, so a representation implements
only what it needs. Shapes: cameras hold B views; points are [N,3] in world space.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.shading import LightConfig


class RepresentationConfig(BaseModel):
    """A representation's config section (``NAME:`` in config.yaml). Its hooks tell the run's config what it needs
    to check of a representation without naming it; the defaults fit a representation that needs nothing."""

    model_config = ConfigDict(extra="forbid")

    def render_cost(self) -> float:
        """Peak memory of a training render per pixel, relative to the NeRF at 64 samples per ray (8 KiB)."""
        return 1.0

    def device_refusal(self, device: torch.device) -> str | None:
        """Why this configuration cannot render on ``device``, in one line; None when it can."""
        return None

    def trained_light(self) -> LightConfig | None:
        """The light the colours are learned under (then the colour field is the albedo); None for radiance."""
        return None

    def regularizers(self) -> frozenset[str]:
        """The loss terms its renders return in ``RenderOutput.extras`` for the run to weight
        (``loss.lambda_<name>``, e.g. ``normal_consistency``); a weight on any other is a config error."""
        return frozenset()


class Representation(torch.nn.Module):
    """A 3D representation trained by score distillation (NeRF, Gaussians, ``Particles`` of them, the export's
    ``TexturedMesh``). Registered as ``RepresentationSpec(name, "module:Config", "module:Class", ...)``, it is built
    as ``Class(section, generator=..., noise=...)`` with its config section, a ``RepresentationConfig``.

    Args:
        section: its config section (``NAME:`` in config.yaml).
        generator: seeds its initial state (particle i gets seed + i).
        noise: the consistent-noise settings when the run uses them (``--noise consistent``), else None.

    Examples:
        >>> rep = NeRF(NeRFConfig(), generator=torch.Generator().manual_seed(0), noise=None)
        >>> optimizers = {g["name"]: torch.optim.Adam([g]) for g in rep.param_groups()}
        >>> for step in range(steps):
        ...     output = rep.render(cameras, background, generator)
        ...     loss = guidance(output.rgb, prompt, cameras, step, generator).loss
        ...     rep.before_backward(step, output)
        ...     loss.backward()
        ...     for opt in optimizers.values():
        ...         opt.step()
        ...         opt.zero_grad()
        ...     rep.after_step(step, output, optimizers)
        ...     log(rep.stats())
        >>> mesh_field, colours = rep.density(points), rep.albedo(points)  # the export
        >>> extra_files = rep.export_extras(folder)
    """

    # The export's default ``hull_margin`` (grid cells under the visual hull within which the density,
    # not the hull, places the surface): about the thickness of the density's soft surface layer.
    hull_margin: float = 3.0

    def render(self, cameras: Cameras, background: Tensor, generator: torch.Generator | None = None,
               with_normals: bool = False) -> RenderOutput:
        """B views: rgb [B,H,W,3] composited over ``background`` [3], alpha [B,H,W,1], depth [B,H,W,1]."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Adam parameter groups, each with a ``name`` and its own ``lr``."""
        raise NotImplementedError

    def density(self, points: Tensor) -> Tensor:
        """[N,3] -> [N] volume density (the export's marching-cubes field)."""
        raise NotImplementedError

    def albedo(self, points: Tensor) -> Tensor:
        """[N,3] -> [N,3] colour in [0,1] (the export's vertex colours)."""
        raise NotImplementedError

    def init_from(self, previous: Representation) -> None:
        """Starts this representation from ``previous``, the final one of the stage before (a staged run's
        ``init: previous``); raises ValueError in one line when it cannot."""
        raise ValueError(f"{type(self).__name__} cannot start from {type(previous).__name__}")

    # -- hooks around a step ------------------------------------------------------
    def before_backward(self, step: int, output: RenderOutput) -> None:
        """Called after the loss is formed, before ``backward`` (e.g. keep screen-space gradients).

        Args:
            step: the step being taken (0-based).
            output: this step's render.
        """

    def after_step(self, step: int, output: RenderOutput, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Called after the optimisers stepped (densification, occupancy-grid updates).

        Args:
            step: the step just taken.
            output: its render (with the gradients ``before_backward`` kept).
            optimizers: one per parameter group, by the group's ``name``; a hook that adds or removes
                parameters (densification) updates their state.
        """

    def stats(self) -> dict[str, float]:
        """Floats to log each step."""
        return {}

    # -- 3D-consistent noise (--noise consistent) -------------------------------------
    def refresh_noise(self, gamma: float, generator: torch.Generator) -> None:
        """Renews the noise state: n <- sqrt(1 - gamma) n + sqrt(gamma) xi."""
        raise NotImplementedError(f"{type(self).__name__} carries no consistent noise")

    def consistent_noise(self, cameras: Cameras, output: RenderOutput, shape: tuple[int, int, int]) -> Tensor:
        """[B,C,h,w] N(0,1) noise, the same for a surface point from every view."""
        raise NotImplementedError(f"{type(self).__name__} carries no consistent noise")

    # -- export ---------------------------------------------------------------------
    def export_extras(self, folder: Path) -> dict[str, Path]:
        """Writes the representation's own files into ``folder`` (e.g. splats.ply); name -> path."""
        return {}
