"""Gaussian splatting: ``gsplat.rasterization`` on CUDA, the same math in pure PyTorch on CPU.

The CPU path reproduces gsplat 1.5's classic 3DGS rasterizer (``render_mode="RGB+ED"``,
``packed=False``, ``rasterize_mode="classic"``, pinhole cameras):

- Projection (``project``): the EWA splatting of ``gsplat.cuda._torch_impl._fully_fused_projection``:
  world -> camera with the OpenCV ``viewmats``; covariance R S S^T R^T from the normalised
  wxyz quaternion and the scales; the Jacobian of the pinhole projection evaluated at the
  mean with x/z and y/z clamped to 1.3x the half field of view (keeps J finite for Gaussians
  far outside the frustum); ``eps2d * I`` added to the 2D covariance (the low-pass filter);
  conic = its inverse. Depth is the camera-space z of the mean.
- Radius: ``ceil(extend * sqrt(cov2d[i,i]))`` per axis with ``extend = 3.33``, or, given
  opacities (as ``rasterization`` does), the opacity-aware ``min(3.33, sqrt(2 ln(255 o)))``
  of gsplat's CUDA kernel, beyond which alpha < 1/255. Gaussians with z <= near_plane,
  opacity < 1/255 or a box entirely off-screen get radius 0 and are skipped.
- Compositing (gsplat's ``RasterizeToPixels3DGSFwd.cu``): pixel centres at (x+0.5, y+0.5);
  alpha = min(0.999, o * exp(-sigma)), sigma = 0.5 d^T conic d with d = mean2d - pixel; a
  Gaussian is skipped when sigma < 0 or alpha < 1/255; front to back in camera-z order,
  T_i = prod_{j<i}(1 - alpha_j), and a pixel stops *before* the first Gaussian that would
  take T to <= 1e-4. rgb = sum w_i c_i + T * background with w_i = alpha_i T_i,
  alpha = 1 - T, depth = (sum w_i z_i) / max(alpha, 1e-10) ("ED", expected camera-z depth).

The CPU compositor evaluates (pixel, Gaussian) pairs where the pixel lies in the Gaussian's
radius box (outside it alpha < 1/255, so the result is the same as evaluating all pairs),
sorted by pixel and then depth; per-pixel transmittance is a segmented cumulative sum of
log(1 - alpha). Pixels go in chunks of whole rows, each under activation checkpointing, so
memory holds one chunk's pairs at a time in the forward and the backward pass.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Literal

import torch
from kornia.geometry.conversions import quaternion_to_rotation_matrix
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dream3d.representations.kernels import cuda_extension_loads

log = logging.getLogger(__name__)

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD: fainter contributions are skipped
ALPHA_MAX = 0.999  # gsplat clamps per-Gaussian alpha here (the original 3DGS uses 0.99)
T_MIN = 1e-4  # a pixel is done once its transmittance would fall to this
RADIUS_SIGMAS = 3.33


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances R S S^T R^T.

    Args:
        quats: [N,4] wxyz, need not be normalised. scales: [N,3] (activated, > 0).
    Returns:
        [N,3,3].
    """
    # kornia normalises and expands as gsplat does: bitwise the covariances its reference computes
    R = quaternion_to_rotation_matrix(quats)
    M = R * scales[:, None, :]
    return M @ M.transpose(-1, -2)


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
    opacities: Tensor | None = None,
) -> dict[str, Tensor]:
    """EWA projection of N Gaussians into C pinhole cameras (gsplat's ``fully_fused_projection``).

    Args:
        means [N,3], quats [N,4] (wxyz), scales [N,3]; viewmats [C,4,4] world-to-camera
        (OpenCV); Ks [C,3,3]; opacities [N] or None (None: the plain 3.33-sigma radius).
    Returns:
        dict with means2d [C,N,2] (pixels), depths [C,N] (camera z), conics [C,N,3]
        (upper triangle a, b, c of the inverse 2D covariance), radii [C,N,2] int32 (0: culled).
    """
    covars = quat_scale_to_covar(quats, scales)
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C,N,3]
    covars_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # [C,N,3,3]

    tx, ty, tz = means_c.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    jx = tz * torch.clamp(tx / tz, min=-lim_x_neg, max=lim_x_pos)
    jy = tz * torch.clamp(ty / tz, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(tz)
    J = torch.stack(
        [fx / tz, zero, -fx * jx / tz**2, zero, fy / tz, -fy * jy / tz**2], dim=-1
    ).view(*tz.shape, 2, 3)
    cov2d = J @ covars_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], dim=-1)

    det = (cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]).clamp_min(1e-10)
    conics = torch.stack(
        [cov2d[..., 1, 1] / det, -(cov2d[..., 0, 1] + cov2d[..., 1, 0]) / 2 / det, cov2d[..., 0, 0] / det], dim=-1
    )

    with torch.no_grad():
        extend = torch.full_like(tz, RADIUS_SIGMAS)
        valid = (det > 0) & (tz > near_plane)
        if opacities is not None:
            valid &= opacities[None] >= ALPHA_THRESHOLD
            opaque_extent = torch.sqrt(2 * torch.log((opacities / ALPHA_THRESHOLD).clamp_min(1.0)))
            extend = torch.minimum(extend, opaque_extent[None].expand_as(extend))
        radius = torch.ceil(extend[..., None] * torch.sqrt(torch.stack([cov2d[..., 0, 0], cov2d[..., 1, 1]], -1)))
        inside = (
            (means2d[..., 0] + radius[..., 0] > 0)
            & (means2d[..., 0] - radius[..., 0] < width)
            & (means2d[..., 1] + radius[..., 1] > 0)
            & (means2d[..., 1] - radius[..., 1] < height)
        )
        radii = torch.where((valid & inside)[..., None], radius, torch.zeros_like(radius)).int()
    return {"means2d": means2d, "depths": tz, "conics": conics, "radii": radii}


