"""The GPU check (``dream3d bench-gpu``) and the per-part cost of one SDS step at real size.

``sds_parts`` times one SDS step of a latent prior taken apart: text encoding, the VAE encode of
the render, the UNet's two forwards (conditional and unconditional, one batch of 2B), and the
backward through the VAE encoder into the render, each with its peak memory above what was held
before it (CUDA: the allocator's peak; CPU: the process's resident set, sampled every 5 ms).

``gpu_check`` is the one-command check of the GPU path (docs/gpu.md), in stages ordered cheapest first, with
the results rewritten (atomically) after every stage, so a check stopped by a timeout keeps what it finished:

1. environment: torch, CUDA, gsplat, nerfacc versions, free memory, bf16 support;
2. nerf_parity: CPU vs device NeRF renders on the dense path on both sides, for both encodings;
3. nerf_encodings: ms per training render of the dense grids and the hash grid on the device;
4. kernels: gsplat's and nerfacc's CUDA builds, started in two child processes at the check's start (so they
   run behind stages 1-3), each with half the cores, stopped at a cap;
5. splat_parity: the pure-PyTorch rasterizer on the CPU vs gsplat on the device (images and gradients);
6. host_waits: host waits per training step of each representation, counted by
   ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only);
7. toy_demo: a shortened toy demo of each representation (time, skipped steps, eval IoU);
8. nerf_samplers: the occupancy and dense render paths on the demo's NeRF;
9. guidance_steps: SDS (batch 1 and 4) and VSD (batch 1) training steps on ``random:sd-2.1-base`` in float16
   and bfloat16 beside the bare UNet+VAE cost, with skipped steps, peak memory and host waits per step.

A stage that cannot run is recorded as skipped with its reason; one that fails as failed with its error line,
and the check goes on. ``Sizes`` says how big each stage runs: ``FULL`` for a GPU, ``DRY`` (``--dry-run``) for
every stage on the CPU in under a minute of compute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dream3d import api
from dream3d.rundir import folder as rundir
from dream3d.rundir.atomic import write_text
from dream3d.config import build_config
from dream3d.run.device import resolve_device
from dream3d.run.loop import Trainer
from dream3d.run.camera_sampling import CameraConfig, sample_cameras
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


def splat_parity(device: torch.device, points: int = 2000, resolution: int = 128, seed: int = 0) -> dict[str, float]:
    """Max |CPU - device| of a splat render (rgb, alpha) and relative error of its parameter gradients."""
    cams = sample_cameras(CameraConfig(batch_size=2), resolution, torch.Generator().manual_seed(seed))
    background = torch.ones(3)
    results = []
    for where in (torch.device("cpu"), device):
        model = Gaussians(GaussiansConfig(num_points=points), generator=torch.Generator().manual_seed(seed)).to(where)
        out = model.render(cams.to(where), background.to(where))
        weights = torch.linspace(0, 1, out.rgb.numel(), device="cpu").view_as(out.rgb).to(where)
        (out.rgb * weights).sum().backward()
        results.append((out, {k: p.grad.cpu() for k, p in model.params.items()}))
    return _parity(results)


def nerf_parity(device: torch.device, resolution: int = 64, settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Max |CPU - device| of a NeRF render at bin centres (rgb, alpha) and relative error of the field's gradients,
    for each encoding, on the dense render path on both sides (the occupancy path is compared in ``nerf_samplers``)."""
    cams = sample_cameras(CameraConfig(batch_size=2), resolution, torch.Generator().manual_seed(0))
    row = {}
    for encoding in ("dense", "hashgrid"):
        results = []
        for where in (torch.device("cpu"), device):
            torch.manual_seed(0)  # the hash grid's table and decoder are drawn from the global generator
            model = NeRF(NeRFConfig(**{**(settings or {}), "encoding": encoding, "sampler": "dense"})).to(where)
            out = model.render(cams.to(where), torch.ones(3, device=where))
            weights = torch.linspace(0, 1, out.rgb.numel(), device="cpu").view_as(out.rgb).to(where)
            (out.rgb * weights).sum().backward()
            results.append((out, {f"param{i}": p.grad.cpu() for i, p in enumerate(model.field_parameters())}))
        row.update({f"{encoding}_{k}": v for k, v in _parity(results).items()})
    return row


