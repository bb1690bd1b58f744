"""Samples of a diffusers prior of the toy world, and the toy priors' acceptance: are they the prompted class and view?

Every toy class is sampled (DDIM) at a few random cameras. A sample is classified as the
class whose ground-truth render is nearest (mean squared error) at the camera it was asked
for; for the camera-free prior, which was asked for no camera, at the nearest of all the
evaluation cameras. Its silhouette (pixels off the white background) is scored by IoU
against the ground-truth mask at the requested camera.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dream3d.run.build import build_prior
from dream3d.config import build_config
from dream3d.run.camera_sampling import CameraConfig, sample_cameras
from dream3d.guidance.priors import toy_world
from dream3d.guidance.priors.ddim import ddim_sample
from dream3d.guidance.priors.diffusers_prior import DiffusersPrior
from dream3d.guidance.prompts import VIEWS, view_index

# sampling-convention CFG (eps_u + s (eps_c - eps_u)) for the toy model, from a sweep of the shipped model
# (eval-prior --views 2): toy-unet-mv class accuracy 0.847 at 3, 0.889 at 6, 0.917 at 9 (docs/benchmarks.md)
SAMPLE_GUIDANCE_SCALE = 9.0
BACKGROUND_TOLERANCE = 0.1  # a pixel belongs to the silhouette when a channel is this far below white


def load_pixel_prior(prior: str, model: str | None) -> DiffusersPrior:
    cfg = build_config({"prompt": "sample", "prior": prior, **({"model": model} if model else {})})
    built = build_prior(cfg)
    if not isinstance(built, DiffusersPrior):
        raise ValueError(f"--prior {prior} is not a diffusers prior")
    return built


def sample_views(prior: str, model: str | None, prompt: str, n: int, elevation: float, azimuth: float | None,
                 steps: int, guidance_scale: float | None, seed: int) -> Tensor:
    """[n,3,r,r] DDIM samples at elevation and azimuth (None: n azimuths evenly around)."""
    loaded = load_pixel_prior(prior, model)
    azimuths = torch.full((n,), azimuth) if azimuth is not None else torch.arange(n) * 360.0 / n
    r = loaded.resolution
    cams = toy_world.world_cameras(torch.full((n,), elevation), azimuths.float(), r)
    scale = SAMPLE_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    return ddim_sample(loaded, [prompt] * n, cams, steps, scale, torch.Generator().manual_seed(seed))


def save_row(images: Tensor, path: Path) -> None:
    """images [n,3,h,w] in [0,1] -> one PNG row, written atomically."""
    import imageio.v3 as iio

    from dream3d.rundir.atomic import atomic_path

    row = (torch.cat(list(images), dim=-1).permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, row, extension=".png")


def silhouette(rgb: Tensor) -> Tensor:
    """[B,3,h,w] -> [B,h,w] bool: pixels visibly off the white background."""
    return (rgb < 1 - BACKGROUND_TOLERANCE).any(dim=1)


def evaluate_prior(model: str | None = None, views: int = 4, steps: int = 50,
                   guidance_scale: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Classification accuracy of toy-unet-mv (at the camera) and toy-unet (camera-free), and the
    silhouette IoU of toy-unet-mv at the requested cameras (``guidance_scale`` None: SAMPLE_GUIDANCE_SCALE)."""
    guidance_scale = SAMPLE_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    results: dict[str, Any] = {"views_per_class": views, "ddim_steps": steps, "guidance_scale": guidance_scale,
                               "seed": seed}
    classes = torch.arange(len(toy_world.CLASSES)).repeat_interleave(views)  # [N] the class asked of each sample
    prompts = [f"a {toy_world.CLASSES[c].name}" for c in classes]
    truth: Tensor | None = None
    for name in ("toy-unet-mv", "toy-unet"):
        prior = load_pixel_prior(name, model)
        cams = sample_cameras(CameraConfig(batch_size=len(classes)), prior.resolution, torch.Generator().manual_seed(seed))
        truth = toy_world.class_images(cams) if truth is None else truth  # [36, N, 3, r, r]
        images = ddim_sample(prior, prompts, cams, steps, guidance_scale, torch.Generator().manual_seed(seed))
        if prior.use_cameras:
            err = (truth - images).square().flatten(2).mean(-1)  # [36, N] at the requested camera
        else:  # [36, N] at the nearest of the N cameras
            err = torch.stack([(t.unsqueeze(1) - images).square().flatten(2).mean(-1).amin(0) for t in truth])
        correct = (err.argmin(0) == classes).tolist()
        results[name] = {"accuracy": sum(correct) / len(correct), "correct": correct}
        if prior.use_cameras:  # a camera-free sample was asked for no particular view
            gt_masks = truth[classes, torch.arange(len(classes))].lt(1 - BACKGROUND_TOLERANCE).any(1)
            ious = toy_world.mask_iou(silhouette(images), gt_masks).tolist()
            results[name] |= {"median_iou": statistics.median(ious), "mean_iou": sum(ious) / len(ious)}
    return results


