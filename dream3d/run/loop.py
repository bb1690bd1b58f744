"""The optimisation loop: cameras -> render -> guidance -> regularizers -> step -> events.

It knows nothing of the CLI or the web app: progress leaves as ``Progress`` events
through a callback, and a stop request comes in through ``should_stop``. All
randomness (cameras, noise, t, ray jitter) comes from one generator whose state is
checkpointed, so a resumed run ends with the same parameters and metrics as an
uninterrupted one.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from dream3d.rundir import confine
from dream3d.rundir import folder as rundir
from dream3d.rundir.atomic import atomic_path
from dream3d.run.build import build_guidance, build_prior, build_representation
from dream3d.config import RunConfig
from dream3d.config.schema import REGULARIZERS
from dream3d.run.device import resolve_device
from dream3d.errors import UserError
from dream3d.run.nfe import NFECounter, mean_per_step
from dream3d.run.camera_sampling import orbit_cameras, sample_cameras
from dream3d.run.stop import RunInterrupted, stage  # RunInterrupted re-exported: a stop request, in the loop or from a signal
from dream3d.guidance.base import DistillationRule, NoiseSource
from dream3d.guidance.priors.base import Prior
from dream3d.guidance.repulsion import build_features, repulsion_loss
from dream3d.guidance.schedule import evaluate
from dream3d.representations.base import Representation
from dream3d.representations.cameras import Cameras, RenderOutput


class RunError(UserError, RuntimeError):
    """The run cannot go on; the message is one line and names the last good checkpoint (or says there is none)."""


@dataclass
class Progress:
    """One event of a run. kind: "step", "preview", "checkpoint", "stage" (a stage of a staged run begins),
    "refine" (the refine stage begins; its step events follow) or "done". A training event's step and total count
    over every stage; ``stage`` is the stage's name ("" for a one-stage run), ``stage_index`` of ``stages``."""

    kind: str
    step: int
    total: int
    losses: dict[str, float] = field(default_factory=dict)
    it_per_s: float = 0.0
    eta_s: float = 0.0
    preview: Path | None = None
    stage: str = ""
    stage_index: int = 0
    stages: int = 1


@dataclass(frozen=True)
class StageInfo:
    """Where a trainer's stage sits in its run: a one-stage run is stage 0 of 1, named "", in the run folder."""

    index: int = 0
    name: str = ""
    count: int = 1
    folder: str = ""  # relative to the run folder: its checkpoints/ are the stage's
    steps_before: int = 0  # training steps of the stages before it
    total: int = 0  # training steps of every stage

    @property
    def staged(self) -> bool:
        return bool(self.name)

    def where(self, step: int) -> str:
        """'step 12' or 'step 12 of stage 1 (geometry)', for a message."""
        return f"step {step}" + (f" of stage {self.index} ({self.name})" if self.staged else "")


@contextmanager
def disk_errors(run_dir: Path, retry: str = "resume") -> Iterator[None]:
    """Turns an OSError while writing a run (a full disk, a read-only folder) into one RunError line
    that names the last good checkpoint and the command to run (``dream3d <retry> RUN``) once there is room.

    Checkpoints are written atomically, so the newest one on disk is the last good one."""
    try:
        yield
    except OSError as e:
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e) or type(e).__name__
        found = rundir.checkpoint_paths(run_dir)
        if not found:
            raise RunError(f"{what}; no checkpoint of this run was written") from None
        raise RunError(
            f"{what}; the last good checkpoint is {found[-1]} (`dream3d {retry} {run_dir}` once it can be written)"
        ) from None


def sparsity_loss(alpha: Tensor) -> Tensor:
    return torch.sqrt(alpha**2 + 0.01).mean()


def opaque_loss(alpha: Tensor) -> Tensor:
    a = alpha.clamp(1e-5, 1 - 1e-5)
    return (-a * torch.log(a) - (1 - a) * torch.log(1 - a)).mean()


def to_host(values: dict[str, Tensor | float]) -> dict[str, float]:
    """The values in their order, tensors (one element each) as Python floats and the rest as they are.
    The tensors leave each device in one copy, so that a CUDA step waits for its queue once, not once per
    scalar; float64 keeps every float32 and float64 value exact."""
    by_device: dict[torch.device, list[str]] = {}
    for name, value in values.items():
        if isinstance(value, Tensor):
            by_device.setdefault(value.device, []).append(name)
    copied = {}
    for names in by_device.values():
        stacked = torch.stack([values[name].detach().reshape(()).to(torch.float64) for name in names])
        copied.update(zip(names, stacked.tolist()))
    return {name: copied.get(name, value) for name, value in values.items()}