def _parity(results: list) -> dict[str, float]:
    (ref, ref_grads), (dev, dev_grads) = results
    row = {f"max_abs_{k}": float((getattr(ref, k).detach() - getattr(dev, k).detach().cpu()).abs().max())
           for k in ("rgb", "alpha")}
    for key, grad in ref_grads.items():
        row[f"rel_grad_{key}"] = float((dev_grads[key] - grad).norm() / grad.norm().clamp_min(1e-30))
    return row


def toy_demo(representation: str, device: torch.device, out: Path, steps: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The toy demo (a red cube) on the device, ``steps`` long with the default schedule's proportions (the
    32 -> 64 switch at 2/3 of the run): wall and training seconds, seconds per step, skipped steps, eval IoU."""
    options = {"representation": representation, "device": str(device), "out": str(out / "toy"), "steps": steps,
               "resolution_milestones": [steps * 2 // 3], "export": {"formats": ["glb"], "video": False}, **settings}
    tick = time.perf_counter()
    result = api.generate("a red cube", **options)
    wall = time.perf_counter() - tick
    metrics = api.evaluate(result.run_dir)
    summary = result.summary
    return {"representation": representation, "steps": steps, "wall_seconds": round(wall, 2),
            "train_seconds": summary["train_seconds"], "seconds_per_step": summary["seconds_per_step"],
            "skipped_steps": summary["skipped_steps"], "iou": round(metrics["iou"], 4), "run_dir": str(result.run_dir)}


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
        renders[sampler] = out, torch.cat([p.grad.flatten() for p in model.field_parameters()])
    if len(renders) == 2:
        (dense, dense_grad), (marched, marched_grad) = renders["dense"], renders["occupancy"]
        difference = (dense.rgb - marched.rgb).detach().abs()
        row.update(max_abs_rgb=float(difference.max()), mean_abs_rgb=float(difference.mean()),
                   max_abs_alpha=float((dense.alpha - marched.alpha).detach().abs().max()),
                   grad_cosine=float(torch.nn.functional.cosine_similarity(dense_grad, marched_grad, dim=0)),
                   speedup=round(row["dense_ms_per_step"] / row["occupancy_ms_per_step"], 3))
    return row


def nerf_encodings(device: torch.device, resolution: int, steps: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Milliseconds per training render and backward (batch 1, jittered, dense render path) and the peak memory
    of each NeRF encoding on ``device``: what the default encoding per device is chosen by."""
    cams = sample_cameras(CameraConfig(), resolution, torch.Generator().manual_seed(0), device)
    background = torch.ones(3, device=device)
    row: dict[str, Any] = {}
    for encoding in ("dense", "hashgrid"):
        torch.manual_seed(0)
        model = NeRF(NeRFConfig(**{**(settings or {}), "encoding": encoding, "sampler": "dense"})).to(device)
        generator = torch.Generator().manual_seed(0)
        model.render(cams, background, generator=generator).rgb.mean().backward()  # warm-up
        with measured(device) as timing:
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                model.render(cams, background, generator=generator).rgb.mean().backward()
        row[f"{encoding}_ms_per_step"] = round(1000 * timing["seconds"] / steps, 2)
        row[f"{encoding}_peak_mb"] = timing["total_mb"]
        del model
    row["hashgrid_over_dense"] = round(row["hashgrid_ms_per_step"] / row["dense_ms_per_step"], 3)
    return row


