"""DDIM sampling from a diffusers prior with classifier-free guidance (the prior's own images)."""

from __future__ import annotations

import torch
from torch import Tensor

from dream3d.guidance.priors.diffusers_prior import DiffusersPrior
from dream3d.representations.cameras import Cameras


@torch.no_grad()
def ddim_sample(prior: DiffusersPrior, prompts: list[str], cameras: Cameras | None = None, steps: int = 50,
                guidance_scale: float = 3.0, generator: torch.Generator | None = None,
                view_prompts: bool = False) -> Tensor:
    """One image per prompt, rgb [n,3,r,r] in [0,1] (cameras: n, or None), deterministic DDIM (eta 0), in the
    prior's own space (pixels, or SD's latents decoded by its VAE).

    CFG here is the sampling convention eps_u + s (eps_c - eps_u) against the prior's negative prompt.
    ``view_prompts``: each sample is conditioned on its camera's view prompt ("..., back view"), as a run's rule
    conditions a render, instead of on the bare prompt.
    """
    from diffusers import DDIMScheduler

    # DDIM is given the clipped x0 and derives its epsilon from it: diffusers' own clip_sample clips x0 but keeps
    # the unclipped epsilon, which near t = 1000 (alpha ~ 0.03 on a cosine schedule) turned samples to noise
    scheduler = DDIMScheduler.from_config(prior.scheduler.config, prediction_type="sample", clip_sample=False)
    scheduler.set_timesteps(steps)
    n = len(prompts)
    embeddings = [prior.embed(p) for p in prompts]
    if view_prompts and cameras is not None:
        cond = [e.conditional(cameras[i : i + 1])[0] for i, e in enumerate(embeddings)]
    else:
        cond = [e.cond for e in embeddings]
    states = torch.stack(cond + [e.uncond for e in embeddings])
    both = None if cameras is None else Cameras.cat([cameras, cameras])
    x = torch.randn(n, *prior.sample_shape(), generator=generator).to(prior.device)
    for t in scheduler.timesteps:
        eps = prior.predict_noise(torch.cat([x, x]), t.expand(2 * n).long(), states, both)
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance_scale * (cond - uncond)
        abar = prior.alphas_cumprod.to(x.device)[t]
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        if prior.x0_bound is not None:
            x0 = x0.clamp(-prior.x0_bound, prior.x0_bound)
        x = scheduler.step(x0, t, x).prev_sample
    return prior.decode(x).cpu()