def gather(values: Tensor, ids: Tensor) -> Tensor:
    """values[ids] along dim 0, with a backward that sums repeated ids in a fixed order.

    ``values[ids]`` back-propagates through ``index_put_(accumulate=True)``, which on a multi-threaded
    CPU adds the repeats of an id in whatever order the threads reach them, so a run's gradients (and
    every step after) changed from run to run. ``index_select``'s backward is ``index_add_``, which the
    CPU sums serially in index order. (On CUDA ``index_add_`` is an atomic add; this path's ``cumsum`` and
    forward ``index_add`` are nondeterministic there anyway: docs/gpu.md#determinism.) values [N,...], ids [M]
    -> [M,...]."""
    return values.index_select(0, ids)


def composite(
    pixel_ids: Tensor, gauss_ids: Tensor, num_pixels: int, width: int,
    means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, weight_power: int = 1,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing over (pixel, Gaussian) pairs.

    Args:
        pixel_ids [M] (row-major within the chunk, non-decreasing) and gauss_ids [M]
        (ascending within each pixel, i.e. near to far): the pairs to evaluate;
        num_pixels, width: the chunk's size; means2d [K,2] (pixel coordinates relative to
        the chunk's first row), conics [K,3], opacities [K], features [K,D], depth-sorted.
    Returns:
        (sum_i w_i^weight_power features_i [num_pixels,D], final transmittance [num_pixels]).
    """
    pixels = torch.stack([pixel_ids % width, pixel_ids // width], dim=-1).to(means2d.dtype) + 0.5
    d = gather(means2d, gauss_ids) - pixels  # mean minus pixel centre, as gsplat
    a, b, c = gather(conics, gauss_ids).unbind(-1)
    sigma = 0.5 * (a * d[:, 0] ** 2 + c * d[:, 1] ** 2) + b * d[:, 0] * d[:, 1]
    alpha = (gather(opacities, gauss_ids) * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
    # first pair of each pixel's run, to turn one global cumsum into per-pixel ones
    first = torch.ones_like(pixel_ids, dtype=torch.bool)
    first[1:] = pixel_ids[1:] != pixel_ids[:-1]
    run_start = torch.cummax(torch.where(first, torch.arange(len(first), device=first.device), 0), dim=0).values

    def log_trans_before(alpha: Tensor) -> Tensor:
        # float64: the global cumsum spans every pixel, float32 would lose the per-pixel digits
        log1m = torch.log1p(-alpha.double())
        excl = torch.cumsum(log1m, dim=0) - log1m
        return excl - gather(excl, run_start)

    with torch.no_grad():
        # transmittance only falls, so "T after this pair > T_MIN" keeps exactly gsplat's visited prefix
        alive = (log_trans_before(alpha) + torch.log1p(-alpha.double())).exp() > T_MIN
    alpha = alpha * alive
    weights = alpha * log_trans_before(alpha).exp().to(alpha.dtype)
    out = torch.zeros(num_pixels, features.shape[-1], dtype=features.dtype, device=features.device)
    out = out.index_add(0, pixel_ids, weights[:, None] ** weight_power * gather(features, gauss_ids))
    log_t = torch.zeros(num_pixels, dtype=torch.float64, device=alpha.device).index_add(0, pixel_ids, torch.log1p(-alpha.double()))
    return out, log_t.exp().to(alpha.dtype)


@torch.no_grad()
def _pairs(means2d: Tensor, radii: Tensor, width: int, rows: int) -> tuple[Tensor, Tensor]:
    """(pixel, Gaussian) pairs where the pixel lies in the Gaussian's box, sorted by pixel then Gaussian.

    Args:
        means2d [K,2] relative to the chunk's first row; radii [K,2]; the chunk is rows x width.
    Returns:
        pixel_ids [M], gauss_ids [M].
    """
    lo_x = torch.floor(means2d[:, 0] - radii[:, 0]).clamp(0, width).long()
    hi_x = torch.ceil(means2d[:, 0] + radii[:, 0]).clamp(0, width).long()
    lo_y = torch.floor(means2d[:, 1] - radii[:, 1]).clamp(0, rows).long()
    hi_y = torch.ceil(means2d[:, 1] + radii[:, 1]).clamp(0, rows).long()
    box_w = hi_x - lo_x
    counts = box_w * (hi_y - lo_y)
    gauss_ids = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    local = torch.arange(len(gauss_ids), device=counts.device) - (torch.cumsum(counts, 0) - counts)[gauss_ids]
    w = box_w[gauss_ids]
    pixel_ids = (lo_y[gauss_ids] + local // w) * width + lo_x[gauss_ids] + local % w
    # stable: Gaussians are enumerated in depth order, and stay so within each pixel
    pixel_ids, order = torch.sort(pixel_ids, stable=True)
    return pixel_ids, gauss_ids[order]


def _rasterize_torch(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None,
    near_plane: float,
    eps2d: float,
    chunk: int,
    weight_power: int = 1,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    proj = project(means, quats, scales, viewmats, Ks, width, height, near_plane, eps2d, opacities)
    rows_per_chunk = max(1, chunk // width)
    images, transmittances = [], []
    for cam in range(viewmats.shape[0]):
        radii = proj["radii"][cam]
        visible = (radii > 0).all(-1).nonzero().squeeze(-1)
        ids = visible[torch.argsort(proj["depths"][cam, visible], stable=True)]
        m2d, rad = proj["means2d"][cam, ids], radii[ids]
        con, opa = proj["conics"][cam, ids], opacities[ids]
        feats = torch.cat([colors[ids], proj["depths"][cam, ids, None]], dim=-1)
        parts_f, parts_t = [], []
        for y0 in range(0, height, rows_per_chunk):
            rows = min(rows_per_chunk, height - y0)
            shift = torch.tensor([0.0, float(y0)], dtype=m2d.dtype, device=m2d.device)
            pixel_ids, gauss_ids = _pairs(m2d.detach() - shift, rad, width, rows)
            # checkpointed: only one chunk's per-pair intermediates are alive, forward and backward
            f, t = checkpoint(
                composite, pixel_ids, gauss_ids, rows * width, width, m2d - shift, con, opa, feats, weight_power,
                use_reentrant=False,
            )
            parts_f.append(f.view(rows, width, -1))
            parts_t.append(t.view(rows, width, 1))
        images.append(torch.cat(parts_f, dim=0))
        transmittances.append(torch.cat(parts_t, dim=0))
    image, trans = torch.stack(images), torch.stack(transmittances)  # [C,H,W,4], [C,H,W,1]
    rgb = image[..., :-1]
    if backgrounds is not None:
        rgb = rgb + trans * backgrounds[:, None, None, :]
    alpha = 1 - trans
    depth = image[..., -1:] / alpha.clamp_min(1e-10)
    meta = {**proj, "width": width, "height": height, "n_cameras": viewmats.shape[0], "gaussian_ids": None}
    return rgb, alpha, depth, meta


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
    chunk: int = 4096,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Renders N 3D Gaussians into C pinhole cameras, differentiably.

    Args:
        means [N,3]; quats [N,4] wxyz (normalised here); scales [N,3] and opacities [N],
        activated; colors [N,3]; viewmats [C,4,4] world-to-camera (OpenCV); Ks [C,3,3];
        backgrounds [C,3] or None (black); chunk: pixels (whole rows) the CPU path composites
        at once (the memory knob; results do not depend on it).
    Returns:
        rgb [C,H,W,3], alpha [C,H,W,1], depth [C,H,W,1] (expected camera-z depth, 0 where
        empty), meta: gsplat's ``meta`` with means2d [C,N,2] (call ``retain_grad()`` on it
        before backward for densification), radii [C,N,2], depths [C,N], conics [C,N,3],
        width, height, n_cameras.
    """
    if splat_backend(means.device) == "gsplat":
        from gsplat import rasterization

        render, alpha, meta = rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, eps2d=eps2d, backgrounds=backgrounds,
            render_mode="RGB+ED", packed=False,
        )
        return render[..., :3], alpha, render[..., 3:], meta
    return _rasterize_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        backgrounds, near_plane, eps2d, chunk,
    )