def sync_warnings(step: Callable[[], Any], count: int) -> float:
    """Host waits per call of ``step``, averaged over ``count`` calls: the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")``, one per synchronising CUDA operation."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(count):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return len([w for w in caught if "synchroniz" in str(w.message)]) / count


def host_waits(device: torch.device, out: Path, steps: int, settings: dict[str, Any],
               representations: tuple[str, ...] = ("nerf", "gaussians")) -> dict[str, float]:
    """Host waits per training step (toy prior, SDS) of each representation, after 2 warm-up steps."""
    row = {}
    for representation in representations:
        cfg = build_config({"prompt": "a red cube", "representation": representation, "device": str(device),
                            "out": str(out / "waits"), **settings})
        trainer = Trainer(cfg, rundir.create_run_dir(cfg))
        for _ in range(2):
            trainer.train_step()
        row[representation] = sync_warnings(trainer.train_step, steps)
    return row


def guidance_steps(prior: Any, rule: str, batches: tuple[int, ...], device: torch.device, out: Path, model: str,
                   resolution: int, steps: int) -> list[dict[str, Any]]:
    """Seconds per training step (NeRF, the rule on the prior) at each batch beside the bare prior cost at that
    batch, the steps the loop skipped (non-finite), the peak memory, and on CUDA the host waits per step.

    SDS leaves the prior as it was, so one prior serves every batch; VSD attaches its LoRA to the prior's UNet,
    so ``batches`` should then be one."""
    rows = []
    for batch in batches:
        cfg = build_config({"prompt": PROMPT, "prior": "sd", "model": model, "guidance": rule, "device": str(device),
                            "resolution": resolution, "camera": {"batch_size": batch}, "out": str(out / "steps")})
        trainer = Trainer(cfg, rundir.create_run_dir(cfg), prior=prior)
        for _ in range(2):  # warm-up: kernels, allocator, LoRA optimizer state
            trainer.train_step()
        with measured(device) as step:
            for _ in range(steps):
                trainer.train_step()
        waits = sync_warnings(trainer.train_step, 1) if device.type == "cuda" else None
        bare = sds_parts(prior, batch)
        bare_seconds = sum(bare[k]["seconds"] for k in ("vae_encode", "unet_forward_x2", "vae_backward"))
        per_step = step["seconds"] / steps
        rows.append({"rule": rule, "batch": batch, "dtype": str(prior.dtype).removeprefix("torch."),
                     "step_seconds": round(per_step, 4), "bare_seconds": round(bare_seconds, 4),
                     "ratio": round(per_step / bare_seconds, 3), "peak_mb": step["total_mb"],
                     "skipped_steps": trainer.skipped_steps, "host_waits_per_step": waits})
    return rows


def _build_script(package: str) -> str:
    """A child process's script: import ``package``'s CUDA extension (built on first use), print a JSON line."""
    return ("import json, torch\n"
            "if not torch.cuda.is_available():\n"
            "    print(json.dumps({'loaded': False, 'reason': 'no CUDA device'}))\n"
            "else:\n"
            f"    from {package}.cuda._backend import _C\n"
            "    print(json.dumps({'loaded': _C is not None, 'reason': '' if _C is not None else 'the build failed'}))\n")


class KernelBuilds:
    """gsplat's and nerfacc's CUDA extensions built at once, each in a child process (a build left in the torch
    extension cache is what this process then loads), each ninja given half the cores, both stopped at
    ``cap_s`` seconds from the start."""

    PACKAGES = ("gsplat", "nerfacc")

    def __init__(self, cap_s: float) -> None:
        self.cap_s, self.start = cap_s, time.monotonic()
        env = {**os.environ, "MAX_JOBS": str(max(1, (os.cpu_count() or 2) // 2))}
        self.children = {
            name: subprocess.Popen([sys.executable, "-c", _build_script(name)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
            for name in self.PACKAGES
        }

    def join(self) -> dict[str, dict[str, Any]]:
        """Each package: loaded (bool), the reason when not, seconds since the start."""
        row = {}
        for name, child in self.children.items():
            left = max(0.0, self.cap_s - (time.monotonic() - self.start))
            try:
                stdout, stderr = child.communicate(timeout=left)
                lines = stdout.strip().splitlines()
                record = json.loads(lines[-1]) if lines else {"loaded": False, "reason": _last_line(stderr)}
            except subprocess.TimeoutExpired:
                _kill(child)
                record = {"loaded": False, "reason": f"not built within the {self.cap_s:g} s cap"}
            record["seconds"] = round(time.monotonic() - self.start, 1)
            row[name] = record
        return row


    def stop(self) -> None:
        """Kills the builds still running (a check stopped before it joined them)."""
        for child in self.children.values():
            _kill(child)


def _kill(child: subprocess.Popen) -> None:
    """Kills a build and whatever it started (ninja, nvcc), and reaps it."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.communicate()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "the build process printed nothing"


