"""What every guidance rule returns, and the one surrogate-loss convention they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class GuidanceOutput:
    """loss: a scalar whose gradient w.r.t. the prior's input x is g / B (g the rule's push-gradient);
    info: floats to log (t, grad norm, auxiliary losses)."""

    loss: Tensor
    info: dict[str, float] = field(default_factory=dict)


class GuidanceError(ValueError):
    """A rule cannot run with this prior or configuration; the message is one line for the user."""


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 * ||x - sg(x - g)||^2 / B, so that d loss / d x = g / B (threestudio's convention, for every rule)."""
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum() / x.shape[0]


def clean_gradient(grad: Tensor, clip: float | None) -> Tensor:
    """nan_to_num, then an optional symmetric clamp, as every reference implementation does."""
    grad = torch.nan_to_num(grad)
    return grad if clip is None else grad.clamp(-clip, clip)
