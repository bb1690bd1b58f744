"""``dream3d train-prior``: trains the toy-world diffusion model that ``--prior toy-unet`` loads.

Data is the toy world rendered at random cameras: a pool of views of each shape is rendered
once (seeded, cached on disk; colour is applied per sample, since the world's radiance is
albedo times a shape-only shading factor), and each batch draws classes, pool views,
captions (partial at random), camera dropout, timesteps and noise from one seeded generator.
Checkpoints hold the model, its EMA, the optimizer and that generator, so a resumed run
gives the same weights as an uninterrupted one. The EMA weights are exported as a
diffusers folder at every checkpoint and at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dream3d.config import ConfigError
from dream3d.rundir.folder import apply_checkpoint, read_latest_checkpoint
from dream3d.run.camera_sampling import CameraConfig, sample_cameras
from dream3d.run.stop import stage
from dream3d.guidance.priors import toy_world
from dream3d.guidance.priors import toy_unet
from dream3d.guidance.priors.cache import cache_root, load_cached, save_atomic, save_cached
from dream3d.guidance.prompts import view_index
from dream3d.toy.model_folder import export_pipeline, model_card
from dream3d.representations.cameras import Cameras

CHECKPOINT_GLOB = "step-*.pt"


class TrainingSettings(BaseModel):
    """What every toy model's training loop is set by (with the seed, it makes the weights reproducible);
    each model's config adds its data and architecture and sets its own defaults."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    ema_max_decay: float = 0.999
    supersample: int = Field(2, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 0


class TrainPriorConfig(TrainingSettings):
    """Everything that decides toy-unet's trained weights."""

    camera_dropout: float = Field(0.25, ge=0, le=1)
    pool_views: int = Field(1024, gt=0)
    arch: toy_unet.ToyUNetArch = toy_unet.ToyUNetArch()


@dataclass
class ViewPool:
    """Renders of every shape at the same P random cameras: mask, shade [6,P,r,r,1]; cameras P."""

    mask: Tensor
    shade: Tensor
    cameras: Cameras


@dataclass
class TrainStep:
    step: int
    total: int
    loss: float
    it_per_s: float


def cache_key(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able ``spec``: the name of what the spec renders in the disk cache."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def shape_pool(cameras: Cameras, supersample: int, path: Path) -> ViewPool:
    """Every toy shape rendered at ``cameras``, from the disk cache at ``path`` or rendered and cached there (the
    toy trainers' data: the pool costs minutes to render, and a resume or a second run reads it back)."""
    planes = load_cached(path)
    if planes is None:
        shapes = [toy_world.render_shapes(cameras, [s] * len(cameras), supersample) for s in range(len(toy_world.SHAPES))]
        planes = {k: torch.stack([out[k] for out in shapes]) for k in ("mask", "shade")}
        save_cached(planes, path)
    return ViewPool(planes["mask"], planes["shade"], cameras)


def render_pool(cfg: TrainPriorConfig) -> ViewPool:
    """The view pool of ``cfg``: pool_views seeded random cameras."""
    r = cfg.arch.resolution
    cams = sample_cameras(CameraConfig(batch_size=cfg.pool_views), r, torch.Generator().manual_seed(cfg.seed))
    spec = {"world": toy_world.WORLD_VERSION, "views": cfg.pool_views, "resolution": r, "ss": cfg.supersample,
            "seed": cfg.seed}
    return shape_pool(cams, cfg.supersample, cache_root() / "toy-unet-pool" / f"{cache_key(spec)}.pt")


def camera_features(cameras: Cameras) -> Tensor:
    """[B, 3] the features the shipped model declares (elevation in radians, sin/cos azimuth)."""
    from dream3d.guidance.priors.diffusers_prior import CAMERA_FEATURES

    return torch.stack([CAMERA_FEATURES[name](cameras).float() for name in toy_unet.CAMERA_FEATURES], dim=-1)


def draw_batch(pool: ViewPool, cfg: TrainPriorConfig, generator: torch.Generator) -> tuple[Tensor, list[str], Tensor]:
    """(x0 [B,3,r,r] in [-1,1], captions B, camera features [B,3], zero where the camera is dropped)."""
    B = cfg.batch_size
    classes = torch.randint(len(toy_world.CLASSES), (B,), generator=generator)
    views = torch.randint(len(pool.cameras), (B,), generator=generator)
    keep = torch.rand(B, generator=generator) >= cfg.camera_dropout
    shapes = toy_world.CLASS_SHAPE[classes]
    rgb = toy_world.composite(pool.mask[shapes, views], pool.shade[shapes, views], toy_world.ALBEDOS[classes].view(-1, 1, 1, 3))
    cams = pool.cameras[views]
    view_ids = view_index(cams.elevation, cams.azimuth)
    captions = [toy_unet.caption(int(c), int(v) if k else None, generator)
                for c, v, k in zip(classes, view_ids, keep)]
    features = camera_features(cams) * keep.unsqueeze(-1)
    return 2 * rgb.permute(0, 3, 1, 2) - 1, captions, features


class PriorTrainer:
    """The model, its EMA and optimizer, and the data generator; ``run`` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainPriorConfig) -> None:
        from diffusers.training_utils import EMAModel

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.tokenizer = toy_unet.build_tokenizer()
        self.unet, self.text_encoder = self.build_networks()
        self.scheduler = toy_unet.build_scheduler()
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.ema = EMAModel(self.params, decay=cfg.ema_max_decay, use_ema_warmup=True, power=0.75)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.pool = self.build_pool()

    def build_networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The UNet and the text encoder, drawn from the seeded global generator."""
        return toy_unet.build_models(self.cfg.arch, len(self.tokenizer))

    def build_pool(self) -> ViewPool:
        return render_pool(self.cfg)

    def text_states(self, captions: list[str]) -> Tensor:
        """The text encoder's hidden states of ``captions`` [N, max_tokens, width], padding masked."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.cfg.arch.max_tokens, truncation=True,
                                return_tensors="pt")
        return self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def loss(self, generator: torch.Generator | None = None) -> Tensor:
        """The v-prediction MSE of one batch drawn from ``generator`` (default: the training one)."""
        generator = generator or self.generator
        x0, captions, features = draw_batch(self.pool, self.cfg, generator)
        states = self.text_states(captions)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        v = self.unet(x_t, t, encoder_hidden_states=states, class_labels=features).sample
        return F.mse_loss(v, self.scheduler.get_velocity(x0, noise, t))

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.ema.step(self.params)
        self.step += 1
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config": self.cfg.model_dump(mode="json"), "unet": self.unet.state_dict(),
                "text_encoder": self.text_encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]

    def ema_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Copies of the UNet and text encoder holding the EMA weights."""
        import copy

        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        self.ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
        return unet, text_encoder


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(CHECKPOINT_GLOB))


def save_checkpoint(trainer: PriorTrainer, folder: Path, keep: int) -> Path:
    path = folder / f"step-{trainer.step:07d}.pt"
    save_atomic(trainer.state_dict(), path)
    for old in checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def export_model(trainer: PriorTrainer, out: Path, command: str) -> None:
    """Writes the EMA weights as a diffusers folder at ``out``."""
    cfg = trainer.cfg
    card = model_card(
        "toy-unet: a text- and camera-conditioned diffusion model of dream3d's toy world",
        f"A {cfg.arch.resolution}x{cfg.arch.resolution} pixel-space `UNet2DConditionModel` (x = 2 rgb - 1, v- "
        "prediction, cosine schedule) with a tiny `CLIPTextModel` over a word-level toy vocabulary, and the camera "
        "(elevation in radians, sin/cos azimuth; all zeros = no camera) through a projection class embedding "
        "(`_camera_features` in model_index.json). Weights are the EMA of training. Used by "
        "`dream3d run --prior toy-unet` (camera-free) and `--prior toy-unet-mv` (camera-conditioned).",
        command, cfg.seed, trainer.step, cfg)
    index = {"_class_name": "ToyUNetPipeline", "_camera_features": list(toy_unet.CAMERA_FEATURES),
             "unet": ["diffusers", "UNet2DConditionModel"]}
    export_pipeline(trainer, out, lambda unet, path: unet.save_pretrained(path, safe_serialization=True), index, card)


def train_prior(cfg: TrainPriorConfig, out: Path, work: Path, resume: bool, command: str,
                on_step: Callable[[TrainStep], None] = lambda s: None, should_stop: Callable[[], bool] = lambda: False,
                make_trainer: Callable[[Any], PriorTrainer] = PriorTrainer,
                export: Callable[[Any, Path, str], None] = export_model) -> PriorTrainer:
    """Trains (or resumes) to ``cfg.steps``, checkpointing under ``work`` and exporting the model to ``out``.

    make_trainer and export swap in another model (``train_mvdream.py``) over the same loop."""
    found = checkpoints(work)
    if found and not resume:
        raise ConfigError(f"{work} already holds training checkpoints; pass --resume to continue, or another --out")
    if resume and not found:
        raise ConfigError(f"--resume: no checkpoint in {work} to resume from")
    if found:  # read (weights only) and checked before any work
        path, state = read_latest_checkpoint(found, f"--resume: no checkpoint in {work} loads")
        # the step count may grow on resume (the schedule does not depend on it); nothing else may change
        saved = state.get("config")
        if not isinstance(saved, dict) or {**saved, "steps": cfg.steps} != cfg.model_dump(mode="json"):
            raise ConfigError(f"{path} was trained with another configuration; resume with the same options")
    trainer = make_trainer(cfg)
    if found:
        apply_checkpoint(path, state, trainer.load_state_dict, "this training run")
    start, clock = trainer.step, time.perf_counter()
    # a signal lets the current step finish: the loop then checkpoints (dream3d.run.stop)
    with stage("training the prior", f"the checkpoint is in {work}; --resume continues", polled=True):
        while trainer.step < cfg.steps and not should_stop():
            loss = trainer.train_step()
            rate = (trainer.step - start) / max(time.perf_counter() - clock, 1e-9)
            on_step(TrainStep(trainer.step, cfg.steps, loss, rate))
            if trainer.step % cfg.checkpoint_every == 0:
                save_checkpoint(trainer, work, cfg.keep_checkpoints)
                export(trainer, out, command)
        if trainer.step % cfg.checkpoint_every:
            save_checkpoint(trainer, work, cfg.keep_checkpoints)
        if trainer.step >= cfg.steps:
            export(trainer, out, command)
    return trainer