@dataclass(frozen=True)
class Sizes:
    """How big each stage of the check runs. FULL fits 8 minutes on a fresh H100-class machine; DRY runs every
    stage on the CPU in well under a minute (``--dry-run``)."""

    model: str = MODEL
    build_cap_s: float = 300.0
    parity_points: int = 2000
    parity_resolution: int = 128
    nerf_resolution: int = 64
    encoding_steps: int = 20
    waits_steps: int = 3
    demo_steps: int = 300
    sampler_steps: int = 20
    guidance_resolution: int = 64
    guidance_steps: int = 5
    batches: tuple[int, ...] = (1, 4)
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    # NeRFConfig settings of the parity and encoding stages, and run settings of the short runs (demos, host
    # waits): none at full size
    nerf_settings: tuple[tuple[str, Any], ...] = ()
    run_settings: tuple[tuple[str, Any], ...] = ()


FULL = Sizes()
DRY = Sizes(model="random:sd-tiny", build_cap_s=120.0, parity_points=200, parity_resolution=32, nerf_resolution=16,
            encoding_steps=1, waits_steps=1, demo_steps=3, sampler_steps=1, guidance_resolution=16, guidance_steps=1,
            batches=(1,), dtypes=("float32",),
            nerf_settings=(("occupancy_resolution", 16), ("num_samples", 16),
                           ("hashgrid", {"levels": 4, "log2_table_size": 12})),
            run_settings=(("resolution", [16, 16]), ("checkpoint_every", 100), ("preview_every", 100),
                          ("export", {"formats": ["ply"], "video": False, "mesh_resolution": 32})))
# the stages in the order they run, cheapest first (the kernel builds run behind the first ones)
STAGES = ("environment", "nerf_parity", "nerf_encodings", "kernels", "splat_parity", "host_waits", "toy_demo",
          "nerf_samplers", "guidance_steps")


class Skip(Exception):
    """A stage that cannot run here; the message (one line) is recorded as the reason."""


def gpu_check(out: Path, device: str = "cuda", sizes: Sizes = FULL,
              on_stage: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs every stage on ``device``; after each, rewrites out/gpu-check.json and out/gpu-check.md (atomically),
    so a check stopped at any point leaves the stages it finished. A stage that cannot run is recorded as skipped
    with its reason, one that fails as failed with its error line, and the check goes on. ``on_stage(name,
    results)`` is called after each stage's files are written."""
    where = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(sizes.run_settings)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
                               "torch": torch.__version__, "model": sizes.model, "sizes": asdict(sizes), "stages": {}}
    builds = KernelBuilds(sizes.build_cap_s)

    def guidance() -> list[dict[str, Any]]:
        return _guidance_rows(where, out, sizes)

    def unbuilt(package: str) -> str:
        """Why ``package``'s CUDA extension is missing on the device ("" when it loaded or is not needed). A stage
        that would use a missing one is skipped: importing it here would start the build again, uncapped."""
        kernels = results.get("kernels")
        if where.type != "cuda" or (isinstance(kernels, dict) and kernels[package]["loaded"]):
            return ""
        return f"{package}'s CUDA extension: " + (kernels[package]["reason"] if isinstance(kernels, dict) else "not built")

    def runnable() -> tuple[str, ...]:
        return ("nerf",) if unbuilt("gsplat") else ("nerf", "gaussians")

    def nerf_runs() -> dict[str, Any]:
        return {**settings, "nerf": {"sampler": "dense"}} if unbuilt("nerfacc") else settings

    def demos() -> list[dict[str, Any]]:
        return [toy_demo(r, where, out, sizes.demo_steps, nerf_runs()) for r in runnable()]

    def kernels() -> dict[str, Any]:
        row = builds.join()
        if where.type != "cuda":
            raise Skip(f"no CUDA device (the builds answered: {row['gsplat']['reason']})")
        return row

    def splats() -> dict[str, float]:
        if unbuilt("gsplat"):
            raise Skip(unbuilt("gsplat"))
        return splat_parity(where, sizes.parity_points, sizes.parity_resolution)

    def samplers() -> dict[str, Any]:
        if unbuilt("nerfacc"):
            raise Skip(unbuilt("nerfacc"))
        if not isinstance(results.get("toy_demo"), list):
            raise Skip("the toy demo did not run")
        return nerf_samplers(Path(results["toy_demo"][0]["run_dir"]), where, sizes.sampler_steps)

    def waits() -> dict[str, float]:
        if where.type != "cuda":
            raise Skip("no CUDA device: torch.cuda.set_sync_debug_mode counts CUDA synchronisations only")
        return host_waits(where, out, sizes.waits_steps, nerf_runs(), runnable())

    stages: dict[str, Callable[[], Any]] = {
        "environment": lambda: _environment(where),
        "nerf_parity": lambda: nerf_parity(where, sizes.nerf_resolution, dict(sizes.nerf_settings)),
        "nerf_encodings": lambda: nerf_encodings(where, sizes.nerf_resolution, sizes.encoding_steps,
                                                 dict(sizes.nerf_settings)),
        "kernels": kernels,
        "splat_parity": splats,
        "host_waits": waits,
        "toy_demo": demos,
        "nerf_samplers": samplers,
        "guidance_steps": guidance,
    }
    try:
        for name in STAGES:
            _run_stage(name, stages[name], results)
            _write(out, results)
            if on_stage is not None:
                on_stage(name, results)
    finally:
        builds.stop()
    return results


