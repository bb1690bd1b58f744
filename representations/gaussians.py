"""3D Gaussian splats for score distillation: parameters, initialisation, rendering, density field.

Parameters live in ``self.params``, an ``nn.ParameterDict`` with the keys gsplat's
densification strategies expect (``means``, ``scales``, ``quats``, ``opacities``,
``colors``), in the space the optimizer sees: log-scales, unnormalised wxyz quaternions,
opacity logits and colour logits. Colours are view-independent RGB through a sigmoid
(SH degree 0): the toy world's shading is view-independent, and a sigmoid keeps renders in
[0,1] without the clamp that SH-DC colours need (which zeroes gradients); PLY export
converts to SH DC (``splat_ply.rgb_to_sh_dc``).

With a ``NoiseFieldConfig`` each Gaussian also carries C fixed N(0,1) noise values (the buffer
``noise_values`` [N,C], kept the same length as the Gaussians through densification), splatted
into 3D-consistent noise images by ``consistent_noise``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, model_validator
from torch import Tensor

from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import remove, reset_opa

from dream3d.representations.base import Representation, RepresentationConfig
from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.nerf import NeRF
from dream3d.representations.noise import NoiseFieldConfig, background, check_shape, first_occurrences, refreshed
from dream3d.representations.splat_ply import read_splat_ply, rgb_to_sh_dc, write_splat_ply
from dream3d.representations.splat_raster import quat_scale_to_covar, rasterize, rasterize_noise, ray_length_per_depth


class GaussiansConfig(RepresentationConfig):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _cap(self) -> "GaussiansConfig":
        # (a PLY init larger than the cap is subsampled to it instead)
        if self.init_points is None and self.max_gaussians < self.num_points:
            raise ValueError(f"max_gaussians ({self.max_gaussians}) is below the initial count num_points ({self.num_points})")
        return self

    num_points: int = 4096  # Point-E's count (LucidDreamer, GSGEN); DreamGaussian uses 5000
    init: Literal["sphere", "box"] = "sphere"  # uniform in a ball (DreamGaussian) or cube of init_radius
    init_radius: float = 0.5
    init_opacity: float = 0.1  # DreamGaussian, LucidDreamer
    sh_degree: Literal[0] = 0  # all peers use degree 0 for text-to-3D
    init_points: str | None = None  # PLY with x y z (+ colours, or a full 3DGS splat file)
    max_gaussians: int = 12_000  # bounds the per-step cost on CPU (densification reaches ~39k uncapped)
    # learning rates (docs/architecture.md#gaussian-initialisation-and-densification): means
    # DreamGaussian's initial 1e-3 (no decay yet); scales 5e-3 (all peers, gsplat); quats 1e-3 (LucidDreamer,
    # GaussianDreamer, gsplat); opacities 5e-2 (DreamGaussian, LucidDreamer, gsplat);
    # colours 1e-2 (DreamGaussian's features; sigmoid logits move rgb at the SH-DC rate)
    lr_means: float = 1e-3
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_colors: float = 1e-2
    # densification and pruning (gsplat DefaultStrategy; its defaults scaled to our run lengths:
    # DreamGaussian/GaussianDreamer densify early only, every 100 steps)
    densify: bool = True
    refine_start: int = 100
    refine_stop: int = 400
    refine_every: int = 50
    grow_grad2d: float = 0.0002
    prune_opa: float = 0.005
    # our own opacity-reset schedule (0: off), only before refine_stop: gsplat 1.5.3's never
    # fires (`step % n == 0 & step > 0` parses as `(step % n == 0) and (0 > 0)`)
    reset_every: int = 0
    near_plane: float = 0.01
    eps2d: float = 0.3
    raster_chunk: int = 4096  # pixels composited at once on CPU (memory knob)
    # std (world units) of a Gaussian blur applied to the density field (not to renders): converged
    # splats are often thinner than a 128^3 mesh grid's spacing (0.016), and a grid that steps
    # over them misses their optical depth and puts the surface too deep (Mip-Splatting's 3D
    # filter, for the same reason). Mesh-vs-render IoU on two toy runs, filter 0 / 0.0125 / 0.02
    # / 0.03: red sphere 0.76 / 0.94 / 0.98 / -, green cube 0.54 / 0.86 / 0.96 / 0.96.
    field_filter: float = 0.02
    field_chunk: int = 2048  # points per chunk in density()/albedo(), in Morton order (about a 13^3 grid block)


def knn_scale(points: Tensor, k: int = 3, chunk: int = 4096) -> Tensor:
    """Initial isotropic scale per point: sqrt of the mean squared distance to its k nearest
    neighbours (3DGS's ``distCUDA2``). points [N,3] -> [N]."""
    if len(points) <= 1:
        return torch.full((len(points),), 0.01, dtype=points.dtype, device=points.device)
    k = min(k, len(points) - 1)
    out = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], points)
        nearest = d.topk(k + 1, dim=1, largest=False).values[:, 1:]  # column 0 is the point itself
        out.append(nearest.pow(2).mean(1).sqrt())
    return torch.cat(out).clamp_min(1e-7)


