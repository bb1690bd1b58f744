"""A NeRF for score distillation on any CPU: a feature encoding + nerfacc volume rendering.

Two encodings of the field (``NeRFConfig.encoding``); either gives 4 raw channels, channel 0 raw density,
channels 1-3 raw colour:

- dense (the default): a sum of dense feature grids at a few resolutions (16^3, 32^3, 64^3), trilinearly
  interpolated, 4 channels each and no network. At the sizes a 64x64 render needs a dense grid has no
  collisions and costs one ``grid_sample`` per level, and its coarse levels keep early SDS updates smooth.
- hashgrid: Instant-NGP's multi-resolution hash encoding (``representations/hashgrid.py``, threestudio's
  defaults: 16 levels x 2 features, a 2^19 table, 16 to 4096 cells a side) and a small MLP decoder
  (32 -> 64 -> 4, ReLU), as threestudio's ``implicit-volume`` geometry: detail beyond 64^3 for real priors
  at larger renders. Which is the default where is measured in docs/benchmarks.md ("Hash grid beside the
  dense grids").

The colour is rendered as it is (radiance, view-independent) or, with ``shading="lambert"``, as albedo lit by
one directional light at the density's normals (``representations/shading.py``). A density blob at the
origin (Magic3D's ``blob_magic3d``) is added to the raw density so the first renders are an object, not fog.

Two render paths (``NeRFConfig.sampler``), both skipping empty space with one occupancy grid
(cells whose density, dilated by a cell, is above a small threshold), refreshed every few steps
from the density field; the grid is a buffer, so it is checkpointed:

- dense: nerfacc's batched (``[rays, samples]``) functions, which run on any device with autograd.
  ``num_samples`` samples are stratified between the ray's entry into and exit from the bounding
  cube; samples in empty cells get density 0 without evaluating the field.
- occupancy: nerfacc's ``OccGridEstimator`` marches each ray through the grid's occupied cells only
  (CUDA kernels), in steps of 2 bound / ``num_samples``, and stops once the ray is opaque; the
  packed samples are volume-rendered with nerfacc's packed functions. CUDA only.

``auto`` (the default) is the occupancy path where nerfacc's CUDA extension loads, dense elsewhere.

With a ``NoiseFieldConfig`` the NeRF also carries 3D-consistent noise (``consistent_noise``):
a fixed [C,R,R,R] N(0,1) voxel grid over the cube and a fixed 2D background map, both buffers.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from nerfacc import OccGridEstimator, accumulate_along_rays, render_weight_from_density
from pydantic import ConfigDict
from torch import Tensor

from dream3d.representations.base import Representation, RepresentationConfig
from dream3d.representations.cameras import Cameras, RenderOutput, ray_aabb, to_device
from dream3d.representations.hashgrid import HashEncoding, HashGridConfig
from dream3d.representations.kernels import cuda_extension_loads
from dream3d.representations.noise import NoiseFieldConfig, background, check_shape, refreshed
from dream3d.representations.shading import LightConfig, Shading, lambert

# a prior-input pixel whose (resized) opacity is below this takes the background noise
SURFACE_ALPHA = 0.5
# nerfacc's default: the occupancy path stops marching a ray once its transmittance is below this
EARLY_STOP_EPS = 1e-4
Sampler = Literal["auto", "dense", "occupancy"]
Encoding = Literal["dense", "hashgrid"]
# the hash grid's normals by central differences over 1/128 of the cube: at its finest levels' spacing
# (1/4096) the differences would be dominated by hash collisions
HASHGRID_NORMAL_CELLS = 128


class SamplerError(ValueError):
    """The requested render path cannot run on the rays' device; the message is one line."""


@cache
def nerfacc_cuda() -> bool:
    """Whether nerfacc's CUDA extension loads here (prebuilt, or built on first use where nvcc is found); probed once."""
    return cuda_extension_loads("nerfacc")


def occupancy_unavailable(device: torch.device) -> str:
    """The one-line reason the occupancy path cannot run on ``device``."""
    why = "did not load" if device.type == "cuda" else f"do not run on the {device.type.upper()}"
    return (f"nerf.sampler occupancy marches rays with nerfacc's CUDA kernels, which {why}; "
            f"use nerf.sampler=dense or auto")


def resolve_sampler(choice: Sampler, device: torch.device) -> Literal["dense", "occupancy"]:
    """The render path for rays on ``device``; auto: occupancy where nerfacc's CUDA ray marching runs."""
    if choice == "dense":  # without probing nerfacc, whose first import on a GPU may build its extension
        return "dense"
    marching = device.type == "cuda" and nerfacc_cuda()
    if choice == "occupancy" and not marching:
        raise SamplerError(occupancy_unavailable(device))
    return "occupancy" if choice == "occupancy" or (choice == "auto" and marching) else "dense"


