"""Network function evaluations (NFE) of a prior: the items that go through its network.

A prior with a UNet is counted by a forward pre-hook on the UNet, so every pass counts
whoever makes it: the rule's classifier-free-guidance batch (a conditional and an
unconditional row per image: 2 items), ISM's inversion passes, and VSD/ESD's LoRA
(fake-score) passes and LoRA training pass, which run the same UNet with the adapter on.
A closed-form prior (``unet is None``) has no network; its ``predict_noise`` items are counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dream3d.guidance.priors.base import Prior


class NFECounter:
    """Counts the batch items through ``prior``'s network from construction on; ``take()`` reads and resets."""

    def __init__(self, prior: Prior) -> None:
        self.count = 0
        unet = getattr(prior, "unet", None)
        if unet is not None:
            unet.register_forward_pre_hook(self._count_unet_input, with_kwargs=True)
        else:
            prior.predict_noise = self._counting(prior.predict_noise)

    def _count_unet_input(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]  # diffusers' UNet: sample [B, C, h, w]
        self.count += sample.shape[0]

    def _counting(self, predict_noise: Any) -> Any:
        def counted(x_t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.count += x_t.shape[0]
            return predict_noise(x_t, *args, **kwargs)

        return counted

    def take(self) -> int:
        """The items counted since the last take (or construction), and a reset to zero."""
        count, self.count = self.count, 0
        return count


def mean_per_step(metrics: Path) -> float:
    """The mean ``nfe`` over the step records of a run's metrics.jsonl (0 when none logged it)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    counts = [record["nfe"] for record in records if "nfe" in record]
    return round(sum(counts) / len(counts), 2) if counts else 0.0
