"""``dream3d train-prior --arch mvdream``: trains toy-mvdream, MVDream's network at toy size, on 4-view sets.

Data: a pool of groups of 4 cameras (90 degrees apart from a random start, shared elevation) renders
every shape once (seeded, cached on disk); a batch draws one class and one pool group per object,
so the model sees the same object from 4 known cameras, with one caption (partial at random, empty
for the CFG unconditional), one timestep and fresh noise per object. The trainer is ``PriorTrainer``
with this data, network and loss, so checkpoints, EMA, resume and the training loop are shared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dream3d.run.camera_sampling import CameraConfig, sample_cameras
from dream3d.toy.model_folder import export_pipeline, model_card
from dream3d.toy.train_unet import PriorTrainer, TrainingSettings, TrainStep, ViewPool, cache_key, shape_pool, train_prior
from dream3d.guidance.priors import toy_world
from dream3d.guidance.priors import toy_unet
from dream3d.guidance.priors.cache import cache_root
from dream3d.guidance.priors.mvdream import UNET_WEIGHTS, mvdream_camera
from dream3d.guidance.priors.mvdream_unet import MultiViewUNet
from dream3d.guidance.priors.toy_mvdream import ToyMVDreamArch
from dream3d.representations.cameras import Cameras

VIEWS = 4


class TrainMVDreamConfig(TrainingSettings):
    """Everything that decides toy-mvdream's trained weights. batch_size counts objects (4 views each)."""

    steps: int = Field(3000, gt=0)
    batch_size: int = Field(8, gt=0)
    pool_groups: int = Field(256, gt=0)
    arch: ToyMVDreamArch = ToyMVDreamArch()


def render_group_pool(cfg: TrainMVDreamConfig) -> ViewPool:
    """Every shape at pool_groups groups of 4 cameras (group g is cameras 4g..4g+3), from the cache or rendered."""
    r = cfg.arch.resolution
    camera_cfg = CameraConfig(batch_size=VIEWS * cfg.pool_groups, group_views=VIEWS)
    cams = sample_cameras(camera_cfg, r, torch.Generator().manual_seed(cfg.seed))
    spec = {"world": toy_world.WORLD_VERSION, "groups": cfg.pool_groups, "views": VIEWS, "resolution": r,
            "ss": cfg.supersample, "seed": cfg.seed}
    return shape_pool(cams, cfg.supersample, cache_root() / "toy-mvdream-pool" / f"{cache_key(spec)}.pt")


def draw_groups(pool: ViewPool, cfg: TrainMVDreamConfig, generator: torch.Generator
                ) -> tuple[Tensor, list[str], Cameras]:
    """(x0 [B*4,3,r,r] in [-1,1], one caption per object (B), cameras B*4), each object's 4 views contiguous."""
    B = cfg.batch_size
    classes = torch.randint(len(toy_world.CLASSES), (B,), generator=generator)
    groups = torch.randint(len(pool.cameras) // VIEWS, (B,), generator=generator)
    views = (VIEWS * groups.view(B, 1) + torch.arange(VIEWS)).flatten()
    shapes = toy_world.CLASS_SHAPE[classes].repeat_interleave(VIEWS)
    albedo = toy_world.ALBEDOS[classes].repeat_interleave(VIEWS, dim=0).view(-1, 1, 1, 3)
    rgb = toy_world.composite(pool.mask[shapes, views], pool.shade[shapes, views], albedo)
    captions = [toy_unet.caption(int(c), None, generator) for c in classes]
    return 2 * rgb.permute(0, 3, 1, 2) - 1, captions, pool.cameras[views]


def build_text_encoder(arch: ToyMVDreamArch, vocab_size: int) -> torch.nn.Module:
    """A tiny CLIPTextModel over the toy vocabulary (toy-unet's sizes)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_dim, intermediate_size=2 * arch.text_dim,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.attention_heads,
        max_position_embeddings=arch.max_tokens, bos_token_id=1, eos_token_id=2, pad_token_id=0))


class MVDreamTrainer(PriorTrainer):
    """PriorTrainer (optimizer, EMA, checkpoints) over MultiViewUNet and 4-view batches."""

    cfg: TrainMVDreamConfig

    def build_networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return MultiViewUNet(self.cfg.arch.unet()), build_text_encoder(self.cfg.arch, len(self.tokenizer))

    def build_pool(self) -> ViewPool:
        return render_group_pool(self.cfg)

    def loss(self, generator: torch.Generator | None = None) -> Tensor:
        """The v-prediction MSE of one batch of 4-view objects (one t per object)."""
        generator = generator or self.generator
        x0, captions, cameras = draw_groups(self.pool, self.cfg, generator)
        states = self.text_states(captions)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (len(captions),), generator=generator)
        t = t.repeat_interleave(VIEWS)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        v = self.unet(x_t, t, states.repeat_interleave(VIEWS, dim=0), mvdream_camera(cameras.c2w), VIEWS)
        return F.mse_loss(v, self.scheduler.get_velocity(x0, noise, t))


def export_mvdream(trainer: MVDreamTrainer, out: Path, command: str) -> None:
    """Writes the EMA weights as a toy-mvdream folder at ``out`` (our UNet: safetensors and its config)."""
    from safetensors.torch import save_file

    cfg = trainer.cfg

    def save_unet(unet: torch.nn.Module, path: Path) -> None:
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path / UNET_WEIGHTS))
        config = {"_class_name": "MultiViewUNet", **cfg.arch.unet().model_dump(mode="json")}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    card = model_card(
        "toy-mvdream: MVDream's multi-view network trained on dream3d's toy world",
        f"dream3d's `MultiViewUNet` (the MVDream/SD 2.x layout) at toy size, {cfg.arch.resolution}x"
        f"{cfg.arch.resolution} pixels (x = 2 rgb - 1, v-prediction, cosine schedule), denoising 4 views of one "
        "object jointly, each conditioned on its camera (MVDream's 16-number normalised camera-to-world), with a "
        "tiny `CLIPTextModel` over the toy vocabulary. Weights are the EMA of training. Used by "
        "`dream3d run --prior toy-mvdream`.",
        command, cfg.seed, trainer.step, cfg)
    index = {"_class_name": "ToyMVDreamPipeline", "unet": ["dream3d", "MultiViewUNet"]}
    export_pipeline(trainer, out, save_unet, index, card)


def train_mvdream(cfg: TrainMVDreamConfig, out: Path, work: Path, resume: bool, command: str,
                  on_step: Callable[[TrainStep], None] = lambda s: None,
                  should_stop: Callable[[], bool] = lambda: False) -> Any:
    """Trains (or resumes) toy-mvdream to ``cfg.steps``: ``train_prior``'s loop with this trainer and export."""
    return train_prior(cfg, out, work, resume, command, on_step, should_stop,  # type: ignore[arg-type]
                       make_trainer=MVDreamTrainer, export=export_mvdream)
