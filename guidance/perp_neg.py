"""Perp-Neg (docs/guidance-math.md#perp-neg, threestudio's ``use_perp_neg``).

The positive prompt is interpolated between view prompts by azimuth, and the other
views act as negatives through only their component perpendicular to the positive
direction, which suppresses "front" features on side and back views (the Janus
problem) without fighting the prompt itself. The combination is in the diffusers CFG
convention: eps_hat = eps_u + omega (e_pos + sum_i w_i perp(e_i, e_pos)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dream3d.guidance.base import GuidanceError
from dream3d.guidance.diffusion import batch_of, predict_each
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.prompts import FRONT, OVERHEAD, SIDE, interpolate_views, shift_azimuth, view_index
from dream3d.representations.cameras import Cameras

# f(r) = a exp(-b r) + c: the weight of each negative as a function of the interpolation ratio
F_FS = (4.0, 0.5, -2.426)
F_SF = (4.0, 0.5, -2.426)
F_SB = (1.0, 0.5, -0.606)
F_FSB = (1.0, 0.5, 0.967)


def decay(coefficients: tuple[float, float, float], r: Tensor) -> Tensor:
    a, b, c = coefficients
    return a * torch.exp(-b * r) + c


def perp_neg_embeddings(views: Tensor, uncond: Tensor, elevation: Tensor, azimuth: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-camera prompts for Perp-Neg.

    views: [4, ...] view embeddings in ``VIEWS`` order; uncond: [...]; elevation, azimuth: [B] degrees.
    Returns pos [B, ...] (front/side or side/back interpolation, the overhead view above 60 degrees),
    negatives [B, 2, ...] and their weights [B, 2] (0 for overhead views, whose negatives are uncond).
    """
    elevation, azimuth = elevation.to(views.device), shift_azimuth(azimuth.to(views.device).float())
    shape = (-1,) + (1,) * (views.dim() - 1)
    a = azimuth.abs()
    front_half = a < 90
    r = torch.where(front_half, 1 - a / 90, 2 - a / 90)
    pos = interpolate_views(views, elevation, azimuth)
    neg_front_half = torch.stack([views[FRONT], views[SIDE]])
    neg_back_half = torch.stack([views[SIDE], views[FRONT]])
    negatives = torch.where(front_half.view((-1, 1) + shape[1:]), neg_front_half, neg_back_half)
    weights = torch.where(front_half[:, None],
                          torch.stack([-decay(F_FS, r), -decay(F_SF, 1 - r)], dim=1),
                          torch.stack([-decay(F_SB, r), -decay(F_FSB, r)], dim=1))
    overhead = view_index(elevation, azimuth) == OVERHEAD
    negatives = torch.where(overhead.view((-1, 1) + shape[1:]), uncond, negatives)
    weights = torch.where(overhead[:, None], torch.zeros_like(weights), weights)
    return pos, negatives, weights


def perpendicular_component(a: Tensor, b: Tensor) -> Tensor:
    """a - (<a, b> / max(||b||^2, 1e-6)) b per sample, over all but the batch dimension; a, b [B, ...]."""
    dot = (a * b).flatten(1).sum(-1)
    norm2 = b.flatten(1).pow(2).sum(-1).clamp_min(1e-6)
    return a - (dot / norm2).view((-1,) + (1,) * (a.dim() - 1)) * b


def perp_neg_term(e_pos: Tensor, e_negatives: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i perp(e_i, e_pos) [B, ...] for e_pos [B, ...], e_negatives [B, 2, ...] and weights [B, 2]."""
    accum = torch.zeros_like(e_pos)
    for i in range(e_negatives.shape[1]):
        accum = accum + weights[:, i].view((-1,) + (1,) * (e_pos.dim() - 1)) * perpendicular_component(
            e_negatives[:, i], e_pos)
    return accum


def perp_neg_combine(eps_pos: Tensor, eps_uncond: Tensor, eps_negatives: Tensor, weights: Tensor, omega: float
                     ) -> Tensor:
    """eps_hat [B, ...] = eps_u + omega (e_pos + sum_i w_i perp(e_i, e_pos)); eps_negatives [B, 2, ...], weights [B, 2]."""
    e_pos = eps_pos - eps_uncond
    return eps_uncond + omega * (e_pos + perp_neg_term(e_pos, eps_negatives - eps_uncond.unsqueeze(1), weights))


def perp_neg_noise(prior: Prior, x_t: Tensor, t: Tensor, embeddings: Embeddings, cameras: Cameras, omega: float,
                   rule: str) -> Tensor:
    """Perp-Neg's eps_hat [B,C,h,w] for x_t [B,C,h,w] (4 prior evaluations per item); ``rule`` names the caller in errors."""
    if embeddings.views is None:
        raise GuidanceError(f"{rule}.perp_neg needs a prior with view-dependent prompts; {prior.name} has none")
    pos, negatives, weights = perp_neg_embeddings(embeddings.views, embeddings.uncond, cameras.elevation, cameras.azimuth)
    eps_pos, eps_u, eps_n0, eps_n1 = predict_each(
        prior, x_t, t, [pos, batch_of(embeddings.uncond, len(x_t)), negatives[:, 0], negatives[:, 1]], cameras
    )
    return perp_neg_combine(eps_pos, eps_u, torch.stack([eps_n0, eps_n1], 1), weights, omega)