@cache
def gsplat_cuda() -> bool:
    """Whether gsplat's CUDA extension loads here; probed once.

    gsplat's PyPI wheel is pure Python: without a matching CUDA toolkit it says "gsplat will be disabled",
    leaves its extension ``None``, and its first kernel call fails on that ``None``."""
    return cuda_extension_loads("gsplat")


@cache
def _warn_fallback() -> None:
    cuda = torch.version.cuda or "its CUDA version"
    log.warning(
        "warning: gsplat's CUDA kernels did not load, so the Gaussians are splatted by dream3d's PyTorch rasterizer on "
        "the GPU (an estimated 10x or more slower per step, not yet measured on a GPU); they build on first use with a CUDA "
        "toolkit whose nvcc matches torch's CUDA %s, ninja and a C++ compiler (docs/gpu.md)", cuda,
    )


def splat_backend(device: torch.device) -> Literal["gsplat", "torch"]:
    """The rasterizer for Gaussians on ``device``: gsplat's CUDA kernels where they load, else the PyTorch path
    (with one warning per process on a CUDA device, where gsplat was the expected choice)."""
    if device.type != "cuda":
        return "torch"
    if gsplat_cuda():
        return "gsplat"
    _warn_fallback()
    return "torch"


def ray_length_per_depth(Ks: Tensor, width: int, height: int) -> Tensor:
    """Distance along the unit ray per unit of camera z at each pixel centre: [C,H,W,1]."""
    ys = torch.arange(height, dtype=Ks.dtype, device=Ks.device) + 0.5
    xs = torch.arange(width, dtype=Ks.dtype, device=Ks.device) + 0.5
    u = (xs[None, None, :] - Ks[:, 0, 2, None, None]) / Ks[:, 0, 0, None, None]
    v = (ys[None, :, None] - Ks[:, 1, 2, None, None]) / Ks[:, 1, 1, None, None]
    return torch.sqrt(u**2 + v**2 + 1).unsqueeze(-1)


