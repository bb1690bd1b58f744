"""Variational Score Distillation (ProlificDreamer) and, with lambda < 1, Entropic Score Distillation
(docs/guidance-math.md#vsd-and-esd).

The fake score eps_psi is the prior's own UNet with a LoRA (peft) on every attention
projection and a camera MLP (c2w, 16 values -> the timestep-embedding width) installed as
its class embedding. The base weights are the frozen prior's, not a copy: the adapter and
the camera MLP are switched on only around the fake score's calls. One shared x_t and eps:

    eps_pre = eps_u + omega (eps_y - eps_u)                          (diffusers CFG, omega = 7.5)
    eps_est = eps_psi(x_t; y, 0) + lambda (eps_psi(x_t; y, c) - eps_psi(x_t; y, 0))
    g       = w(t) (eps_pre - eps_est),  w = 1 - abar_t

lambda = 1 is VSD, lambda = 0.5 ESD. The fake score is trained in the same step on the
detached renders (t' ~ U{0..T-1}, v- or epsilon-target as the prior predicts, the camera
zeroed for the whole batch with probability ``camera_dropout``) by its own (fused) AdamW, stepped in
``forward`` after g is computed from the pre-update LoRA, which is the order threestudio's single
backward gives. Keeping the optimizer here (not in the loop) leaves the loop's optimizers to the
representation and puts the LoRA, the camera MLP and the AdamW state in ``state_dict()``,
so checkpoints resume exactly. On a float16 UNet the LoRA loss's backward runs on a scaled gradient
(``LossScale``, guidance/priors/precision.py: unscaled its float32 gradient of about 1e-4 per element at batch 1
flushes to zero in the half-precision layers) and the LoRA's gradients are unscaled before the step. A non-finite
LoRA loss or gradient skips the LoRA update (counted and logged as ``lora_skipped_steps``; an overflow also halves
the scale) on the device, through fused AdamW's ``found_inf`` as ``GradScaler`` uses it, so the rule never waits
for the device.

On a multi-view prior (MVDream's ``MultiViewUNet``) the LoRA goes on the same attention projections, the fake
score is told each view's camera through the UNet's own camera input (the prior's 16-number camera; zeros for
the camera-free branch) instead of an added MLP, and every draw of t, the prior's and the fake score's training
draw, is one per group of views: that UNet denoises a group at one t.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from dream3d.guidance.base import DistillationRule, GuidanceError, RuleContext, TimestepConfig
from dream3d.guidance.diffusion import (
    add_noise, alpha_bar, batch_of, cfg_diff, forward_noise, grouped_randint, predict_each, sds_weight, to_epsilon,
)
from dream3d.guidance.priors.base import Embeddings, Prior
from dream3d.guidance.priors.mvdream_unet import MultiViewUNet
from dream3d.guidance.priors.precision import LossScale
from dream3d.guidance.schedule import CheckedSchedule, evaluate
from dream3d.representations.cameras import Cameras, to_device

ADAPTER = "dream3d_vsd"
# the attention projections (self and cross) that diffusers' LoRAAttnProcessor adapts
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAMERA_DIM = 16


class VSDConfig(TimestepConfig):
    """VSD settings (threestudio's prolificdreamer.yaml). ``camera_guidance_scale`` is lambda:
    1 for VSD, < 1 for ESD, which needs ``camera_dropout`` > 0 to train the camera-free branch."""

    guidance_scale: CheckedSchedule = 7.5
    camera_guidance_scale: CheckedSchedule = 1.0
    max_step_percent: CheckedSchedule = [5000.0, 0.98, 0.5, 5001.0]
    lora_rank: int = Field(4, gt=0)
    lora_lr: float = Field(1e-4, gt=0)
    lora_betas: tuple[float, float] = (0.9, 0.99)
    lora_eps: float = 1e-15
    camera_dropout: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _camera_free_branch(self) -> "VSDConfig":
        if self.camera_dropout == 0 and self.camera_guidance_scale != 1.0:
            raise ValueError("camera_guidance_scale != 1 mixes in the camera-free fake score, "
                             "which only camera_dropout > 0 trains")
        return self


class ESDConfig(VSDConfig):
    """ESD is VSD with the fake score's camera-CFG weight lambda < 1 (the 3D-Mode-Collapse README's 0.5)."""

    camera_guidance_scale: CheckedSchedule = 0.5


def camera_condition(cameras: Cameras) -> Tensor:
    """[B, 16]: the flattened camera-to-world matrices (threestudio's "extrinsics" condition)."""
    return cameras.c2w.reshape(len(cameras), CAMERA_DIM).float()


class VSDGuidance(DistillationRule):
    """VSD/ESD on a prior with a diffusion UNet (``prior.unet``: a diffusers UNet, or MVDream's ``MultiViewUNet``);
    refuses closed-form priors. ``context.seed`` initialises the LoRA and the camera MLP (the global generator is left
    untouched)."""

    def __init__(self, prior: Prior, cfg: VSDConfig, context: RuleContext = RuleContext(name="vsd")) -> None:
        super().__init__(prior, cfg)
        unet = prior.unet
        self.multiview = isinstance(unet, MultiViewUNet)
        if unet is None or not (self.multiview or hasattr(unet, "class_embedding")):
            raise GuidanceError(f"guidance {context.name} trains a LoRA on the prior's diffusion UNet; prior {prior.name} "
                                f"has none (use a UNet prior such as sd or if)")
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig, inject_adapter_in_model

        reference = next(unet.parameters())
        # "gaussian": A ~ N(0, 1/r^2), B = 0, as diffusers' LoRALinearLayer that threestudio trains
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS,
                          init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            if self.multiview:  # our own module: peft's injection, which diffusers' add_adapter wraps
                inject_adapter_in_model(lora, unet, adapter_name=ADAPTER)
                self.camera_embedding = None  # the UNet's own camera input conditions the fake score
            else:
                unet.add_adapter(lora, adapter_name=ADAPTER)
                self.camera_embedding = TimestepEmbedding(CAMERA_DIM, unet.time_embedding.linear_2.out_features)
        params = [p for name, p in unet.named_parameters() if f".{ADAPTER}." in name]
        for p in params:  # trained in float32 even on a half-precision UNet
            p.data = p.data.float()
        self.lora = torch.nn.ParameterList(params)  # the same tensors as in the UNet: no copy
        self._adapter_off()
        self.skipped_lora_steps = torch.zeros((), dtype=torch.long, device=reference.device)
        self.loss_scale = LossScale(reference.dtype, reference.device)
        camera_params = []
        if self.camera_embedding is not None:
            self.camera_embedding.to(reference.device)
            camera_params = list(self.camera_embedding.parameters())
        self.optimizer = torch.optim.AdamW([*self.lora, *camera_params], lr=cfg.lora_lr,
                                           betas=cfg.lora_betas, eps=cfg.lora_eps, fused=True)
        self.prediction_type = getattr(prior, "prediction_type", "epsilon")
        self.views = prior.num_views if self.multiview else 1  # type: ignore[attr-defined]

    # -- checkpoint: the AdamW state travels with the LoRA in state_dict() ------------
    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "skipped_lora_steps": self.skipped_lora_steps,
                "loss_scale": self.loss_scale.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Every tensor onto the LoRA's device, wherever the checkpoint was loaded (AdamW's own load casts its
        moments and fused step counts to each parameter's device)."""
        device = self.lora[0].device
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped_lora_steps = torch.as_tensor(state.get("skipped_lora_steps", 0), device=device)
        self.loss_scale = LossScale(self.loss_scale.dtype, device)
        if "loss_scale" in state:  # checkpoints from before the LoRA's loss scale restart at its initial scale
            self.loss_scale.load_state_dict(state["loss_scale"])

    # -- the fake score -------------------------------------------------------------
    @contextmanager
    def fake_score(self) -> Iterator[torch.nn.Module]:
        """The prior's UNet with the LoRA (and, on a diffusers UNet, the camera MLP) on; the plain prior on exit."""
        unet = self.prior.unet
        own_embedding = None if self.multiview else unet.class_embedding  # a camera-conditioned prior has its own
        self._set_adapter(True)
        if not self.multiview:
            unet.class_embedding = self.camera_embedding
        try:
            yield unet
        finally:
            if not self.multiview:
                unet.class_embedding = own_embedding
            self._adapter_off()

    def _set_adapter(self, enabled: bool) -> None:
        """Switches the LoRA layers on or off, as diffusers' ``enable_adapters`` does, on any UNet."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.prior.unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)

    def _adapter_off(self) -> None:
        """The plain prior again. peft's disable also sets requires_grad=False on the LoRA, and autograd
        accumulates only into leaves that require grad when ``backward`` runs, which is after this exit:
        so the LoRA keeps requires_grad (the disabled adapter takes no part in the prior's forward)."""
        self._set_adapter(False)
        for p in self.lora:
            p.requires_grad_(True)

    def fake_camera(self, cameras: Cameras) -> Tensor:
        """[B, 16]: what tells the fake score each view's camera (MVDream's camera on a multi-view UNet)."""
        if not self.multiview:
            return camera_condition(cameras)
        from dream3d.guidance.priors.mvdream import mvdream_camera

        return mvdream_camera(cameras.c2w.float())

    def fake_output(self, x_t: Tensor, t: Tensor, states: Tensor, camera: Tensor) -> Tensor:
        """The fake score's raw output (the prior's prediction type) [B,C,h,w] float32 for x_t [B,C,h,w],
        t [B], text states [B, ...] and camera conditions [B, 16] (zeros: no camera)."""
        reference = next(self.prior.unet.parameters())
        x_t, t = x_t.to(reference.device, reference.dtype), to_device(t, reference.device)
        states, camera = states.to(reference.device, reference.dtype), camera.to(reference.device)
        with self.fake_score() as unet:
            if self.multiview:
                out = unet(x_t, t, states, camera, num_frames=self.views)
            else:
                out = unet(x_t, t, encoder_hidden_states=states, class_labels=camera).sample
        # a learned-variance UNet's epsilon is its first C channels; the LoRA loss's gradient enters scaled
        return self.loss_scale.leave(out[:, : x_t.shape[1]])

    def fake_loss(self, x0: Tensor, states: Tensor, camera: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """mean ||eps_psi(x_t'; y, c) - target||^2 with target v = alpha eps - sigma x0 or eps (the prior's type)."""
        abar = alpha_bar(self.prior, t, x0.device)
        output = self.fake_output(add_noise(x0, noise, abar), t, states, camera)
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if self.prediction_type == "v_prediction" else noise
        return F.mse_loss(output, target.to(output.device))

    def train_fake_score(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, generator: torch.Generator
                         ) -> Tensor:
        """One AdamW step of the LoRA and camera MLP on the detached x [B,C,h,w]; returns the loss before the step
        (a 0-dim tensor on the device).

        A step whose loss or any gradient is NaN/Inf is skipped (a single one would make the LoRA NaN and
        silently leave the run without guidance) and counted in ``skipped_lora_steps``. After it the parameters'
        ``.grad`` hold the unscaled gradients."""
        B = x.shape[0]
        t = grouped_randint(0, self.prior.num_train_timesteps, B, self.views, generator)
        noise = forward_noise(x, generator)
        camera = self.fake_camera(cameras)
        if float(torch.rand(1, generator=generator, device=generator.device)) < self.cfg.camera_dropout:
            camera = torch.zeros_like(camera)
        with torch.enable_grad():
            loss = self.fake_loss(x.detach(), batch_of(embeddings.cond, B), camera, t, noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        skip = (~torch.isfinite(loss.detach())).float().reshape(1)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.loss_scale.unscale_(grads, skip)
        skip = skip.reshape(())  # 0-dim, as fused AdamW subtracts it from the step counts
        self.optimizer.found_inf = skip  # fused AdamW leaves the parameters, moments and step count when it is 1
        self.optimizer.step()
        self.skipped_lora_steps = self.skipped_lora_steps + skip.long()
        return loss.detach()

    # -- the rule -------------------------------------------------------------------
    def gradient(self, x: Tensor, embeddings: Embeddings, cameras: Cameras, step: int, generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, float | Tensor]]:
        B = x.shape[0]
        t, abar, x_t = self.noised(x, step, generator)
        with torch.no_grad():
            cond, uncond = predict_each(self.prior, x_t, t, [embeddings.conditional(cameras),
                                                           batch_of(embeddings.uncond, B)], cameras)
            eps_pre = cfg_diff(cond, uncond, evaluate(self.cfg.guidance_scale, step))
            camera = self.fake_camera(cameras)
            # the fake score sees the view-independent prompt, with and without the camera
            out = self.fake_output(torch.cat([x_t, x_t]), torch.cat([t, t]), batch_of(embeddings.cond, 2 * B),
                                   torch.cat([camera, torch.zeros_like(camera)]))
            eps_c, eps_0 = to_epsilon(out.to(x.device), torch.cat([x_t, x_t]), torch.cat([abar, abar]),
                                      self.prediction_type).chunk(2)
        eps_est = eps_0 + evaluate(self.cfg.camera_guidance_scale, step) * (eps_c - eps_0)
        grad = sds_weight(abar.flatten(), self.cfg.weighting).view(-1, 1, 1, 1) * (eps_pre - eps_est)
        loss_lora = self.train_fake_score(x, embeddings, cameras, generator)
        return grad, {"t": float(t.float().mean()), "loss_lora": loss_lora,
                      "lora_skipped_steps": self.skipped_lora_steps}
