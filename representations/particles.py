"""N particles: independent representations optimised together under one guidance rule.

``Particles`` stands behind the same seam as a single representation, so the loop, the
checkpoint and the densification hooks need no particle-specific code: ``render`` stacks
the particles' images particle-major ([N*B, ...] for B cameras), ``param_groups`` names each
group ``p{i}.{name}``, and the hooks hand each particle its own render output and optimizers.
The particles render one after another (separate networks or splat sets do not batch);
the prior then sees all N*B images in one batch, and a stateful rule such as VSD shares
its LoRA across the particles, as ProlificDreamer does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dream3d.representations.base import Representation
from dream3d.representations.cameras import Cameras, RenderOutput


class Particles(Representation):
    """N representations made by ``build(i)``; member i is particle i."""

    def __init__(self, count: int, build: Callable[[int], Representation]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(build(i) for i in range(count))

    @property
    def count(self) -> int:
        return len(self.members)

    def render(
        self, cameras: Cameras, background: Tensor, generator: torch.Generator | None = None, with_normals: bool = False,
    ) -> RenderOutput:
        """Every particle from the same B cameras: rgb [N*B,H,W,3] etc., particle-major.

        ``extras["particles"]`` holds the members' own outputs (their densification reads them);
        ``extras["orient"]``, when rendered, is the particles' mean penalty.
        """
        outs = [m.render(cameras, background, generator=generator, with_normals=with_normals) for m in self.members]
        extras: dict = {"particles": outs}
        if with_normals:
            extras["orient"] = torch.stack([o.extras["orient"] for o in outs]).mean()
        return RenderOutput(
            rgb=torch.cat([o.rgb for o in outs]),
            alpha=torch.cat([o.alpha for o in outs]),
            depth=torch.cat([o.depth for o in outs]),
            normal=torch.cat([o.normal for o in outs]) if with_normals else None,
            extras=extras,
        )

    def param_groups(self) -> list[dict]:
        return [{**g, "name": f"p{i}.{g['name']}"} for i, m in enumerate(self.members) for g in m.param_groups()]

    def before_backward(self, step: int, output: RenderOutput) -> None:
        for member, out in zip(self.members, output.extras["particles"]):
            member.before_backward(step, out)

    def after_step(self, step: int, output: RenderOutput, optimizers: dict) -> None:
        """Each member steps with its own optimizers, keyed by its own group names (gsplat's layout)."""
        for i, (member, out) in enumerate(zip(self.members, output.extras["particles"])):
            prefix = f"p{i}."
            own = {name[len(prefix):]: opt for name, opt in optimizers.items() if name.startswith(prefix)}
            member.after_step(step, out, own)

    def stats(self) -> dict[str, float]:
        """The members' stats, averaged over the particles."""
        per_member = [m.stats() for m in self.members]
        return {k: sum(s[k] for s in per_member) / self.count for k in per_member[0]}

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        # through each member's own load_state_dict: Gaussians resize their parameters there
        for i, member in enumerate(self.members):
            prefix = f"members.{i}."
            member.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)},
                                   strict=strict, assign=assign)

    def refresh_noise(self, gamma: float, generator: torch.Generator) -> None:
        for member in self.members:
            member.refresh_noise(gamma, generator)

    def consistent_noise(self, cameras: Cameras, output: RenderOutput, shape: tuple[int, int, int]) -> Tensor:
        """Each particle's own consistent noise for the B cameras, particle-major: [N*B,C,h,w]."""
        outs = output.extras["particles"]
        return torch.cat([m.consistent_noise(cameras, out, shape) for m, out in zip(self.members, outs)])
