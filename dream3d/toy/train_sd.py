"""``dream3d train-prior --arch sd``: trains toy-sd, a latent diffusion model of the toy world in Stable
Diffusion 2.1-base's layout, that ``dream3d run --prior sd --model assets/toy-sd`` loads as it loads SD.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: an ``AutoencoderKL`` (4 latent
channels, SD's factor-8 downsampling: 64 px renders, 8x8 latents), a ``UNet2DConditionModel`` with
cross-attention on the text, a ``CLIPTextModel``, SD 2.x's ``CLIPTokenizer`` over a vocabulary learned from
the toy grammar (``sd_text.py``), and SD 2.1-base's scheduler (epsilon prediction, scaled-linear betas
0.00085..0.012, 1000 steps).

Training runs in two phases over one step count: the VAE first (L1 reconstruction and LDM's KL weight), then,
with the VAE frozen and its ``scaling_factor`` set from the latents' std as SD's was, the UNet and text
encoder on the latents (epsilon MSE, EMA weights exported). Captions are what the SD path sends
(``sd_text.caption``): views reach the model only through words, as with real SD. ``train_prior``'s loop,
checkpoints and resume run it; the model folder is written once, when training ends.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from dream3d.guidance.priors import toy_world
from dream3d.guidance.priors.cache import cache_root, load_cached, save_cached
from dream3d.guidance.prompts import view_index
from dream3d.representations.cameras import Cameras
from dream3d.run.camera_sampling import CameraConfig, sample_cameras
from dream3d.toy.model_folder import model_card, write_model_folder
from dream3d.toy.sd_text import MAX_LENGTH, CaptionShares, build_tokenizer, caption, save_tokenizer
from dream3d.toy.train_unet import TrainingSettings, TrainStep, ViewPool, cache_key, shape_pool, train_prior

# SD 2.1-base's scheduler_config.json: PNDM is the sampler it names; clip_sample, not PNDM's, is kept for the
# samplers a pipeline swaps in (DDIM's default clips x0 to [-1, 1], which latents exceed)
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False}
# LDM's kl-f8 autoencoder weight on the KL, against a reconstruction loss summed over an image's values
LDM_KL_WEIGHT = 1e-6
ENCODE_CHUNK = 16  # renders per VAE call when encoding the pool: larger chunks ran slower on the CPU


class ToySDArch(BaseModel):
    """The sizes of toy-sd (SD 2.1-base's: 512 px; VAE 128..512 channels; UNet 320..1280; text 1024 wide)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 32, 64)  # four levels: SD's factor-8 downsampling
    vae_groups: int = 8
    unet_channels: tuple[int, ...] = (32, 64)
    unet_groups: int = 8
    attention_heads: int = 4
    text_dim: int = 64
    text_layers: int = 2

    @model_validator(mode="after")
    def _latents_fit(self) -> "ToySDArch":
        factor = 2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.unet_channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the VAE's and UNet's downsampling {factor}")
        return self

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


class TrainSDConfig(TrainingSettings):
    """Everything that decides toy-sd's weights. ``steps`` counts both phases: ``vae_steps`` of the VAE, then the
    UNet's; a resume may raise ``steps`` (more UNet steps)."""

    steps: int = Field(12000, gt=0)
    vae_steps: int = Field(1500, gt=0)
    vae_batch_size: int = Field(16, gt=0)
    vae_lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(64, gt=0)
    checkpoint_every: int = Field(250, gt=0)
    pool_views: int = Field(1024, gt=0)
    # up to the pole, so that renders above 60 degrees teach the overhead view's words
    elevation_range: tuple[float, float] = (-10.0, 90.0)
    captions: CaptionShares = CaptionShares()
    arch: ToySDArch = ToySDArch()

    @model_validator(mode="after")
    def _unet_steps(self) -> "TrainSDConfig":
        if self.vae_steps >= self.steps:
            raise ValueError(f"steps ({self.steps}) must exceed vae_steps ({self.vae_steps}): the UNet trains after the VAE")
        return self


def pool_key(cfg: TrainSDConfig) -> str:
    spec = {"world": toy_world.WORLD_VERSION, "views": cfg.pool_views, "resolution": cfg.arch.resolution,
            "ss": cfg.supersample, "seed": cfg.seed, "elevation": list(cfg.elevation_range)}
    return cache_key(spec)


def pool_cameras(cfg: TrainSDConfig) -> Cameras:
    """The pool's pool_views cameras over ``cfg.elevation_range`` (seeded)."""
    camera_cfg = CameraConfig(batch_size=cfg.pool_views, elevation_range=cfg.elevation_range)
    return sample_cameras(camera_cfg, cfg.arch.resolution, torch.Generator().manual_seed(cfg.seed))


def render_pool(cfg: TrainSDConfig) -> ViewPool:
    """Every shape at the pool's cameras, from the disk cache or rendered."""
    return shape_pool(pool_cameras(cfg), cfg.supersample, cache_root() / "toy-sd-pool" / f"{pool_key(cfg)}.pt")


def build_models(arch: ToySDArch, tokenizer: Any) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(AutoencoderKL, UNet2DConditionModel, CLIPTextModel) in SD 2.x's layout, initialised from the global RNG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=arch.vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=arch.vae_groups, sample_size=arch.resolution)
    depth = len(arch.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=4, out_channels=4, block_out_channels=arch.unet_channels,
        # SD's pattern: cross-attention at every level but the coarsest, whose text reaches it in the mid block
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        layers_per_block=1, norm_num_groups=arch.unet_groups, cross_attention_dim=arch.text_dim,
        attention_head_dim=arch.attention_heads, use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_dim, intermediate_size=4 * arch.text_dim,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.attention_heads, hidden_act="gelu",
        max_position_embeddings=MAX_LENGTH, projection_dim=arch.text_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return vae, unet, text_encoder


def build_scheduler() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD_SCHEDULER)


class SDTrainer:
    """The VAE, UNet and text encoder, their optimizers, the UNet's EMA and the data generator.

    ``train_step`` trains the VAE for ``vae_steps``, then the UNet on the frozen VAE's latents."""

    def __init__(self, cfg: TrainSDConfig) -> None:
        from diffusers.training_utils import EMAModel

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer()
        self.vae, self.unet, self.text_encoder = build_models(cfg.arch, self.tokenizer)
        self.scheduler = build_scheduler()
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.ema = EMAModel(self.params, decay=cfg.ema_max_decay, use_ema_warmup=True, power=0.75)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.pool = render_pool(cfg)
        self.pool_views = view_index(self.pool.cameras.elevation, self.pool.cameras.azimuth)
        # every pool render's posterior (mean, std) [36, P, 4, h, w]: encoded once the VAE is frozen
        self.latents: tuple[Tensor, Tensor] | None = None
        self.scaling_factor: float | None = None  # set once, when the VAE is frozen
        # (step, mean loss since the previous entry) every checkpoint_every steps: the curve a checkpoint carries,
        # since a background run's progress bar shows nothing
        self.history: list[tuple[int, float]] = []
        self._window: list[float] = []
        self.exported_step = -1

    @property
    def in_vae_phase(self) -> bool:
        return self.step < self.cfg.vae_steps

    def draw(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(classes, pool views) [batch] each."""
        classes = torch.randint(len(toy_world.CLASSES), (batch,), generator=generator)
        return classes, torch.randint(len(self.pool.cameras), (batch,), generator=generator)

    def images(self, classes: Tensor, views: Tensor) -> Tensor:
        """[B, 3, r, r] renders in [-1, 1], SD's image range."""
        shapes = toy_world.CLASS_SHAPE[classes]
        rgb = toy_world.composite(self.pool.mask[shapes, views], self.pool.shade[shapes, views],
                                  toy_world.ALBEDOS[classes].view(-1, 1, 1, 3))
        return 2 * rgb.permute(0, 3, 1, 2) - 1

    def vae_loss(self, generator: torch.Generator | None = None) -> Tensor:
        """Mean L1 reconstruction of one batch plus LDM's KL term, rescaled to this per-value mean."""
        generator = generator or self.generator
        x = self.images(*self.draw(self.cfg.vae_batch_size, generator))
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=generator)).sample
        return F.l1_loss(recon, x) + LDM_KL_WEIGHT * posterior.kl().mean() / x[0].numel()

    def encode_pool(self) -> None:
        """Freezes the VAE, encodes every class at every pool view (from the disk cache when this VAE's latents are
        there: encoding takes minutes), and sets the scaling factor the first time."""
        self.vae.requires_grad_(False).eval()
        weights = hashlib.sha256(pool_key(self.cfg).encode())
        for name, tensor in self.vae.state_dict().items():
            weights.update(name.encode() + tensor.numpy().tobytes())
        path = cache_root() / "toy-sd-latents" / f"{weights.hexdigest()[:16]}.pt"
        latents = load_cached(path)
        if latents is None:
            latents = self.encode_renders()
            save_cached(latents, path)
        self.latents = latents["mean"], latents["std"]
        if self.scaling_factor is None:
            mean, std = self.latents
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(self.cfg.seed))
            # SD's 0.18215 is 1 / the std of its VAE's latents: diffusion then runs on unit-variance latents
            self.set_scaling_factor(1.0 / float((mean + std * eps).std()))

    @torch.no_grad()
    def encode_renders(self) -> dict[str, Tensor]:
        """{"mean", "std"} [36, P, 4, h, w] of the VAE's posterior of every class at every pool view."""
        classes, views = torch.meshgrid(torch.arange(len(toy_world.CLASSES)), torch.arange(len(self.pool.cameras)),
                                        indexing="ij")
        posteriors = [self.vae.encode(self.images(c, v)).latent_dist
                      for c, v in zip(classes.flatten().split(ENCODE_CHUNK), views.flatten().split(ENCODE_CHUNK))]
        shape = (*classes.shape, *posteriors[0].mean.shape[1:])
        return {k: torch.cat([getattr(p, k) for p in posteriors]).view(shape) for k in ("mean", "std")}

    def set_scaling_factor(self, value: float) -> None:
        self.scaling_factor = value
        self.vae.register_to_config(scaling_factor=value)

    def captions(self, classes: Tensor, views: Tensor, generator: torch.Generator) -> list[str]:
        """The caption of each render (class, pool view): the view suffix is that of the view's camera."""
        return [caption(int(c), int(self.pool_views[v]), generator, self.cfg.captions) for c, v in zip(classes, views)]

    def unet_loss(self, generator: torch.Generator | None = None) -> Tensor:
        """SD's epsilon MSE of one batch of latents (posterior samples, scaled) and their captions."""
        generator = generator or self.generator
        if self.latents is None:
            self.encode_pool()
        mean, std = self.latents
        classes, views = self.draw(self.cfg.batch_size, generator)
        z0 = mean[classes, views] + std[classes, views] * torch.randn(len(classes), *mean.shape[2:], generator=generator)
        z0 = z0 * self.scaling_factor
        ids = self.tokenizer(self.captions(classes, views, generator), padding="max_length", max_length=MAX_LENGTH,
                             truncation=True, return_tensors="pt").input_ids
        states = self.text_encoder(ids)[0]  # no attention mask: SD's pipeline and prior pass none
        t = torch.randint(self.scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        x_t = self.scheduler.add_noise(z0, noise, t)
        return F.mse_loss(self.unet(x_t, t, encoder_hidden_states=states).sample, noise)

    def train_step(self) -> float:
        vae = self.in_vae_phase
        optimizer, params = (self.vae_optimizer, list(self.vae.parameters())) if vae else (self.optimizer, self.params)
        phase_step = self.step if vae else self.step - self.cfg.vae_steps
        lr = self.cfg.vae_lr if vae else self.cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (phase_step + 1) / max(1, self.cfg.warmup_steps))
        loss = self.vae_loss() if vae else self.unet_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if not vae:
            self.ema.step(self.params)
        self.step += 1
        value = loss.item()
        self._window.append(value)
        if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.vae_steps:
            self.history.append((self.step, sum(self._window) / len(self._window)))
            self._window.clear()
        return value

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "config": self.cfg.model_dump(mode="json"), "vae": self.vae.state_dict(),
                 "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                 "generator": self.generator.get_state(), "history": [list(h) for h in self.history]}
        if self.in_vae_phase:  # the frozen VAE's optimizer would double every later checkpoint's VAE bytes
            state["vae_optimizer"] = self.vae_optimizer.state_dict()
        if self.scaling_factor is not None:
            state["scaling_factor"] = self.scaling_factor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]
        self.history = [(int(step), float(loss)) for step, loss in state["history"]]
        if "vae_optimizer" in state:
            self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        if "scaling_factor" in state:
            self.set_scaling_factor(state["scaling_factor"])

    def ema_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Copies of the UNet and text encoder holding the EMA weights."""
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        self.ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
        return unet, text_encoder


def export_sd(trainer: SDTrainer, out: Path, command: str) -> None:
    """Writes toy-sd to ``out`` with ``StableDiffusionPipeline.save_pretrained``, once training has ended.

    ``train_prior`` calls this at every checkpoint too: toy-sd's folder is written only at the end, once."""
    cfg = trainer.cfg
    if trainer.step < cfg.steps or trainer.exported_step == trainer.step:
        return
    r, h = cfg.arch.resolution, cfg.arch.latent_size
    card = model_card(
        "toy-sd: a latent diffusion model of dream3d's toy world in Stable Diffusion 2.1-base's layout",
        f"A `StableDiffusionPipeline` folder: an `AutoencoderKL` ({r} px renders, {h}x{h}x4 latents, "
        f"scaling_factor {trainer.scaling_factor:.5f} = 1 / the latents' std), a `UNet2DConditionModel` with "
        "cross-attention on a tiny `CLIPTextModel`, a `CLIPTokenizer` over a BPE vocabulary learned from the toy "
        "grammar, its view suffixes and the guidance rules' negative prompts, and SD 2.1-base's scheduler (epsilon "
        "prediction, scaled-linear betas 0.00085..0.012, 1000 steps). No camera input: captions carry the view "
        "suffix `--prior sd` appends for the render's camera (\", front view\" ...), as with real SD. The VAE "
        f"trained {cfg.vae_steps} steps first, then the UNet and text encoder (their EMA weights here) on its "
        "frozen latents. Used by `dream3d run --prior sd --model assets/toy-sd`.",
        command, cfg.seed, trainer.step, cfg)

    def write(folder: Path) -> None:
        from diffusers import StableDiffusionPipeline

        unet, text_encoder = trainer.ema_models()
        pipeline = StableDiffusionPipeline(vae=trainer.vae, text_encoder=text_encoder, tokenizer=trainer.tokenizer,
                                           unet=unet, scheduler=trainer.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipeline.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(folder / "tokenizer")  # vocab.json and merges.txt beside tokenizer.json, as SD's folder
        (folder / "README.md").write_text(card)

    write_model_folder(out, write)
    trainer.exported_step = trainer.step


def train_sd(cfg: TrainSDConfig, out: Path, work: Path, resume: bool, command: str,
             on_step: Callable[[TrainStep], None] = lambda s: None,
             should_stop: Callable[[], bool] = lambda: False) -> SDTrainer:
    """Trains (or resumes) toy-sd to ``cfg.steps``: ``train_prior``'s loop with this trainer and export."""
    return train_prior(cfg, out, work, resume, command, on_step, should_stop,  # type: ignore[arg-type]
                       make_trainer=SDTrainer, export=export_sd)  # type: ignore[arg-type, return-value]