class NeRFConfig(RepresentationConfig):
    model_config = ConfigDict(extra="forbid")

    bound: float = 1.0  # the scene is the cube [-bound, bound]^3
    encoding: Encoding = "dense"  # the field's encoding: dense grids (grid_resolutions, lr) or a hash grid
    grid_resolutions: list[int] = [16, 32, 64]
    num_samples: int = 64  # per ray, across the cube
    blob_density: float = 10.0
    blob_radius: float = 0.5
    lr: float = 0.1  # the dense grids'
    hashgrid: HashGridConfig = HashGridConfig()
    hashgrid_lr: float = 0.01  # the hash table's (threestudio's encoding lr)
    decoder_width: int = 64  # the hash grid's MLP: 1 hidden layer of this width (threestudio's 64)
    decoder_lr: float = 0.001  # the MLP's (threestudio's)
    ray_chunk: int = 8192  # rays evaluated at once; bounds memory at large renders
    occupancy_resolution: int = 64
    occupancy_threshold: float = 0.01  # density below which a cell counts as empty (alpha < 1e-3 per sample)
    occupancy_every: int = 16  # steps between refreshes
    sampler: Sampler = "auto"  # render path: dense (any device), occupancy (nerfacc's CUDA ray marching), auto
    # "lambert": the colour field is albedo, rendered lit by ``light`` (representations/shading.py); "none": radiance
    shading: Shading = "none"
    light: LightConfig = LightConfig()

    def render_cost(self) -> float:
        return self.num_samples / 64

    def device_refusal(self, device: torch.device) -> str | None:
        return occupancy_unavailable(device) if self.sampler == "occupancy" and device.type != "cuda" else None

    def trained_light(self) -> LightConfig | None:
        return self.light if self.shading == "lambert" else None


