"""Mixed precision at a half-precision network's boundary: fp32 in, half-precision weights, fp32 gradients out.

The prior's weights may be float16 or bfloat16 (CUDA); the representation, the LoRA and the camera MLP
stay float32. Two backwards pass through the half-precision prior: the SDS-family gradient through the
VAE encoder into the render (``enter`` at the render, ``leave`` at the latents), and VSD/ESD's LoRA loss
through the UNet into the LoRA (``leave`` at the UNet's output; the LoRA's float32 gradients are unscaled
by ``unscale_``). Their gradients are small (an SDS gradient of about 1e-6 per latent late in a run; the
LoRA's mean-squared error about 1e-4 per element at batch 1, smaller once multiplied by the layers'
weights) and flush to zero in float16, so the float16 part of each backward runs on a scaled gradient:
times S where it enters the half-precision graph, divided by S where it leaves. S is a power of two,
so the scaling itself is exact.

S is the smaller of two powers of two, both on the device (no host sync):

- the dynamic scale, as ``torch.amp.GradScaler``'s: halved after a backward that overflowed (that step
  is then skipped by its optimizer and counted), doubled after ``growth_interval`` finite ones. It starts
  at 2^24 rather than GradScaler's 2^16: the cap below already keeps the entering gradient from
  overflowing, and a LoRA gradient of 1e-9 per element (tests/test_precision.py) needs more than 2^16;
- the headroom cap, the largest power of two that keeps the entering gradient's largest element at or
  below ``HEADROOM`` (2^10, 64x under float16's largest value, 65504). A fixed initial scale fits only
  one gradient size: 2^16 overflows at once when SDS's CFG of 100 makes latent gradients of 10-100,
  and a small one flushes the late, small gradients. The cap takes the first backward's own size, so
  the first steps at CFG 100 do not overflow and are not skipped, while small gradients get the full
  dynamic scale.

bfloat16 has float32's exponent range and float32 needs nothing: for them both boundaries are plain casts.
"""

from __future__ import annotations

import torch
from torch import Tensor

INIT_SCALE = 2.0**24
GROWTH_INTERVAL = 2000
# the entering gradient's largest element after scaling: 64x headroom under float16's 65504 for the layers'
# backward to grow it
HEADROOM = 2.0**10


class Backward:
    """The scale one backward through the half-precision graph used ([] float32 on the device, set when the
    gradient enters the graph; the dynamic scale until then)."""

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale


def capped(scale: Tensor, grad: Tensor) -> Tensor:
    """min(scale, the largest power of two putting max|grad| at or under HEADROOM); ``scale`` if grad is all zero."""
    amax = grad.detach().abs().amax().float()
    return torch.minimum(scale, torch.exp2(torch.floor(torch.log2(HEADROOM / amax))))


class _ScaleIn(torch.autograd.Function):
    """Forward: half -> float32. Backward: the float32 gradient times the (capped) scale, as half."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, record: Backward) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.dtype = x.dtype
        ctx.record = record
        return x.float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (scale,) = ctx.saved_tensors
        ctx.record.scale = capped(scale, grad)
        return (grad * ctx.record.scale).to(ctx.dtype), None, None


class _ScaleOut(torch.autograd.Function):
    """Forward: float32 -> half. Backward: the half gradient divided by the scale, as float32; reports overflow."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype, record: Backward, owner: "LossScale") -> Tensor:
        ctx.record = record
        ctx.owner = owner
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        unscaled = grad.float() / ctx.record.scale
        ctx.owner.update(torch.isfinite(unscaled).all())
        return unscaled, None, None, None


class LossScale:
    """The dynamic gradient scale of one half-precision network; ``enter`` and ``leave`` its graph.

    ``enter`` then ``leave`` (the VAE path) share one ``Backward`` record; ``leave`` alone (the LoRA path) makes
    its own, which ``last`` holds until the next call, for ``unscale_`` after the backward."""

    def __init__(self, dtype: torch.dtype, device: torch.device, init_scale: float = INIT_SCALE,
                 growth_interval: int = GROWTH_INTERVAL) -> None:
        self.dtype = dtype
        self.enabled = dtype == torch.float16
        self.scale = torch.tensor(init_scale if self.enabled else 1.0, device=device)
        self.good_steps = torch.zeros((), dtype=torch.long, device=device)
        self.growth_interval = growth_interval
        self._pending: Backward | None = None
        self.last = Backward(self.scale)

    def enter(self, x: Tensor) -> Tensor:
        """x float32 -> the network's dtype; on the way back the gradient is unscaled to float32."""
        if not self.enabled or not x.requires_grad:
            return x.to(self.dtype)
        self._pending = Backward(self.scale)
        return _ScaleOut.apply(x, self.dtype, self._pending, self)

    def leave(self, y: Tensor) -> Tensor:
        """y in the network's dtype -> float32; on the way back the gradient is scaled into the half graph."""
        if not self.enabled or not y.requires_grad:
            return y.float()
        record, self._pending = self._pending or Backward(self.scale), None
        self.last = record
        return _ScaleIn.apply(y, self.scale, record)

    def unscale_(self, grads: list[Tensor], found_inf: Tensor) -> None:
        """Divides float32 leaf gradients, scaled by the last ``leave``'s backward, by its scale in place; sets
        ``found_inf`` ([1] float32, 0 or 1) where any is NaN/Inf, and updates the scale from it."""
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, (1 / self.last.scale).reshape(1))
        if self.enabled:
            self.update(found_inf[0] == 0)

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
