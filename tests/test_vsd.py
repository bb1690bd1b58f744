"""VSD and ESD (docs/guidance-math.md#vsd-and-esd) on tiny random-weight Stable Diffusion folders:
the gradient equals the formula, the LoRA shares the prior's weights and learns, its state
checkpoints and resumes exactly, and both rules run end to end."""

import io
from pathlib import Path

import pytest
import torch

from dream3d import api
from dream3d.run.build import build_prior
from dream3d.config import build_config
from dream3d.run.loop import RunInterrupted
from dream3d.guidance.vsd import ADAPTER, ESDConfig, VSDConfig, VSDGuidance, camera_condition
from tests.support import REPO, cameras, metrics, replay_noising

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("embedding_cache")


def toy_unet_mv():
    return build_prior(build_config({"prompt": "a red cube", "prior": "toy-unet-mv"}))


def load(model, prior="sd"):
    return build_prior(build_config({"prompt": "a cat", "prior": prior, "model": str(model)}))


def perturb_lora(guidance, seed=0):
    """Non-zero LoRA weights (B starts at zero), so that the adapter changes the UNet's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guidance.lora:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def latent_identity(prior):
    """encode = 2 rgb - 1 on 4-channel 'images' [B,8,8,4], so d loss / d rgb = 2 g / B exactly."""
    prior.encode = lambda rgb: 2 * rgb - 1


@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["sd", "sd-v"])
def test_gradient_equals_formula(models, kind, lam):
    prior = load(models[kind])
    guidance = VSDGuidance(prior, VSDConfig(guidance_scale=3.0, camera_guidance_scale=lam, max_step_percent=0.98))
    perturb_lora(guidance)
    latent_identity(prior)
    B, omega = 2, 3.0
    rgb = torch.rand(B, 8, 8, 4)
    cams = cameras(B)
    e = prior.embed("a cat")

    t, _, abar, x_t = replay_noising(prior, rgb, seed=4)
    with torch.no_grad():
        eps_y = prior.predict_noise(x_t, t, e.conditional(cams))
        eps_u = prior.predict_noise(x_t, t, e.uncond.expand(B, -1, -1))
        with guidance.fake_score() as unet:
            fake = [unet(x_t, t, encoder_hidden_states=e.cond.expand(B, -1, -1), class_labels=c).sample
                    for c in (camera_condition(cams), torch.zeros(B, 16))]
    if kind == "sd-v":  # v = alpha eps - sigma x0 -> eps = alpha v + sigma x_t
        fake = [abar.sqrt() * v + (1 - abar).sqrt() * x_t for v in fake]
    eps_pre = eps_u + omega * (eps_y - eps_u)  # the diffusers CFG convention
    g = (1 - abar) * (eps_pre - (fake[1] + lam * (fake[0] - fake[1])))

    rgb.requires_grad_()
    out = guidance(rgb, "a cat", cams, step=0, generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    torch.testing.assert_close(rgb.grad, (2 * g / B).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-6)
    assert out.info["loss_lora"] > 0


def test_lora_shares_the_frozen_prior_and_is_off_for_its_pass(models):
    prior = load(models["sd"])
    base = list(prior.unet.parameters())
    x_t, t, states = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), prior.embed("a cat").cond.expand(2, -1, -1)
    before = prior.predict_noise(x_t, t, states)
    guidance = VSDGuidance(prior, VSDConfig())
    perturb_lora(guidance)
    torch.testing.assert_close(prior.predict_noise(x_t, t, states), before)  # adapter disabled for the prior
    after = {id(p): p for p in prior.unet.parameters()}
    # the same base tensors (peft wraps the layers), plus the LoRA's: no second UNet
    assert set(after) == {id(p) for p in base} | {id(p) for p in guidance.lora}
    assert not any(p.requires_grad for p in base) and all(p.requires_grad for p in guidance.lora)
    keys = guidance.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"lora", "camera_embedding", "_extra_state"}
    with torch.no_grad():
        assert not torch.allclose(guidance.fake_output(x_t, t, states, torch.zeros(2, 16)), before)
    assert prior.unet.class_embedding is None


@pytest.mark.parametrize("kind", ["sd", "sd-v", "if"])
def test_lora_loss_decreases_on_a_fixed_image(models, kind):
    """Epsilon and v targets, and IF's learned-variance UNet (epsilon in its first 3 channels)."""
    prior = load(models[kind], "if" if kind == "if" else "sd")
    guidance = VSDGuidance(prior, VSDConfig(lora_lr=3e-2, camera_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    channels = 3 if kind == "if" else 4
    x0 = torch.randn(1, channels, 8, 8, generator=gen)
    cams = cameras(1)
    e = prior.embed("a cat")
    probe_t = torch.linspace(50, 950, 8).long()
    probe_noise = torch.randn(8, channels, 8, 8, generator=gen)

    def probe():
        with torch.no_grad():
            return float(guidance.fake_loss(x0.expand(8, -1, -1, -1), e.cond.expand(8, -1, -1),
                                            camera_condition(cams).expand(8, -1), probe_t, probe_noise))

    start = probe()
    for _ in range(60):
        guidance.train_fake_score(x0, e, cams, gen)
    # a random tiny UNet adapted only in its attention fits slowly: 4-7% lower after 60 steps here
    assert probe() < 0.97 * start


def test_state_dict_round_trip(models):
    prior = load(models["sd"])
    guidance = VSDGuidance(prior, VSDConfig(lora_lr=1e-3))
    latent_identity(prior)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        guidance(torch.rand(1, 8, 8, 4, requires_grad=True), "a cat", cameras(1), step, gen).loss.backward()
    buffer = io.BytesIO()
    torch.save(guidance.state_dict(), buffer)
    buffer.seek(0)
    restored = VSDGuidance(load(models["sd"]), VSDConfig(lora_lr=1e-3))
    restored.load_state_dict(torch.load(buffer, weights_only=True))  # the LoRA and its AdamW state: no pickled objects
    for a, b in zip([*guidance.lora, *guidance.camera_embedding.parameters()],
                    [*restored.lora, *restored.camera_embedding.parameters()]):
        assert torch.equal(a, b)
    moments = lambda g: [s["exp_avg"] for s in g.optimizer.state_dict()["state"].values()]  # noqa: E731
    assert len(moments(restored)) == len(moments(guidance)) > 0
    assert all(torch.equal(a, b) for a, b in zip(moments(guidance), moments(restored)))


TINY_RUN = {"steps": 6, "resolution": 16, "checkpoint_every": 3, "preview_every": 3,
            "nerf": {"grid_resolutions": [8, 16], "num_samples": 24, "occupancy_resolution": 16},
            "export": {"mesh_resolution": 32, "video_frames": 4, "video_resolution": 32}}


def test_vsd_resume_equals_uninterrupted(models, tmp_path):
    layers = [TINY_RUN, {"prompt": "a cat", "prior": "sd", "model": str(models["sd"]), "guidance": "vsd",
                         "out": str(tmp_path / "runs"), "export": {"formats": ["obj"], "video": False}}]
    straight = api.run(build_config(*layers)).run_dir
    seen = []
    with pytest.raises(RunInterrupted):
        api.run(build_config(*layers), seen.append, lambda: bool(seen) and seen[-1].step >= 4)
    interrupted = max(Path(tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    api.resume(interrupted)
    assert [m["loss_lora"] for m in metrics(interrupted)] == [m["loss_lora"] for m in metrics(straight)]
    assert metrics(interrupted) == metrics(straight)


# -- the LoRA itself learns (not only the camera MLP) ---------------------------------

def lora_snapshot(guidance):
    return [p.detach().clone() for p in guidance.lora]


def fixed_renders(prior, gen, batch=2):
    size = prior.unet.config.sample_size
    return torch.randn(batch, prior.unet.config.in_channels, size, size, generator=gen)


@pytest.mark.parametrize("config", [VSDConfig, ESDConfig])
@pytest.mark.parametrize("kind", ["sd", "toy-sd", "toy-unet-mv"])
def test_every_lora_tensor_trains(models, kind, config):
    """Three rule steps (the guidance's own forward, as the loop calls it) move every LoRA tensor: on a tiny random
    SD, on toy-sd (trained weights in SD's layout, through --prior sd) and on toy-unet-mv."""
    prior = {"sd": lambda: load(models["sd"]), "toy-sd": lambda: load(REPO / "assets" / "toy-sd"),
             "toy-unet-mv": toy_unet_mv}[kind]()
    guidance = VSDGuidance(prior, config(lora_lr=1e-3))
    before = lora_snapshot(guidance)
    assert len(before) > 0
    gen = torch.Generator().manual_seed(0)
    size = 16 if kind == "sd" else prior.resolution
    for step in range(3):
        rgb = torch.rand(2, size, size, 3, generator=gen, requires_grad=True)
        guidance(rgb, "a red cube", cameras(2, size), step, gen).loss.backward()
    changed = [not torch.equal(a, b) for a, b in zip(before, guidance.lora)]
    assert all(changed), f"{changed.count(False)} of {len(changed)} LoRA tensors did not move"


def test_lora_training_lowers_the_fake_loss_beyond_the_camera_mlp(models):
    """Training LoRA + camera MLP fits a fixed set of renders clearly better than the camera MLP alone."""
    prior = toy_unet_mv()
    gen = torch.Generator().manual_seed(0)
    x0, e, cams = fixed_renders(prior, gen, batch=4), prior.embed("a red cube"), cameras(4)
    probe_t = torch.linspace(50, 950, 8).long().repeat_interleave(4)
    probe_noise = torch.randn(32, *x0.shape[1:], generator=gen)

    def trained_loss(freeze_lora: bool) -> float:
        guidance = VSDGuidance(prior, VSDConfig(lora_lr=3e-3, camera_dropout=0.0))
        if freeze_lora:
            guidance.optimizer.param_groups[0]["params"] = list(guidance.camera_embedding.parameters())
        train_gen = torch.Generator().manual_seed(1)
        for _ in range(25):
            guidance.train_fake_score(x0, e, cams, train_gen)
        with torch.no_grad():
            loss = float(guidance.fake_loss(x0.repeat(8, 1, 1, 1), e.cond.expand(32, -1, -1),
                                            camera_condition(cams).repeat(8, 1), probe_t, probe_noise))
        prior.unet.delete_adapters(ADAPTER)
        return loss

    frozen, trained = trained_loss(freeze_lora=True), trained_loss(freeze_lora=False)
    assert trained < 0.9 * frozen, (trained, frozen)


def test_lora_init_is_gaussian_a_and_zero_b(models):
    """diffusers' LoRALinearLayer (threestudio's): A ~ N(0, 1/r^2), B = 0, so the adapter starts as the prior."""
    prior = load(models["sd"])
    guidance = VSDGuidance(prior, VSDConfig(lora_rank=4))
    names = [n for n, _ in prior.unet.named_parameters() if f".{ADAPTER}." in n]
    a = torch.cat([p.flatten() for n, p in zip(names, guidance.lora) if ".lora_A." in n])
    b = torch.cat([p.flatten() for n, p in zip(names, guidance.lora) if ".lora_B." in n])
    assert torch.count_nonzero(b) == 0
    assert a.std().item() == pytest.approx(1 / 4, rel=0.15)
    assert a.abs().max() > 2 * (1 / 4)  # a normal's tail, not kaiming-uniform's bound


def test_nonfinite_lora_gradients_skip_the_step_and_are_counted(models):
    prior = load(models["sd"])
    guidance = VSDGuidance(prior, VSDConfig(lora_lr=1e-2, camera_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    x0, e, cams = fixed_renders(prior, gen), prior.embed("a cat"), cameras(2)
    guidance.train_fake_score(x0, e, cams, gen)
    before = lora_snapshot(guidance)
    handle = guidance.lora[0].register_hook(lambda g: torch.full_like(g, float("nan")))
    guidance.train_fake_score(x0, e, cams, gen)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, guidance.lora))
    assert all(torch.isfinite(p).all() for p in guidance.lora)
    assert guidance.skipped_lora_steps == 1
    guidance.train_fake_score(x0, e, cams, gen)
    assert not all(torch.equal(a, b) for a, b in zip(before, guidance.lora))


def test_vsd_run_checkpoint_holds_a_trained_lora(models, tmp_path):
    layers = [TINY_RUN, {"prompt": "a cat", "prior": "sd", "model": str(models["sd"]), "guidance": "vsd",
                         "out": str(tmp_path / "runs"), "export": {"formats": ["obj"], "video": False}}]
    run_dir = api.run(build_config(*layers)).run_dir
    state = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    lora = [v for k, v in state["guidance"].items() if k.startswith("lora.")]
    # B starts at zero: every tensor non-zero means every B moved
    assert lora and all(torch.count_nonzero(v) > 0 for v in lora)


def test_rule_state_loads_onto_the_lora_device(models):
    """A checkpoint read on the CPU, loaded into a rule whose LoRA and camera MLP live elsewhere (``meta`` stands
    in for a GPU): the AdamW moments and step counts, the skip count and the loss scale follow the parameters."""
    trained = VSDGuidance(load(models["sd"]), VSDConfig())
    gen = torch.Generator().manual_seed(0)
    trained.train_fake_score(fixed_renders(trained.prior, gen), trained.prior.embed("a cat"), cameras(2), gen)
    state = trained.state_dict()
    restored = VSDGuidance(load(models["sd"]), VSDConfig())
    for p in [*restored.lora, *restored.camera_embedding.parameters()]:  # the same objects the UNet and AdamW hold
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to("meta")))
    restored.load_state_dict(state)
    tensors = [v for s in restored.optimizer.state.values() for v in s.values()]
    tensors += [restored.skipped_lora_steps, restored.loss_scale.scale, restored.loss_scale.good_steps]
    assert len(tensors) > 3 and {t.device.type for t in tensors} == {"meta"}
