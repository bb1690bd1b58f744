"""DDIM sampling from a diffusers prior with classifier-free guidance (the prior's own images)."""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.priors.diffusers_prior import DiffusersPrior
from representations.cameras import Cameras


@torch.no_grad()
def ddim_sample(prior: DiffusersPrior, prompts: list[str], cameras: Cameras | None = None, steps: int = 50,
                guidance_scale: float = 3.0, generator: torch.Generator | None = None) -> Tensor:
    """One image per prompt, rgb [n,3,r,r] in [0,1] (cameras: n, or None), deterministic DDIM (eta 0).

    CFG here is the sampling convention eps_u + s (eps_c - eps_u) against the prior's negative prompt.
    """
    from diffusers import DDIMScheduler

    # the prior answers epsilon whatever its model predicts (v-prediction is converted)
    scheduler = DDIMScheduler.from_config(prior.scheduler.config, prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    n = len(prompts)
    embeddings = [prior.embed(p) for p in prompts]
    states = torch.stack([e.cond for e in embeddings] + [e.uncond for e in embeddings])
    both = None if cameras is None else Cameras.cat([cameras, cameras])
    r = prior.resolution
    x = torch.randn(n, 3, r, r, generator=generator).to(prior.device)
    for t in scheduler.timesteps:
        eps = prior.predict_noise(torch.cat([x, x]), t.expand(2 * n).long(), states, both)
        cond, uncond = eps.chunk(2)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return prior.decode(x).cpu()