def evaluate_multiview_prior(model: str | None = None, groups: int = 1, steps: int = 50,
                             guidance_scale: float | None = None, seed: int = 0) -> dict[str, Any]:
    """toy-mvdream's class accuracy, silhouette IoU and view agreement.

    Every class is sampled as ``groups`` sets of 4 views (90 degrees apart from a random start, as in
    training); each view is classified at its own camera, and a set agrees when its 4 views get one class
    (a multi-faced or drifting object does not)."""
    guidance_scale = SAMPLE_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    prior = load_pixel_prior("toy-mvdream", model)
    views = prior.num_views  # type: ignore[attr-defined]
    classes = torch.arange(len(toy_world.CLASSES)).repeat_interleave(groups * views)  # each set's views contiguous
    camera_cfg = CameraConfig(batch_size=len(classes), group_views=views)
    cams = sample_cameras(camera_cfg, prior.resolution, torch.Generator().manual_seed(seed))
    truth = toy_world.class_images(cams)  # [36, N, 3, r, r]
    prompts = [f"a {toy_world.CLASSES[c].name}" for c in classes]
    images = ddim_sample(prior, prompts, cams, steps, guidance_scale, torch.Generator().manual_seed(seed))
    predicted = (truth - images).square().flatten(2).mean(-1).argmin(0)  # [N] nearest class at the camera
    correct = (predicted == classes).tolist()
    gt_masks = truth[classes, torch.arange(len(classes))].lt(1 - BACKGROUND_TOLERANCE).any(1)
    ious = toy_world.mask_iou(silhouette(images), gt_masks).tolist()
    per_set = predicted.view(-1, views)
    agreement = (per_set == per_set[:, :1]).all(dim=1).float().mean().item()
    return {"sets_per_class": groups, "views_per_set": views, "ddim_steps": steps, "guidance_scale": guidance_scale,
            "seed": seed, "toy-mvdream": {"accuracy": sum(correct) / len(correct), "correct": correct,
                                          "median_iou": statistics.median(ious), "mean_iou": sum(ious) / len(ious),
                                          "view_agreement": agreement}}


def evaluate_sd_prior(model: str, views: int = 4, steps: int = 50, guidance_scale: float | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """A toy model in Stable Diffusion's layout (toy-sd), sampled through ``--prior sd`` as a run uses it: the
    prompt with the view suffix of each camera, no camera input.

    Each class is sampled at ``views`` cameras from elevation -10 to 90 degrees (toy-sd's training range). A
    sample's class and view are those of its nearest ground-truth render over every class and every one of the
    cameras (MSE); it is view-correct when that render's view (front, side, back, overhead) is the one its
    prompt asked for. The silhouette IoU is at the requested camera."""
    guidance_scale = SAMPLE_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    prior = load_pixel_prior("sd", model)
    classes = torch.arange(len(toy_world.CLASSES)).repeat_interleave(views)
    camera_cfg = CameraConfig(batch_size=len(classes), elevation_range=(-10.0, 90.0))
    cams = sample_cameras(camera_cfg, prior.resolution, torch.Generator().manual_seed(seed))
    truth = toy_world.class_images(cams)  # [36, N, 3, r, r]
    prompts = [f"a {toy_world.CLASSES[c].name}" for c in classes]
    images = ddim_sample(prior, prompts, cams, steps, guidance_scale, torch.Generator().manual_seed(seed),
                         view_prompts=True)
    flat = images.flatten(1)
    err = torch.stack([torch.cdist(flat, t.flatten(1)).square() for t in truth])  # [36, N samples, N cameras]
    nearest = err.permute(1, 0, 2).flatten(1).argmin(1)  # [N] class * N + camera of each sample's nearest render
    predicted, camera = nearest // len(cams), nearest % len(cams)
    asked = view_index(cams.elevation, cams.azimuth)  # [N] the view each sample's prompt named
    got = asked[camera]
    correct = (predicted == classes).tolist()
    gt_masks = truth[classes, torch.arange(len(classes))].lt(1 - BACKGROUND_TOLERANCE).any(1)
    ious = toy_world.mask_iou(silhouette(images), gt_masks).tolist()
    by_view = {name: (got[asked == v] == v).float().mean().item() for v, name in enumerate(VIEWS) if (asked == v).any()}
    return {"views_per_class": views, "ddim_steps": steps, "guidance_scale": guidance_scale, "seed": seed,
            "sd": {"accuracy": sum(correct) / len(correct), "correct": correct, "median_iou": statistics.median(ious),
                   "mean_iou": sum(ious) / len(ious), "view_accuracy": by_view}}