def morton_order(points: Tensor, bits: int = 10) -> Tensor:
    """A permutation [N] that sorts points [N,3] along the Z-order curve of their bounding box,
    so that runs of consecutive points fill compact cubes."""
    lo, hi = points.amin(0), points.amax(0)
    cells = ((points - lo) / (hi - lo).clamp_min(1e-12) * (2**bits - 1)).round().long()
    code = torch.zeros(len(points), dtype=torch.long, device=points.device)
    for bit in range(bits):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return code.argsort()


class Gaussians(Representation):
    """N 3D Gaussians rendered by ``splat_raster.rasterize``."""

    # Converged splats make a thinner surface layer than a NeRF's (the field's blur, field_filter 0.02, is
    # about 1.3 cells of the 128^3 grid); the NeRF's 3 cells put the mesh inside the splats' hull
    # (docs/benchmarks-history.md, "Gaussians: the 3D columns").
    hull_margin = 1.5

    def __init__(self, cfg: GaussiansConfig, generator: torch.Generator | None = None,
                 noise: NoiseFieldConfig | None = None) -> None:
        """``generator`` draws the initial points (and the noise state); ``noise``: carry consistent-noise state."""
        super().__init__()
        self.cfg = cfg
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.generator = generator  # init_from draws from it after the initial points: seeded per particle
        loaded = read_splat_ply(cfg.init_points) if cfg.init_points else {}
        if loaded:
            means = loaded["means"]
            if len(means) > cfg.max_gaussians:
                keep = torch.randperm(len(means), generator=generator)[: cfg.max_gaussians]
                loaded = {k: v[keep] for k, v in loaded.items()}
                means = loaded["means"]
        else:
            means = self._sample(cfg.num_points, generator)
        n = len(means)
        scales_log = loaded.get("scales_log", torch.log(knn_scale(means))[:, None].expand(n, 3))
        quats = loaded.get("quats", torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4))
        opacities = loaded.get("opacity_logits", torch.full((n,), math.log(cfg.init_opacity / (1 - cfg.init_opacity))))
        colors = torch.logit(loaded["colors"].clamp(0.01, 0.99)) if "colors" in loaded else torch.zeros(n, 3)
        self.strategy = DefaultStrategy(
            prune_opa=cfg.prune_opa, grow_grad2d=cfg.grow_grad2d, refine_start_iter=cfg.refine_start,
            refine_stop_iter=cfg.refine_stop, refine_every=cfg.refine_every,
            reset_every=2**62,  # disabled: ours runs in after_step (see reset_every)
        )
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.params = torch.nn.ParameterDict(
            {
                "means": torch.nn.Parameter(means.clone()),
                "scales": torch.nn.Parameter(scales_log.clone()),
                "quats": torch.nn.Parameter(quats.clone()),
                "opacities": torch.nn.Parameter(opacities.clone()),
                "colors": torch.nn.Parameter(colors.clone()),
            }
        )
        self.noise_cfg = noise
        if noise is not None:
            size = noise.background_resolution
            self.register_buffer("noise_values", torch.randn(n, noise.channels, generator=generator))
            self.register_buffer("noise_background", torch.randn(noise.channels, size, size, generator=generator))

    @torch.no_grad()
    def init_from(self, previous: Representation) -> None:
        """Starts from a NeRF's field, as GaussianDreamer starts from a point cloud: ``num_points`` of 16x as
        many uniform points in its cube, drawn without replacement with probability proportional to the opacity
        of a 1/64-cube step through them (so where the density is high), coloured by its albedo, scaled by
        their neighbours' distances (3DGS's init); densification state starts afresh."""
        if not isinstance(previous, NeRF):
            super().init_from(previous)
        device = self.params["means"].device
        bound = previous.cfg.bound
        where = next(previous.parameters()).device
        candidates = (torch.rand(16 * self.cfg.num_points, 3, generator=self.generator) * 2 - 1) * bound
        sigma = torch.cat([previous.density(chunk.to(where)).cpu() for chunk in candidates.split(self.cfg.field_chunk)])
        opacity = 1 - torch.exp(-sigma.double() * 2 * bound / 64)
        chosen = torch.multinomial(opacity.clamp_min(1e-12), self.cfg.num_points, generator=self.generator)
        means = candidates[chosen]
        colors = torch.cat([previous.albedo(chunk.to(where)).cpu() for chunk in means.split(self.cfg.field_chunk)])
        n = len(means)
        opacity_logit = math.log(self.cfg.init_opacity / (1 - self.cfg.init_opacity))
        start = {"means": means, "scales": torch.log(knn_scale(means))[:, None].expand(n, 3),
                 "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4), "opacities": torch.full((n,), opacity_logit),
                 "colors": torch.logit(colors.clamp(0.01, 0.99))}
        for key, value in start.items():
            self.params[key] = torch.nn.Parameter(value.to(device).contiguous())
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        if self.noise_cfg is not None:
            self.noise_values = torch.randn(n, self.noise_cfg.channels, generator=self.generator).to(device)

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        r = self.cfg.init_radius
        if self.cfg.init == "box":
            return (torch.rand(n, 3, generator=generator) * 2 - 1) * r
        direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)
        return direction * r * torch.rand(n, 1, generator=generator) ** (1 / 3)  # uniform in the ball

    def __len__(self) -> int:
        return self.params["means"].shape[0]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.params["scales"])

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.params["opacities"])

    @property
    def colors(self) -> Tensor:
        return torch.sigmoid(self.params["colors"])

    def stats(self) -> dict[str, float]:
        """What the loop logs about the representation each step."""
        return {"num_gaussians": len(self)}

    def param_groups(self) -> list[dict]:
        """One group per parameter, named by its key (gsplat strategies want one optimizer per key)."""
        lrs = {k: getattr(self.cfg, f"lr_{k}") for k in self.params}
        return [{"params": [p], "lr": lrs[k], "name": k} for k, p in self.params.items()]

    def save_ply(self, path: str | Path) -> None:
        """Writes the splats in the standard 3DGS PLY layout (viewers open it as is)."""
        p = {k: v.detach() for k, v in self.params.items()}
        write_splat_ply(path, p["means"], p["scales"], p["quats"], p["opacities"], rgb_to_sh_dc(self.colors.detach()))

    def export_extras(self, folder: Path) -> dict[str, Path]:
        """The splats themselves, ``splats.ply``, beside the mesh."""
        path = folder / "splats.ply"
        self.save_ply(path)
        return {"splats": path}

    def before_backward(self, step: int, output: RenderOutput) -> None:
        """Keeps the screen-space means' gradient, which densification reads."""
        if self.cfg.densify:
            self.strategy.step_pre_backward(self.params, {}, self.strategy_state, step, output.extras["meta"])

    def after_step(self, step: int, output: RenderOutput, optimizers: dict) -> None:
        """Densifies and prunes (gsplat's strategy), resets opacities, and enforces max_gaussians."""
        if not self.cfg.densify:
            return
        if self.noise_cfg is not None:
            # gsplat's clone/split/prune ops carry every tensor of the strategy state along with the Gaussians
            source = torch.arange(len(self), device=self.params["means"].device)
            self.strategy_state["noise_source"] = source
        self.strategy.step_post_backward(self.params, optimizers, self.strategy_state, step, output.extras["meta"])
        # as in 3DGS, opacities are reset only while densifying, so that they recover after
        if self.cfg.reset_every and step % self.cfg.reset_every == 0 and step < self.cfg.refine_stop:
            reset_opa(self.params, optimizers, self.strategy_state, value=self.cfg.prune_opa * 2)
        excess = len(self) - self.cfg.max_gaussians
        if excess > 0:
            drop = torch.zeros(len(self), dtype=torch.bool, device=self.params["means"].device)
            drop[self.params["opacities"].detach().argsort()[:excess]] = True
            remove(self.params, optimizers, self.strategy_state, drop)
        if self.noise_cfg is not None:
            moved = self.strategy_state.pop("noise_source")
            if moved is not source:  # only an op that cloned, split or pruned replaces it: else no wait for the device
                self._follow_noise(moved)

    def _follow_noise(self, source: Tensor) -> None:
        """Rebuilds noise_values for the Gaussians after densification; source [N'] is the index each
        came from. Pruned ones drop their values; a clone or a split's second child is new and gets a
        fresh N(0,1) draw (from the global generator, which the run checkpoints and gsplat's splits use);
        the first Gaussian from each source keeps its value."""
        values = self.noise_values[source]
        new = ~first_occurrences(source)
        values[new] = torch.randn(int(new.sum()), values.shape[1], device="cpu").to(values)
        self.noise_values = values

    def refresh_noise(self, gamma: float, generator: torch.Generator) -> None:
        """CFD's renewal n <- sqrt(1 - gamma) n + sqrt(gamma) xi of the per-Gaussian values and the background map."""
        self.noise_values = refreshed(self.noise_values, gamma, generator)
        self.noise_background = refreshed(self.noise_background, gamma, generator)

    def consistent_noise(self, cameras: Cameras, output: RenderOutput, shape: tuple[int, int, int]) -> Tensor:
        """3D-consistent noise [B,C,h,w] for the prior input shape (C,h,w): the first C per-Gaussian
        values splatted into the B cameras at (h,w) (``render_noise``, exactly N(0,1) per pixel) over
        the fixed background map. ``output`` is not needed: the splats are rasterised again at (h,w),
        so a latent pixel gets the Gaussians that cover it, as CFD's latent-grid triangles do."""
        check_shape(self.noise_cfg.channels, self.noise_cfg.background_resolution, shape)
        C, h, w = shape
        bg = background(self.noise_background, len(cameras), shape).permute(0, 2, 3, 1)
        return self.render_noise(cameras.resized(w, h), self.noise_values[:, :C], bg).permute(0, 3, 1, 2)

    def get_extra_state(self) -> dict:
        return {"strategy_state": self.strategy_state}

    def set_extra_state(self, state: dict) -> None:
        """Takes the densification state onto the parameters' device: a checkpoint is read onto the CPU, and
        gsplat's strategy adds each step's statistics into these tensors in place (``index_add_``)."""
        device = self.params["means"].device
        self.strategy_state = {
            key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in state["strategy_state"].items()
        }

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Loads a checkpoint whose Gaussian count may differ from this model's (densification)."""
        device = self.params["means"].device
        for key in self.params:
            # on this model's device: a checkpoint is read onto the CPU
            self.params[key] = torch.nn.Parameter(torch.empty_like(state_dict[f"params.{key}"], device=device))
        if self.noise_cfg is not None and "noise_values" in state_dict:
            self.noise_values = torch.empty_like(state_dict["noise_values"], device=device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def render(
        self,
        cameras: Cameras,
        background: Tensor,
        generator: torch.Generator | None = None,
        with_normals: bool = False,
    ) -> RenderOutput:
        """Splats B cameras over a solid background [3].

        ``generator`` is accepted for the representation seam (splatting is deterministic).
        Depth is the expected distance along the unit ray (gsplat's expected z-depth "ED"
        times the ray length per unit z), 0 where empty. ``extras["meta"]`` is gsplat's meta.

        Raises:
            NotImplementedError: ``with_normals`` (splats have no normal field yet).
        """
        if with_normals:
            raise NotImplementedError("Gaussians render no normals: set the orientation loss weight to 0")
        viewmats, Ks = cameras.viewmats(), cameras.intrinsics()
        rgb, alpha, depth, meta = rasterize(
            self.params["means"], self.params["quats"], self.scales, self.opacities, self.colors,
            viewmats, Ks, cameras.width, cameras.height,
            backgrounds=background.to(viewmats).expand(len(cameras), 3),
            near_plane=self.cfg.near_plane, eps2d=self.cfg.eps2d, chunk=self.cfg.raster_chunk,
        )
        depth = depth * ray_length_per_depth(Ks, cameras.width, cameras.height)
        return RenderOutput(rgb=rgb, alpha=alpha, depth=depth, extras={"meta": meta})

    def render_noise(self, cameras: Cameras, noise: Tensor, background_noise: Tensor) -> Tensor:
        """Splats per-Gaussian noise values noise [N,D] into [B,H,W,D] standard-normal images that
        agree across views (background_noise [B,H,W,D] fills what no Gaussian covers)."""
        return rasterize_noise(
            self.params["means"].detach(), self.params["quats"].detach(), self.scales.detach(),
            self.opacities.detach(), noise, background_noise, cameras.viewmats(), cameras.intrinsics(),
            cameras.width, cameras.height, self.cfg.near_plane, self.cfg.eps2d, self.cfg.raster_chunk,
        )

    def _field(self, points: Tensor, with_color: bool) -> tuple[Tensor, Tensor | None]:
        """Sum over Gaussians of sigma_i(x) [N] and, optionally, of sigma_i(x) * colour_i [N,3].

        sigma_i(x) = tau_i / (sqrt(2 pi) s_min,i) * exp(-0.5 m_i(x)^2), tau_i = -ln(1 - min(o_i, 0.95)):
        a ray through the centre of a Gaussian along its thinnest axis then accumulates optical
        depth tau_i, i.e. alpha = o_i, the same as its splat (capped at alpha 0.95, "opaque",
        for opacity >= 0.95). The field is blurred: each covariance becomes Sigma + field_filter^2 I
        (s_min included), which keeps every tau_i. Points are taken in Morton order,
        ``field_chunk`` at a time, so a chunk is a small cube of space (a grid block, or a patch
        of mesh vertices); Gaussians further than 3 sigma (largest axis) from a chunk's bounding
        box are skipped.
        """
        means = self.params["means"].detach()
        scales = (self.scales.detach().square() + self.cfg.field_filter**2).sqrt()
        opac = self.opacities.detach().clamp_max(0.95)
        peak = -torch.log1p(-opac) / (math.sqrt(2 * math.pi) * scales.amin(-1))
        precision = torch.linalg.inv(quat_scale_to_covar(self.params["quats"].detach(), scales))
        reach = 3 * scales.amax(-1)
        colors = self.colors.detach()
        order = morton_order(points)
        sigma = torch.empty(len(points), device=points.device)
        color = torch.empty(len(points), 3, device=points.device) if with_color else None
        for chunk in order.split(self.cfg.field_chunk):
            x = points[chunk]
            lo, hi = x.amin(0), x.amax(0)
            near = ((means - means.clamp(lo, hi)).norm(dim=-1) < reach).nonzero().squeeze(-1)
            d = x[:, None] - means[near]  # [P,G,3]
            m2 = (torch.einsum("pgi,gij->pgj", d, precision[near]) * d).sum(-1)
            w = peak[near] * torch.exp(-0.5 * m2)
            sigma[chunk] = w.sum(-1)
            if with_color:
                color[chunk] = w @ colors[near]
        return sigma, color

    @torch.no_grad()
    def density(self, points: Tensor) -> Tensor:
        """Volume density (per world unit) at points [N,3] -> [N]; see ``_field`` for the scale."""
        return self._field(points, with_color=False)[0]

    @torch.no_grad()
    def albedo(self, points: Tensor) -> Tensor:
        """Density-weighted mean colour at points [N,3] -> [N,3]; the nearest Gaussian's where no density reaches."""
        sigma, weighted = self._field(points, with_color=True)
        empty = sigma <= 1e-12
        out = weighted / sigma.clamp_min(1e-12)[:, None]
        if empty.any():
            nearest = torch.cdist(points[empty], self.params["means"].detach()).argmin(-1)
            out[empty] = self.colors.detach()[nearest]
        return out


__all__ = ["Gaussians", "GaussiansConfig", "knn_scale", "morton_order"]