class NeRF(Representation):
    """Density and colour fields over the cube [-bound, bound]^3 rendered by volume rendering."""

    def __init__(self, cfg: NeRFConfig, noise: NoiseFieldConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        """``noise``: carry consistent-noise state, drawn from ``generator`` (seed 0 if None)."""
        super().__init__()
        self.cfg = cfg
        self.noise_cfg = noise
        if noise is not None:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            r, s = noise.grid_resolution, noise.background_resolution
            self.register_buffer("noise_grid", torch.randn(noise.channels, r, r, r, generator=generator))
            self.register_buffer("noise_background", torch.randn(noise.channels, s, s, generator=generator))
        if cfg.encoding == "dense":
            self.grids = torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(1, 4, r, r, r)) for r in cfg.grid_resolutions
            )
        else:
            self.encoding = HashEncoding(cfg.hashgrid)
            self.decoder = torch.nn.Sequential(
                torch.nn.Linear(self.encoding.output_dim, cfg.decoder_width), torch.nn.ReLU(),
                torch.nn.Linear(cfg.decoder_width, 4),
            )
            torch.nn.init.zeros_(self.decoder[-1].bias)  # the first renders are the blob in grey, as the dense grids'
        r = cfg.occupancy_resolution
        self.register_buffer("occupancy", torch.ones(r, r, r, dtype=torch.bool))
        # the occupancy path's estimators, one per device; a dict keeps them out of the module tree
        self._estimators: dict[torch.device, OccGridEstimator] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_occupied_fraction())
        self.update_occupancy()

    @torch.no_grad()
    def update_occupancy(self) -> None:
        """Marks the cells whose centre density, max-pooled over neighbours, exceeds the threshold."""
        r = self.cfg.occupancy_resolution
        axis = (torch.arange(r, dtype=torch.float32, device=self.occupancy.device) + 0.5) / r * 2 - 1
        centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3) * self.cfg.bound
        sigma = self.density(centres).view(1, 1, r, r, r)
        self.occupancy = F.max_pool3d(sigma, 3, stride=1, padding=1)[0, 0] > self.cfg.occupancy_threshold
        self._forget_occupied_fraction()

    def _forget_occupied_fraction(self) -> None:
        """The grid changed (a refresh, a checkpoint load): its occupied fraction is read again when next logged."""
        self._occupied_fraction: float | None = None

    def before_backward(self, step: int, output: RenderOutput) -> None:
        """Nothing to prepare: the NeRF needs no screen-space gradients."""

    def after_step(self, step: int, output: RenderOutput, optimizers: dict) -> None:
        """Refreshes the occupancy grid every ``occupancy_every`` steps."""
        if step % self.cfg.occupancy_every == 0:
            self.update_occupancy()

    def stats(self) -> dict[str, float]:
        """What the loop logs about the representation each step. The occupied fraction is copied from the
        device only after the grid changed, so the other steps do not wait for the device."""
        if self._occupied_fraction is None:
            self._occupied_fraction = float(self.occupancy.float().mean())
        return {"occupied_fraction": self._occupied_fraction}

    def _occupied(self, points: Tensor) -> Tensor:
        """points [N,3] -> [N] bool, whether the point's occupancy cell is occupied."""
        r = self.cfg.occupancy_resolution
        idx = ((points / self.cfg.bound + 1) / 2 * r).long().clamp(0, r - 1)
        return self.occupancy[idx[:, 0], idx[:, 1], idx[:, 2]]

    def refresh_noise(self, gamma: float, generator: torch.Generator) -> None:
        """CFD's renewal n <- sqrt(1 - gamma) n + sqrt(gamma) xi of the noise grid and background map."""
        self.noise_grid = refreshed(self.noise_grid, gamma, generator)
        self.noise_background = refreshed(self.noise_background, gamma, generator)

    @torch.no_grad()
    def consistent_noise(self, cameras: Cameras, output: RenderOutput, shape: tuple[int, int, int]) -> Tensor:
        """3D-consistent noise [B,C,h,w] for the prior input shape (C,h,w) of the B cameras rendered as ``output``.

        The render's alpha and depth [B,H,W,1] are resized to (h,w) (bilinear, antialiased; the depth,
        which is alpha-weighted, divided by the resized alpha), the surface point of each pixel is
        o + depth * d on the ray through its centre at (h,w), and its value is the noise grid's at the
        nearest voxel: exactly N(0,1) per pixel, and the same for a surface point from every view.
        Pixels with alpha below ``SURFACE_ALPHA`` take the fixed background map.

        Deviations from CFD's generator (docs/guidance-math.md#consistent-noise-and-cfd), for cost on CPU:
        a nearest-voxel lookup in one 3D grid instead of rasterising two triangles per pixel into six 2048^2 textures
        with depth peeling and averaging the covered texels; so two pixels whose surface points fall in
        one voxel share a value (CFD's pixels are independent), and a surface point near a voxel face may
        fall on either side from two views whose depths differ slightly.
        """
        check_shape(self.noise_cfg.channels, self.noise_cfg.background_resolution, shape)
        C, h, w = shape
        alpha, depth = (v.detach().permute(0, 3, 1, 2) for v in (output.alpha, output.depth))
        if alpha.shape[-2:] != (h, w):
            alpha, depth = (F.interpolate(v, size=(h, w), mode="bilinear", antialias=True) for v in (alpha, depth))
        origins, dirs = cameras.resized(w, h).rays()  # [B,h,w,3]
        points = origins + (depth / alpha.clamp_min(1e-6)).permute(0, 2, 3, 1) * dirs
        r = self.noise_cfg.grid_resolution
        idx = ((points / self.cfg.bound + 1) / 2 * r).floor().long().clamp(0, r - 1)
        surface = self.noise_grid[:C, idx[..., 0], idx[..., 1], idx[..., 2]].transpose(0, 1)  # [B,C,h,w]
        return torch.where(alpha >= SURFACE_ALPHA, surface, background(self.noise_background, len(cameras), shape))

    @torch.no_grad()
    def init_from(self, previous: Representation) -> None:
        """Starts from a NeRF of the same field (encoding and sizes): its parameters copied, the occupancy grid
        refreshed (a coarse stage's field goes on at another render size, sampling or lr)."""
        if not isinstance(previous, NeRF):
            super().init_from(previous)
        mine, theirs = dict(self.named_parameters()), dict(previous.named_parameters())
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise ValueError("a NeRF starts only from a NeRF of the same field (nerf.encoding, grid_resolutions, "
                             "hashgrid and decoder sizes)")
        for name, parameter in mine.items():
            parameter.copy_(theirs[name])
        self.update_occupancy()

    def param_groups(self) -> list[dict]:
        if self.cfg.encoding == "dense":
            return [{"params": list(self.grids.parameters()), "lr": self.cfg.lr, "name": "grids"}]
        return [{"params": [self.encoding.table], "lr": self.cfg.hashgrid_lr, "name": "encoding"},
                {"params": list(self.decoder.parameters()), "lr": self.cfg.decoder_lr, "name": "decoder"}]

    def field_parameters(self) -> list[Tensor]:
        """The parameters of the field, in a fixed order (what parity checks compare gradients of)."""
        return [p for group in self.param_groups() for p in group["params"]]

    def _raw(self, points: Tensor) -> Tensor:
        """points [N,3] -> raw field values [N,4] (density logit, colour logits)."""
        if self.cfg.encoding == "hashgrid":
            return self.decoder(self.encoding((points / self.cfg.bound + 1) / 2))
        # grid_sample's (x, y, z) index the grid's last, middle and first spatial axes
        coords = (points / self.cfg.bound).view(1, -1, 1, 1, 3)
        raw = sum(F.grid_sample(g, coords, align_corners=True, padding_mode="border") for g in self.grids)
        return raw.view(4, -1).t()

    def _density_from_raw(self, raw_density: Tensor, points: Tensor) -> Tensor:
        blob = self.cfg.blob_density * (1 - points.norm(dim=-1) / self.cfg.blob_radius)
        return F.softplus(raw_density + blob)

    def density(self, points: Tensor) -> Tensor:
        """Volume density sigma >= 0 at points [N,3] -> [N]."""
        return self._density_from_raw(self._raw(points)[:, 0], points)

    def albedo(self, points: Tensor) -> Tensor:
        """The colour field in [0,1] at points [N,3] -> [N,3]: the albedo with shading, else the radiance."""
        return torch.sigmoid(self._raw(points)[:, 1:])

    def _colour(self, raw: Tensor, normals: Tensor | None) -> Tensor:
        """The rendered colour [N,3] of samples with raw field values [N,4]: the albedo, lit when shading is on
        (``normals`` [N,3] are then the samples' outward normals)."""
        albedo = torch.sigmoid(raw[:, 1:])
        return lambert(albedo, normals, self.cfg.light) if self.cfg.shading == "lambert" else albedo

    def normals(self, points: Tensor) -> Tensor:
        """Outward unit normals -grad(sigma)/|grad(sigma)| at points [N,3] by central differences -> [N,3]."""
        cells = HASHGRID_NORMAL_CELLS if self.cfg.encoding == "hashgrid" else max(self.cfg.grid_resolutions)
        h = 2 * self.cfg.bound / cells
        offsets = torch.eye(3, device=points.device) * h
        grad = torch.stack(
            [self.density(points + o) - self.density(points - o) for o in offsets], dim=-1
        ) / (2 * h)
        return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def render(
        self,
        cameras: Cameras,
        background: Tensor,
        generator: torch.Generator | None = None,
        with_normals: bool = False,
    ) -> RenderOutput:
        """Volume-renders B cameras over a solid background [3].

        Samples are jittered (stratified) when a generator is given (training) and at
        bin centres otherwise. With ``with_normals`` the output carries per-pixel
        normals and ``extras["orient"]``, the orientation penalty (Ref-NeRF): the
        weighted mean of ReLU(n . d)^2 over samples.
        """
        origins, dirs = cameras.rays()
        B, H, W, _ = origins.shape
        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        dense = resolve_sampler(self.cfg.sampler, origins.device) == "dense"
        render_rays = self._render_rays if dense else self._march_rays
        chunks = [
            render_rays(origins[i : i + self.cfg.ray_chunk], dirs[i : i + self.cfg.ray_chunk], generator, with_normals)
            for i in range(0, origins.shape[0], self.cfg.ray_chunk)
        ]
        out = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        rgb = out["rgb"] + (1 - out["alpha"]) * background.to(out["rgb"])
        return RenderOutput(
            rgb=rgb.view(B, H, W, 3),
            alpha=out["alpha"].view(B, H, W, 1),
            depth=out["depth"].view(B, H, W, 1),
            normal=out["normal"].view(B, H, W, 3) if with_normals else None,
            extras={"orient": out["orient"].sum() / out["alpha"].sum().clamp_min(1e-8)} if with_normals else {},
        )

    def _render_rays(self, origins: Tensor, dirs: Tensor, generator: torch.Generator | None, with_normals: bool) -> dict:
        R, S = origins.shape[0], self.cfg.num_samples
        t_near, t_far, hit = ray_aabb(origins, dirs, self.cfg.bound)
        t_far = torch.where(hit, t_far, t_near)
        u = torch.arange(S + 1, dtype=origins.dtype, device=origins.device) / S
        edges = t_near[:, None] + (t_far - t_near)[:, None] * u  # [R, S+1]
        if generator is None:
            mids = (edges[:, :-1] + edges[:, 1:]) / 2
        else:
            # drawn on the generator's device (the run's checkpointed CPU generator), moved to the rays'
            jitter = to_device(torch.rand(R, S, generator=generator, device=generator.device), origins.device)
            mids = edges[:, :-1] + (edges[:, 1:] - edges[:, :-1]) * jitter
        points = origins[:, None] + dirs[:, None] * mids[..., None]  # [R, S, 3]
        flat = points.reshape(-1, 3)
        occupied = self._occupied(flat).nonzero().squeeze(-1)
        live = flat[occupied]
        raw = self._raw(live)
        live_normals = self.normals(live) if with_normals or self.cfg.shading == "lambert" else None
        sigma = torch.zeros(R * S, dtype=flat.dtype, device=flat.device).index_put((occupied,), self._density_from_raw(raw[:, 0], live))
        colour = torch.zeros(R * S, 3, dtype=flat.dtype, device=flat.device).index_put(
            (occupied,), self._colour(raw, live_normals))
        sigma, colour = sigma.view(R, S), colour.view(R, S, 3)
        weights, _, _ = render_weight_from_density(edges[:, :-1], edges[:, 1:], sigma)
        out = {
            "rgb": accumulate_along_rays(weights, colour),
            "alpha": accumulate_along_rays(weights, None),
            "depth": accumulate_along_rays(weights, mids[..., None]),
        }
        if with_normals:
            normals = torch.zeros(R * S, 3, dtype=flat.dtype, device=flat.device).index_put((occupied,), live_normals).view(R, S, 3)
            out["normal"] = accumulate_along_rays(weights, normals)
            facing = (normals * dirs[:, None]).sum(-1).clamp_min(0) ** 2
            out["orient"] = (weights * facing).sum(-1, keepdim=True)
        return out

    def _estimator(self, device: torch.device) -> OccGridEstimator:
        """nerfacc's estimator over the cube on ``device``, reading this NeRF's occupancy grid as its own.

        The grid stays the NeRF's buffer (checkpointed, refreshed by ``update_occupancy``), so the estimator
        holds no state of its own and its EMA update, which draws from the device's unsaved global
        generator, is not used: a resumed run marches the same cells."""
        if device not in self._estimators:
            b = self.cfg.bound
            self._estimators[device] = OccGridEstimator([-b, -b, -b, b, b, b], self.cfg.occupancy_resolution).to(device)
        estimator = self._estimators[device]
        estimator.binaries = self.occupancy[None]
        return estimator

    def _march_rays(self, origins: Tensor, dirs: Tensor, generator: torch.Generator | None, with_normals: bool) -> dict:
        """The occupancy path for R rays (origins, dirs [R,3]): the same outputs as ``_render_rays``.

        Steps of 2 bound / num_samples from the ray's entry into the cube (jittered by up to a step when a
        generator is given, drawn from it) through occupied cells only, until the ray leaves the cube or
        its transmittance falls below ``EARLY_STOP_EPS``; the kept samples are packed ([N], with their
        ray's index) and shaded with gradients."""
        R = origins.shape[0]
        step = 2 * self.cfg.bound / self.cfg.num_samples
        t_near, t_far, hit = ray_aabb(origins, dirs, self.cfg.bound)
        t_far = torch.where(hit, t_far, t_near)
        if generator is not None:
            t_near = t_near + step * to_device(torch.rand(R, generator=generator, device=generator.device),
                                               origins.device)

        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            mids = (t_starts + t_ends) / 2
            return self.density(origins[ray_indices] + dirs[ray_indices] * mids[:, None])

        ray_indices, t_starts, t_ends = self._estimator(origins.device).sampling(
            origins, dirs, sigma_fn=sigma_fn, t_min=t_near, t_max=t_far, render_step_size=step,
            early_stop_eps=EARLY_STOP_EPS,
        )
        mids = (t_starts + t_ends) / 2
        points = origins[ray_indices] + dirs[ray_indices] * mids[:, None]
        raw = self._raw(points)
        sigma = self._density_from_raw(raw[:, 0], points)
        weights, _, _ = render_weight_from_density(t_starts, t_ends, sigma, ray_indices=ray_indices, n_rays=R)

        def accumulate(values: Tensor | None) -> Tensor:
            return accumulate_along_rays(weights, values, ray_indices=ray_indices, n_rays=R)

        normals = self.normals(points) if with_normals or self.cfg.shading == "lambert" else None
        out = {"rgb": accumulate(self._colour(raw, normals)), "alpha": accumulate(None), "depth": accumulate(mids[:, None])}
        if with_normals:
            out["normal"] = accumulate(normals)
            out["orient"] = accumulate((normals * dirs[ray_indices]).sum(-1, keepdim=True).clamp_min(0) ** 2)
        return out
