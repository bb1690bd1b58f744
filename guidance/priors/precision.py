"""Mixed precision at the prior's boundary: fp32 renders in, half-precision prior weights, fp32 gradients out.

The prior's weights may be float16 or bfloat16 (CUDA); the representation, the LoRA and the camera MLP
stay float32. Gradients that pass back through a float16 VAE encoder are small (an SDS gradient of
about 1e-5 per latent becomes products below float16's smallest normal, 6e-5) and flush to zero, so
the float16 part of the backward runs on a scaled gradient: times S where it enters the half-precision
graph (its fp32 output), divided by S where it leaves (the fp32 input). S is a power of two, so the
scaling itself is exact. The scale is dynamic, as ``torch.amp.GradScaler``'s: halved after a backward
that overflowed (that step's gradient is then non-finite and the loop skips the step), doubled after
``growth_interval`` finite ones, without a host sync (the scale lives on the device). bfloat16 has
float32's exponent range and float32 needs nothing: for them both boundaries are plain casts.
"""

from __future__ import annotations

import torch
from torch import Tensor

INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000


class _ScaleIn(torch.autograd.Function):
    """Forward: half -> float32. Backward: the float32 gradient times the scale, as half."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.dtype = x.dtype
        return x.float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return (grad * scale).to(ctx.dtype), None


class _ScaleOut(torch.autograd.Function):
    """Forward: float32 -> half. Backward: the half gradient divided by the scale, as float32; reports overflow."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, dtype: torch.dtype, owner: "LossScale") -> Tensor:
        ctx.save_for_backward(scale)
        ctx.owner = owner
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (scale,) = ctx.saved_tensors
        unscaled = grad.float() / scale
        ctx.owner.update(torch.isfinite(unscaled).all())
        return unscaled, None, None, None


class LossScale:
    """The dynamic gradient scale of one half-precision prior; ``enter`` and ``leave`` its graph."""

    def __init__(self, dtype: torch.dtype, device: torch.device, init_scale: float = INIT_SCALE,
                 growth_interval: int = GROWTH_INTERVAL) -> None:
        self.dtype = dtype
        self.enabled = dtype == torch.float16
        self.scale = torch.tensor(init_scale if self.enabled else 1.0, device=device)
        self.good_steps = torch.zeros((), dtype=torch.long, device=device)
        self.growth_interval = growth_interval

    def enter(self, x: Tensor) -> Tensor:
        """x float32 -> the prior's dtype; on the way back the gradient is unscaled to float32."""
        if not self.enabled or not x.requires_grad:
            return x.to(self.dtype)
        return _ScaleOut.apply(x, self.scale, self.dtype, self)

    def leave(self, y: Tensor) -> Tensor:
        """y in the prior's dtype -> float32; on the way back the gradient is scaled into the half graph."""
        if not self.enabled or not y.requires_grad:
            return y.float()
        return _ScaleIn.apply(y, self.scale)

    def update(self, finite: Tensor) -> None:
        """After a backward: halve on overflow, double after growth_interval finite ones (no host sync)."""
        self.good_steps = torch.where(finite, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = self.good_steps >= self.growth_interval
        self.scale = torch.where(finite, torch.where(grow, self.scale * 2, self.scale), self.scale / 2)
        self.good_steps = torch.where(grow, torch.zeros_like(self.good_steps), self.good_steps)

    def state_dict(self) -> dict[str, Tensor]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.scale = state["scale"].to(self.scale.device)
        self.good_steps = state["good_steps"].to(self.good_steps.device)
