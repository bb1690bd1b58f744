"""The GPU check (``dream3d bench-gpu``) and the per-part cost of one SDS step at real size.

``sds_parts`` times one SDS step of a latent prior taken apart: text encoding, the VAE encode of
the render, the UNet's two forwards (conditional and unconditional, one batch of 2B), and the
backward through the VAE encoder into the render, each with its peak memory above what was held
before it (CUDA: the allocator's peak; CPU: the process's resident set, sampled every 5 ms).

``gpu_check`` is the one-command check of the GPU path (docs/gpu.md): CPU-vs-device parity of the
splat rasterizer (gsplat on CUDA, the pure-PyTorch path on the CPU; images and gradients) and of
the NeRF render; the toy demo on the device for both representations (time, eval IoU); the NeRF's
two render paths on the demo's trained NeRF (occupancy vs dense: image parity, ms per step); SDS and
VSD training steps on ``random:sd-2.1-base`` at batch 1 and 4 in float16 and bfloat16 beside the
bare cost (2 UNet forwards + VAE encode and backward at the same batch) as a ratio; peak memory.
It writes gpu-check.json and gpu-check.md.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from dream3d import api, rundir
from dream3d.atomic import write_text
from dream3d.config import build_config
from dream3d.device import resolve_device
from dream3d.loop import Trainer
from dream3d.sampling import CameraConfig, sample_cameras
from dream3d.representations.gaussians import Gaussians, GaussiansConfig
from dream3d.representations.nerf import NeRF, NeRFConfig, SamplerError, resolve_sampler

MODEL = "random:sd-2.1-base"
PROMPT = "a corgi astronaut"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def measured(device: torch.device) -> Iterator[dict[str, float]]:
    """Fills a dict with the block's wall seconds and peak memory (MiB) above the memory held at its start."""
    record: dict[str, float] = {}
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base, peak, done = _rss(), [_rss()], threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                peak[0] = max(peak[0], _rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    tick = time.perf_counter()
    try:
        yield record
    finally:
        _sync(device)
        record["seconds"] = round(time.perf_counter() - tick, 3)
        if device.type == "cuda":
            top = torch.cuda.max_memory_allocated(device)
        else:
            done.set()
            sampler.join()
            top = max(peak[0], _rss())
        record["peak_mb"] = round((top - base) / 2**20, 1)
        record["total_mb"] = round(top / 2**20, 1)


def sds_parts(prior: Any, batch: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Time and peak memory of each part of one SDS step of a latent prior at its own resolution."""
    device, parts = prior.device, {}
    generator = torch.Generator().manual_seed(seed)
    prior.use_generator(generator)
    with measured(device) as parts["text_encoder_build"]:
        prior.text_encoder  # built (random weights) or loaded on first use
    with measured(device) as parts["text_encoding"]:
        states = prior.encode_text([PROMPT, ""]).float()
    size = prior.resolution
    rgb = torch.rand(batch, 3, size, size, generator=generator, device="cpu").to(device).requires_grad_()
    with measured(device) as parts["vae_encode"]:
        latents = prior.encode(rgb)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(device)
    abar = prior.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
    embeddings = torch.cat([states[0].expand(batch, *states[0].shape), states[1].expand(batch, *states[1].shape)])
    with measured(device) as parts["unet_forward_x2"], torch.no_grad():
        eps = prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), embeddings)
    cond, uncond = eps.chunk(2)
    grad = (1 - abar) * (cond + 99 * (cond - uncond) - noise) / batch
    with measured(device) as parts["vae_backward"]:
        (latents * grad).sum().backward()
    return parts


def splat_parity(device: torch.device, seed: int = 0) -> dict[str, float]:
    """Max |CPU - device| of a splat render (rgb, alpha) and relative error of its parameter gradients."""
    cams = sample_cameras(CameraConfig(batch_size=2), 128, torch.Generator().manual_seed(seed))
    background = torch.ones(3)
    results = []
    for where in (torch.device("cpu"), device):
        model = Gaussians(GaussiansConfig(num_points=2000), generator=torch.Generator().manual_seed(seed)).to(where)
        out = model.render(cams.to(where), background.to(where))
        weights = torch.linspace(0, 1, out.rgb.numel(), device="cpu").view_as(out.rgb).to(where)
        (out.rgb * weights).sum().backward()
        results.append((out, {k: p.grad.cpu() for k, p in model.params.items()}))
    return _parity(results)


def nerf_parity(device: torch.device) -> dict[str, float]:
    """Max |CPU - device| of a NeRF render at bin centres (rgb, alpha) and relative error of the grid gradients."""
    cams = sample_cameras(CameraConfig(batch_size=2), 64, torch.Generator().manual_seed(0))
    results = []
    for where in (torch.device("cpu"), device):
        model = NeRF(NeRFConfig()).to(where)
        out = model.render(cams.to(where), torch.ones(3, device=where))
        weights = torch.linspace(0, 1, out.rgb.numel(), device="cpu").view_as(out.rgb).to(where)
        (out.rgb * weights).sum().backward()
        results.append((out, {f"grid{i}": g.grad.cpu() for i, g in enumerate(model.grids)}))
    return _parity(results)


def _parity(results: list) -> dict[str, float]:
    (ref, ref_grads), (dev, dev_grads) = results
    row = {f"max_abs_{k}": float((getattr(ref, k).detach() - getattr(dev, k).detach().cpu()).abs().max())
           for k in ("rgb", "alpha")}
    for key, grad in ref_grads.items():
        row[f"rel_grad_{key}"] = float((dev_grads[key] - grad).norm() / grad.norm().clamp_min(1e-30))
    return row


def toy_demo(representation: str, device: torch.device, out: Path, steps: int | None) -> dict[str, Any]:
    """The default toy run (a red cube) on the device: seconds per step, training time, eval IoU."""
    options = {"representation": representation, "device": str(device), "out": str(out / "toy"),
               "export": {"formats": ["glb"], "video": False}}
    if steps is not None:
        options["steps"] = steps
    tick = time.perf_counter()
    result = api.generate("a red cube", **options)
    wall = time.perf_counter() - tick
    metrics = api.evaluate(result.run_dir)
    return {"representation": representation, "wall_seconds": round(wall, 2),
            "train_seconds": result.summary["train_seconds"], "iou": round(metrics["iou"], 4),
            "run_dir": str(result.run_dir)}


def nerf_samplers(run_dir: Path, device: torch.device, steps: int = 20) -> dict[str, Any]:
    """The NeRF's render paths on a trained NeRF (the toy demo's), on ``device``: ms per training step (a
    render of the run's training batch, jittered, and its backward) for each path, and the occupancy path's
    images and grid gradient against the dense path's (bin centres / unjittered march: max and mean |rgb|,
    max |alpha| differences, gradient cosine). Where the occupancy path cannot run, its one-line reason."""
    cfg, model = api.load_representation(run_dir)
    model = model.to(device)
    cams = sample_cameras(cfg.camera, cfg.resolution_at(cfg.steps), torch.Generator().manual_seed(0), device)
    background = torch.tensor(cfg.background, device=device)
    row: dict[str, Any] = {}
    try:
        resolve_sampler("occupancy", device)
    except SamplerError as e:
        row["occupancy"] = str(e)
    renders = {}
    for sampler in ("dense", "occupancy"):
        if sampler in row:
            continue
        model.cfg.sampler = sampler
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):  # warm-up: kernels, the allocator
            model.render(cams, background, generator=generator).rgb.mean().backward()
        with measured(device) as timing:
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                model.render(cams, background, generator=generator).rgb.mean().backward()
        row[f"{sampler}_ms_per_step"] = round(1000 * timing["seconds"] / steps, 2)
        model.zero_grad(set_to_none=True)
        out = model.render(cams, background)
        out.rgb.mean().backward()
        renders[sampler] = out, torch.cat([g.grad.flatten() for g in model.grids])
    if len(renders) == 2:
        (dense, dense_grad), (marched, marched_grad) = renders["dense"], renders["occupancy"]
        difference = (dense.rgb - marched.rgb).detach().abs()
        row.update(max_abs_rgb=float(difference.max()), mean_abs_rgb=float(difference.mean()),
                   max_abs_alpha=float((dense.alpha - marched.alpha).detach().abs().max()),
                   grad_cosine=float(torch.nn.functional.cosine_similarity(dense_grad, marched_grad, dim=0)),
                   speedup=round(row["dense_ms_per_step"] / row["occupancy_ms_per_step"], 3))
    return row


def guidance_steps(prior: Any, rule: str, batch: int, device: torch.device, out: Path, model: str,
                   steps: int = 5) -> dict[str, Any]:
    """Seconds per training step (NeRF at 64^2, the rule on the prior) beside the bare prior cost at this batch."""
    cfg = build_config({"prompt": PROMPT, "prior": "sd", "model": model, "guidance": rule, "device": str(device),
                        "resolution": 64, "camera": {"batch_size": batch}, "out": str(out / "steps")})
    trainer = Trainer(cfg, rundir.create_run_dir(cfg), prior=prior)
    for _ in range(2):  # warm-up: kernels, allocator, LoRA optimizer state
        trainer.train_step()
    with measured(device) as step:
        for _ in range(steps):
            trainer.train_step()
    bare = sds_parts(prior, batch)
    bare_seconds = sum(bare[k]["seconds"] for k in ("vae_encode", "unet_forward_x2", "vae_backward"))
    per_step = step["seconds"] / steps
    return {"rule": rule, "batch": batch, "dtype": str(prior.dtype).removeprefix("torch."),
            "step_seconds": round(per_step, 4), "bare_seconds": round(bare_seconds, 4),
            "ratio": round(per_step / bare_seconds, 3), "peak_mb": step["total_mb"]}


def gpu_check(out: Path, device: str = "cuda", model: str = MODEL, toy_steps: int | None = None,
              batches: tuple[int, ...] = (1, 4), dtypes: tuple[str, ...] = ("float16", "bfloat16")) -> dict[str, Any]:
    """Runs every check on ``device`` and writes out/gpu-check.json and out/gpu-check.md; returns the results."""
    from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
    from dream3d.guidance.priors.sd import StableDiffusionPrior
    from dream3d.guidance.prompts import PromptConfig

    where = resolve_device(device)
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "model": model}
    results["splat_parity"] = splat_parity(where)
    results["nerf_parity"] = nerf_parity(where)
    results["toy_demo"] = [toy_demo(r, where, out, toy_steps) for r in ("nerf", "gaussians")]
    results["nerf_samplers"] = nerf_samplers(Path(results["toy_demo"][0]["run_dir"]), where)
    results["guidance_steps"] = []
    for dtype in dtypes:
        for rule in ("sds", "vsd"):
            for batch in batches:
                # a fresh prior per run: VSD attaches its LoRA to the prior's UNet
                prior = StableDiffusionPrior(model, DiffusersConfig(device=str(where), dtype=dtype), PromptConfig())
                results["guidance_steps"].append(guidance_steps(prior, rule, batch, where, out, model))
                del prior
                if where.type == "cuda":
                    torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "gpu-check.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "gpu-check.md", markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """The check's results as markdown tables."""
    lines = [f"# GPU check: {results['device']} (torch {results['torch']}, {results['model']})", "",
             "| parity (CPU vs device) | value |", "|---|---|"]
    for part in ("splat_parity", "nerf_parity"):
        lines += [f"| {part} {k} | {v:.3g} |" for k, v in results[part].items()]
    lines += ["", "| toy demo | wall s | train s | IoU |", "|---|---|---|---|"]
    lines += [f"| {r['representation']} | {r['wall_seconds']} | {r['train_seconds']} | {r['iou']} |"
              for r in results["toy_demo"]]
    lines += ["", "| NeRF render paths (demo NeRF: occupancy vs dense) | value |", "|---|---|"]
    lines += [f"| {k} | {v if isinstance(v, str) else f'{v:.4g}'} |" for k, v in results["nerf_samplers"].items()]
    lines += ["", "| rule | batch | dtype | step s | bare UNet+VAE s | ratio | peak MiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['batch']} | {r['dtype']} | {r['step_seconds']} | {r['bare_seconds']} | "
              f"{r['ratio']} | {r['peak_mb']} |" for r in results["guidance_steps"]]
    return "\n".join(lines) + "\n"


def parts_table(parts: dict[str, dict[str, float]]) -> str:
    lines = ["| part | seconds | peak MiB above start | process MiB at peak |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['seconds']} | {r['peak_mb']} | {r['total_mb']} |" for name, r in parts.items()]
    return "\n".join(lines) + "\n"