__all__ = ["rasterize", "project", "composite", "quat_scale_to_covar", "ray_length_per_depth", "gsplat_cuda",
           "splat_backend"]


@torch.no_grad()
def rasterize_noise(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    noise: Tensor,
    background_noise: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
    chunk: int = 4096,
) -> Tensor:
    """3D-consistent noise (docs/guidance-math.md#consistent-noise-and-cfd): per-Gaussian values splatted so that
    each pixel stays standard normal and a Gaussian brings the same value to every view.

    pixel = (sum_i w_i n_i + T n_bg) / sqrt(sum_i w_i^2 + T^2), with w_i the compositing
    weights, T the final transmittance and n_bg the pixel's background noise: a unit-variance
    combination of independent N(0,1) values, for any weights.

    Args:
        noise: [N,D] per-Gaussian N(0,1) values; background_noise: [C,H,W,D] N(0,1).
    Returns:
        [C,H,W,D] noise images.
    """
    args = (viewmats, Ks, width, height, None, near_plane, eps2d, chunk)
    weighted, alpha, _, _ = _rasterize_torch(means, quats, scales, opacities, noise, *args)
    ones = torch.ones(len(means), 1, dtype=noise.dtype, device=noise.device)
    squares, _, _, _ = _rasterize_torch(means, quats, scales, opacities, ones, *args, weight_power=2)
    trans = 1 - alpha
    return (weighted + trans * background_noise) / torch.sqrt(squares + trans**2)