def global_rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global generators a step draws from besides the run's: the CPU's (new Gaussians' noise values, gsplat's
    split of CPU splats) and, on CUDA, the run's GPU's (gsplat's split there), for the checkpoint."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_global_rng_state(state: dict, device: torch.device) -> None:
    """Restores what ``global_rng_state`` saved; a checkpoint without a GPU's state (a CPU run, or one written
    before it was kept) leaves the GPU's generator as seeded."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


class Trainer:
    """Holds one run's state: representation, guidance, optimizers, generator, step counters."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, prior: Prior | None = None, representation: Representation | None = None,
        guidance: DistillationRule | None = None, stage: StageInfo | None = None, run_cfg: RunConfig | None = None,
    ) -> None:
        """``cfg``: the stage's effective config; ``run_cfg``: the whole run's (``cfg`` for a one-stage run)."""
        self.cfg = cfg
        self.run_cfg = run_cfg if run_cfg is not None else cfg
        self.stage = stage if stage is not None else StageInfo(total=cfg.steps)
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        # every draw of the run (cameras, t, noise, ray jitter, the VAE posterior sample) comes from this CPU
        # generator and is moved to the device: checkpointed, and the same draws on any device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.prior = prior if prior is not None else build_prior(cfg)
        self.prior.use_generator(self.generator)
        self.prior.embed(cfg.prompt)  # a prompt the prior cannot take fails before any work
        self.nfe = NFECounter(self.prior)
        representation = representation if representation is not None else build_representation(cfg)
        self.representation = representation.to(self.device)
        guidance = guidance if guidance is not None else build_guidance(cfg, self.prior)
        self.guidance = guidance.to(self.device)
        features = build_features(cfg.repulsion) if cfg.repulsion.weight > 0 else None
        # DINO features are a module (moved to the device); pixel features a plain function
        self.features = features.to(self.device) if isinstance(features, torch.nn.Module) else features
        self.optimizers = self._build_optimizers()
        self.background = torch.tensor(cfg.background, device=self.device)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_streak = 0
        self.elapsed = 0.0

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam per parameter group, keyed by the group's name: gsplat's densification
        strategies replace parameters through exactly this layout (Adam is per-parameter, so
        this equals one Adam over all groups)."""
        optimizers = {}
        for group in self.representation.param_groups():
            group = {**group, "initial_lr": group["lr"]}
            optimizers[group["name"]] = torch.optim.Adam([group], betas=self.cfg.optim.betas, eps=self.cfg.optim.eps)
        return optimizers

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "representation": self.representation.state_dict(),
            "guidance": self.guidance.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "generator": self.generator.get_state(),
            **global_rng_state(self.device),
            "skipped_steps": self.skipped_steps,
            "nonfinite_streak": self.nonfinite_streak,
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.representation.load_state_dict(state["representation"])
        self.guidance.load_state_dict(state["guidance"])
        # the representation may have replaced its parameters (densification): rebuild, then load
        self.optimizers = self._build_optimizers()
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.generator.set_state(state["generator"])
        set_global_rng_state(state, self.device)
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.elapsed = state["elapsed"]

    def save_checkpoint(self) -> Path:
        return rundir.save_checkpoint(self.run_dir, self.state_dict(), self.step, self.cfg.keep_checkpoints,
                                      self.stage.folder)

    # -- one step ----------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the logged record. Non-finite steps are skipped, not applied."""
        cfg, step = self.cfg, self.step
        cameras = sample_cameras(cfg.camera, cfg.resolution_at(step), self.generator, self.device)
        weights = {name: evaluate(value, step) for name, value in cfg.loss.model_dump().items()}
        out = self.representation.render(
            cameras, self.background, generator=self.generator, with_normals=weights["lambda_orient"] > 0
        )
        regularizers = {name: out.extras[name] for name in REGULARIZERS if weights[f"lambda_{name}"] > 0}
        particles = cfg.particles
        guided = self.guidance(out.rgb, cfg.prompt, Cameras.cat([cameras] * particles), step, generator=self.generator,
                               noise=self._consistent_noise(cameras, out))
        terms = {"guidance": guided.loss}
        if weights["lambda_sparsity"] > 0:
            terms["sparsity"] = sparsity_loss(out.alpha)
        if weights["lambda_opaque"] > 0:
            terms["opaque"] = opaque_loss(out.alpha)
        if weights["lambda_orient"] > 0:
            terms["orient"] = out.extras["orient"]
        terms.update(regularizers)
        # every term is a mean over the particles' images: times N, each particle gets the gradient it would alone
        loss = particles * sum(weights[f"lambda_{name}"] * value for name, value in terms.items())
        if self.features is not None:
            features = self.features(out.rgb.permute(0, 3, 1, 2))
            terms["repulsion"] = repulsion_loss(features.view(particles, len(cameras), -1))
            loss = loss + cfg.repulsion.weight * terms["repulsion"]

        scale = evaluate(cfg.optim.lr_scale, step)
        for opt in self.optimizers.values():
            opt.param_groups[0]["lr"] = opt.param_groups[0]["initial_lr"] * scale
            opt.zero_grad(set_to_none=True)
        self.representation.before_backward(step, out)
        loss.backward()
        grads = [p.grad for opt in self.optimizers.values() for p in opt.param_groups[0]["params"] if p.grad is not None]
        # the total norm is NaN/Inf exactly when some gradient entry is, and costs one fused pass
        finite = torch.isfinite(loss) & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        # the step's one wait for the device: the finite flag and every logged scalar in one copy
        logged = to_host({"finite": finite, "loss": loss, **{f"loss_{name}": value for name, value in terms.items()},
                          **guided.info})
        finite = bool(logged.pop("finite"))
        if finite:
            for opt in self.optimizers.values():
                opt.step()
            self.representation.after_step(step + 1, out, self.optimizers)
            self.nonfinite_streak = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_streak += 1
        self.step += 1
        record = {"step": self.step, **logged}
        record.update(self.representation.stats())
        record["skipped"] = not finite
        return record

    def _consistent_noise(self, cameras: Cameras, out: RenderOutput) -> NoiseSource | None:
        """With consistent noise: refreshes the representation's noise state and returns the guidance's
        noise source (x.shape [B,C,h,w] -> the representation's noise for these cameras and render)."""
        if not self.cfg.consistent_noise:
            return None
        self.representation.refresh_noise(evaluate(self.cfg.noise_field.refresh, self.step), self.generator)
        return lambda shape: self.representation.consistent_noise(cameras, out, tuple(shape[1:]))

    # -- the loop ----------------------------------------------------------------
    def run(
        self,
        on_event: Callable[[Progress], None] = lambda event: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Steps until cfg.steps; checkpoints every cfg.checkpoint_every steps, on a stop request and at the end.

        The loop polls ``should_stop`` between steps, so it is a polled stage: a signal lets the step finish."""
        with stage("training", f"continue with `dream3d resume {self.run_dir}`", polled=True):
            self._run(on_event, should_stop)

    def _run(self, on_event: Callable[[Progress], None], should_stop: Callable[[], bool]) -> None:
        cfg = self.cfg
        first_step = self.step
        started = time.perf_counter()
        while self.step < cfg.steps:
            if should_stop():
                self.save_checkpoint()
                raise RunInterrupted(f"stopped at {self.stage.where(self.step)}; continue with `dream3d resume "
                                     f"{self.run_dir}`")
            tick = time.perf_counter()
            record = self.train_step()
            record["step_time"] = time.perf_counter() - tick
            record["nfe"] = self.nfe.take()
            if self.stage.staged:
                record.update(stage=self.stage.name, stage_index=self.stage.index)
            self.elapsed += record["step_time"]
            rundir.append_metrics(self.run_dir, record)
            if self.nonfinite_streak >= cfg.max_nan_steps:
                self.save_checkpoint()
                raise RunError(
                    f"the loss or its gradient was NaN/Inf for {self.nonfinite_streak} steps in a row "
                    f"(up to step {self.step}); the last good parameters are checkpointed in {self.run_dir}"
                )
            rate = (self.step - first_step) / max(time.perf_counter() - started, 1e-9)
            done = self.stage.steps_before + self.step
            progress = dict(
                step=done, total=self.stage.total,
                losses={k: v for k, v in record.items() if k.startswith("loss") or k == "t"},
                it_per_s=rate, eta_s=(self.stage.total - done) / max(rate, 1e-9), stage=self.stage.name,
                stage_index=self.stage.index, stages=self.stage.count,
            )
            on_event(Progress("step", **progress))
            if self.step % cfg.preview_every == 0 or self.step == cfg.steps:
                on_event(Progress("preview", preview=self.write_preview(), **progress))
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
                on_event(Progress("checkpoint", **progress))
        rundir.update_summary(self.run_dir, nfe_per_step=mean_per_step(self.run_dir / "metrics.jsonl"))

    @torch.no_grad()
    def write_preview(self, views: int = 4, resolution: int = 64) -> Path:
        """A particles x views grid of renders around the object, saved under previews/."""
        out = self.representation.render(orbit_cameras(views, resolution).to(self.device), self.background)
        rows = out.rgb.view(-1, views, resolution, resolution, 3)  # a row per particle
        grid = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)
        name = (f"stage_{self.stage.index}_" if self.stage.staged else "") + f"step_{self.step:06d}.png"
        path = confine.inside(self.run_dir, self.run_dir / "previews" / name)
        with atomic_path(path) as tmp:
            iio.imwrite(tmp, (grid.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8), extension=".png")
        return path