def _run_stage(name: str, stage: Callable[[], Any], results: dict[str, Any]) -> None:
    """Runs one stage into ``results[name]`` and records its status, seconds and reason in ``results["stages"]``."""
    tick = time.perf_counter()
    try:
        results[name] = stage()
        status, reason = "done", ""
    except Skip as e:
        status, reason = "skipped", str(e)
    except Exception as e:  # a GPU check reports every failure and goes on to the next stage
        status, reason = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    results["stages"][name] = {"status": status, "seconds": round(time.perf_counter() - tick, 2), "reason": reason}


def _write(out: Path, results: dict[str, Any]) -> None:
    write_text(out / "gpu-check.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "gpu-check.md", markdown(results))


def _environment(device: torch.device) -> dict[str, Any]:
    import gsplat
    import nerfacc

    row = {"torch_cuda": torch.version.cuda, "gsplat": gsplat.__version__, "nerfacc": nerfacc.__version__,
           "cpus": os.cpu_count()}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        row.update(free_mb=round(free / 2**20), total_mb=round(total / 2**20),
                   bf16=torch.cuda.is_bf16_supported(), capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return row


def _guidance_rows(device: torch.device, out: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Per dtype, SDS at every batch on one fresh prior and VSD at the first batch on another: two fresh priors a
    dtype (VSD's LoRA attaches to the UNet it trains)."""
    from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
    from dream3d.guidance.priors.sd import StableDiffusionPrior
    from dream3d.guidance.prompts import PromptConfig

    rows = []
    for dtype in sizes.dtypes:
        for rule, batches in (("sds", sizes.batches), ("vsd", sizes.batches[:1])):
            prior = StableDiffusionPrior(sizes.model, DiffusersConfig(device=str(device), dtype=dtype), PromptConfig())
            rows += guidance_steps(prior, rule, batches, device, out, sizes.model, sizes.guidance_resolution,
                                   sizes.guidance_steps)
            del prior
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The check's results as markdown tables: every stage's status, then the figures of the stages that ran."""
    lines = [f"# GPU check: {results['device']} (torch {results['torch']}, {results['model']})", "",
             "| stage | status | seconds | reason |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']} | {r['reason']} |" for name, r in results["stages"].items()]
    for part in ("environment", "nerf_parity", "nerf_encodings", "splat_parity", "host_waits", "nerf_samplers"):
        if isinstance(results.get(part), dict):
            lines += ["", f"| {part} | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in results[part].items()]
    if isinstance(results.get("toy_demo"), list):
        lines += ["", "| toy demo | steps | wall s | train s | s/step | skipped | IoU |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['representation']} | {r['steps']} | {r['wall_seconds']} | {r['train_seconds']} | "
                  f"{r['seconds_per_step']} | {r['skipped_steps']} | {r['iou']} |" for r in results["toy_demo"]]
    if isinstance(results.get("guidance_steps"), list):
        lines += ["", "| rule | batch | dtype | step s | bare UNet+VAE s | ratio | peak MiB | skipped | host waits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['rule']} | {r['batch']} | {r['dtype']} | {r['step_seconds']} | {r['bare_seconds']} | "
                  f"{r['ratio']} | {r['peak_mb']} | {r['skipped_steps']} | {_cell(r['host_waits_per_step'])} |"
                  for r in results["guidance_steps"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def parts_table(parts: dict[str, dict[str, float]]) -> str:
    lines = ["| part | seconds | peak MiB above start | process MiB at peak |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['seconds']} | {r['peak_mb']} | {r['total_mb']} |" for name, r in parts.items()]
    return "\n".join(lines) + "\n"
