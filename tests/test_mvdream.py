"""MVDream: our multi-view UNet against the checkpoint layout, the camera convention, joint-view attention,
and multi-view SDS end to end on a tiny random-weight model saved in MVDream's diffusers layout."""

import json
import math

import pytest
import torch

from dream3d.run.build import build_guidance, build_prior
from dream3d.config import ConfigError, build_config
from dream3d.run.camera_sampling import CameraConfig, sample_cameras
from dream3d.guidance.base import RuleContext
from dream3d.guidance.diffusion import grouped_randint
from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.priors.mvdream import mvdream_camera
from dream3d.guidance.priors.mvdream_unet import BasicTransformerBlock3D, MultiViewUNet, MVDreamUNetConfig
from dream3d.guidance.sds import SDSConfig, SDSGuidance
from dream3d.representations.cameras import look_at_cameras
from tests.support import dream3d
from tests.support import run_cli
from tests.support import metrics
from tests.tiny_diffusers import TEXT_DIM, clip_tokenizer

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("embedding_cache")

TINY = MVDreamUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                         num_head_channels=8, context_dim=TEXT_DIM, image_size=8)


def tiny_unet(seed: int = 0, std: float = 0.02) -> MultiViewUNet:
    """Every weight N(0, std): LDM zero-initialises the output convs and proj_out, which would hide bugs."""
    torch.manual_seed(seed)
    unet = MultiViewUNet(TINY)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=std)
    return unet.eval()


def build_tiny_mvdream(folder, seed=0):
    """A tiny MVDream folder: model_index.json and unet/config.json as the released model's, LDM key names."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16, scaling_factor=0.18215).save_pretrained(folder / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "unet").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_unet(seed).state_dict().items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "MultiViewUNetModel", **TINY.model_dump(exclude={"norm_groups"})}
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    # the released folder ships its UNet class as code; dream3d must never run it
    (folder / "unet" / "mv_unet.py").write_text("raise RuntimeError('custom model code was run')\n")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "MVDreamPipeline", "_diffusers_version": "0.25.0", "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["mv_unet", "MultiViewUNetModel"],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_mvdream(tmp_path_factory.mktemp("models") / "mvdream")


def load(model, **config):
    return build_prior(build_config({"prompt": "a cat", "prior": "mvdream", "model": str(model), **config}))


def group_cameras(start=30.0, elevation=10.0, size=16, views=4):
    azimuth = start + torch.arange(views) * 360.0 / views
    return look_at_cameras(torch.full((views,), elevation), azimuth, torch.full((views,), 2.5), 45.0, size, size)


# -- the network -------------------------------------------------------------------------------------------------
def test_released_layout_key_count_parameters_and_shapes():
    with torch.device("meta"):
        weights = MultiViewUNet(MVDreamUNetConfig()).state_dict()
    assert len(weights) == 690 and sum(v.numel() for v in weights.values()) == 867_572_164
    camera = sum(weights[f"camera_embed.{i}.{p}"].numel() for i in (0, 2) for p in ("weight", "bias"))
    assert camera == 1_661_440
    shapes = {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "middle_block.1.proj_in.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.3.0.in_layers.2.weight": (1280, 2560, 3, 3),
        "output_blocks.9.0.in_layers.2.weight": (320, 960, 3, 3),
        "time_embed.0.weight": (1280, 320),
        "camera_embed.0.weight": (1280, 16),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(weights[key].shape) == shape, key
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in weights
    assert not any(k.startswith("input_blocks.10.1") for k in weights)  # no attention at the coarsest level


def test_single_view_attention_is_per_image_attention():
    torch.manual_seed(0)
    block = BasicTransformerBlock3D(dim=16, heads=2, dim_head=8, context_dim=12).eval()
    x, context = torch.randn(4, 9, 16), torch.randn(4, 5, 12)
    one_at_a_time = torch.cat([block(x[i : i + 1], context[i : i + 1], num_frames=1) for i in range(4)])
    torch.testing.assert_close(block(x, context, num_frames=1), one_at_a_time)

    # with 4 views the self-attention is softmax(q k^T / sqrt(d)) v over all 36 tokens of the object
    attn, h = block.attn1, block.norm1(x).reshape(1, 36, 16)
    q, k, v = (proj(h).view(36, 2, 8).transpose(0, 1) for proj in (attn.to_q, attn.to_k, attn.to_v))
    joint = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v).transpose(0, 1).reshape(36, 16)
    expected = x + attn.to_out(joint).view(4, 9, 16)
    expected = expected + block.attn2(block.norm2(expected), context)
    expected = expected + block.ff(block.norm3(expected))
    torch.testing.assert_close(block(x, context, num_frames=4), expected, rtol=1e-5, atol=1e-5)


def test_views_see_each_other_only_within_a_group():
    unet = tiny_unet(std=0.2)  # attention far from uniform, so that one view's change shows in the others
    x, t, context = torch.randn(8, 4, 8, 8), torch.full((8,), 500), torch.randn(8, 8, TEXT_DIM)
    camera = mvdream_camera(group_cameras().c2w).repeat(2, 1)
    changed = x.clone()
    changed[0] += 1.0
    with torch.no_grad():
        before, after = unet(x, t, context, camera, 4), unet(changed, t, context, camera, 4)
        single = unet(x, t, context, camera, 1), unet(changed, t, context, camera, 1)
        # permuting views (with their cameras) within a group permutes the output
        order = torch.tensor([2, 0, 3, 1, 4, 5, 6, 7])
        permuted = unet(x[order], t, context[order], camera[order], 4)
    # view 0 of object 0 reaches its other views
    assert (before[1:4] - after[1:4]).abs().max() > 1e-3 * before.abs().max()
    torch.testing.assert_close(before[4:], after[4:])  # but not the other object
    torch.testing.assert_close(single[0][1:], single[1][1:])  # one view per object: no cross talk at all
    torch.testing.assert_close(permuted, before[order], rtol=1e-5, atol=1e-5)


def test_camera_changes_the_prediction():
    unet = tiny_unet()
    x, t, context = torch.randn(4, 4, 8, 8), torch.full((4,), 300), torch.randn(4, 8, TEXT_DIM)
    with torch.no_grad():
        a = unet(x, t, context, mvdream_camera(group_cameras(0.0).c2w), 4)
        b = unet(x, t, context, mvdream_camera(group_cameras(45.0).c2w), 4)
    assert not torch.allclose(a, b)


def test_half_precision_weights_take_float32_inputs():
    unet = tiny_unet()
    x, t, context = torch.randn(4, 4, 8, 8), torch.full((4,), 300), torch.randn(4, 8, TEXT_DIM)
    camera = mvdream_camera(group_cameras().c2w)
    with torch.no_grad():
        full = unet(x, t, context, camera, 4)
        half = unet.to(torch.bfloat16)(x, t, context, camera, 4)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05 * float(full.abs().max()))


# -- cameras -----------------------------------------------------------------------------------------------------
def test_camera_conversion_reproduces_the_worked_example():
    cameras = look_at_cameras(torch.tensor([15.0]), torch.tensor([0.0]), torch.tensor([2.5]), 45.0, 8, 8)
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    expected = torch.tensor([[0, -s, c, c, 1, 0, 0, 0, 0, c, s, s, 0, 0, 0, 1]])
    torch.testing.assert_close(mvdream_camera(cameras.c2w), expected, rtol=0, atol=1e-6)
    assert abs(expected[0, 1] + 0.258819) < 1e-6 and abs(expected[0, 2] - 0.965926) < 1e-6


def test_camera_conversion_closed_form_at_any_angle_and_distance():
    el, az = torch.tensor([-10.0, 30.0, 60.0]), torch.tensor([37.0, 200.0, 290.0])
    cameras = look_at_cameras(el, az, torch.tensor([1.5, 2.5, 4.0]), 45.0, 8, 8)
    e, a = torch.deg2rad(el), torch.deg2rad(az)
    ce, se, ca, sa, zero = torch.cos(e), torch.sin(e), torch.cos(a), torch.sin(a), torch.zeros(3)
    expected = torch.stack([-sa, -se * ca, ce * ca, ce * ca, ca, -se * sa, ce * sa, ce * sa,
                            zero, ce, se, se, zero, zero, zero, zero + 1], dim=1)
    torch.testing.assert_close(mvdream_camera(cameras.c2w), expected, rtol=0, atol=1e-6)


def test_grouped_camera_sampler():
    cfg = CameraConfig(batch_size=8, group_views=4, elevation_range=(0.0, 30.0), fovy_range=(30.0, 50.0))
    cams = sample_cameras(cfg, 16, torch.Generator().manual_seed(3))
    az = cams.azimuth.view(2, 4)
    gaps = (az.roll(-1, dims=1) - az) % 360
    torch.testing.assert_close(gaps, torch.full_like(gaps, 90.0))
    assert not torch.isclose(az[0, 0], az[1, 0])  # a random start per group
    for values in (cams.elevation, cams.fovy, cams.distance):
        grouped = values.view(2, 4)
        torch.testing.assert_close(grouped, grouped[:, :1].expand(2, 4))
    assert ((cams.elevation >= 0) & (cams.elevation <= 30)).all()
    with pytest.raises(ValueError, match="batch_size 6 is not a multiple of camera.group_views 4"):
        CameraConfig(batch_size=6, group_views=4)


# -- the prior ---------------------------------------------------------------------------------------------------
def test_tiny_checkpoint_loads_strictly_into_our_unet(model):
    prior = load(model)
    from safetensors.torch import load_file

    saved = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert prior.unet.state_dict().keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(prior.unet.state_dict()[key], value, rtol=0, atol=0)
    assert not prior.unet.training and not any(p.requires_grad for p in prior.unet.parameters())
    assert prior.resolution == 16 and prior.num_views == 4 and prior.dtype == torch.float32
    assert prior.encode(torch.rand(4, 3, 12, 12)).shape == (4, 4, 8, 8)
    e = prior.embed("a cat")
    assert e.views is None and e.cond.shape == (8, TEXT_DIM)


def test_prediction_is_our_unet_with_the_converted_cameras(model):
    prior = load(model)
    e = prior.embed("a cat")
    cams = group_cameras()
    x_t, t = torch.randn(4, 4, 8, 8), torch.full((4,), 321)
    states = e.cond.expand(4, *e.cond.shape)
    with torch.no_grad():
        direct = tiny_unet()(x_t, t, states, mvdream_camera(cams.c2w), 4)
    torch.testing.assert_close(prior.predict_noise(x_t, t, states, cams), direct)
    with pytest.raises(PriorError, match="groups of 4 views of one object at one timestep"):
        prior.predict_noise(x_t, torch.tensor([1, 2, 3, 4]), states, cams)
    with pytest.raises(PriorError, match="groups of 4 views"):
        prior.predict_noise(x_t[:3], t[:3], states[:3], cams[:3])


def _rewrite_weights(model, tmp_path, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(model, tmp_path / "edited")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("middle_block.1.transformer_blocks.0.attn1.to_k.weight"),
     "missing key middle_block.1.transformer_blocks.0.attn1.to_k.weight"),
    (lambda w: w.update({"input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight": torch.zeros(2, 2)}),
     "unexpected key input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"),
    (lambda w: w.update({"camera_embed.0.weight": torch.zeros(128, 12)}),
     r"key camera_embed.0.weight has shape \[128, 12\], the network needs \[128, 16\]"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_key(model, tmp_path, monkeypatch, capsys, edit, message):
    folder = _rewrite_weights(model, tmp_path, edit)
    with pytest.raises(PriorError, match=message):
        load(folder)
    status, err = dream3d(monkeypatch, capsys, "run", "a cat", "--prior", "mvdream", "--model", folder,
                          "--out", tmp_path / "runs")
    assert status == 1 and len(err.splitlines()) == 1 and "does not fit MVDream's UNet" in err
    assert not (tmp_path / "runs").exists()


def test_a_stable_diffusion_folder_is_named(tmp_path):
    from tests.tiny_diffusers import build_tiny_sd

    with pytest.raises(PriorError, match="has no camera input .*not an MVDream model; use --prior sd"):
        load(build_tiny_sd(tmp_path / "sd"))


def test_missing_model_offline_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    status, err = dream3d(monkeypatch, capsys, "run", "a corgi astronaut", "--prior", "mvdream",
                          "--out", tmp_path / "runs")
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model ashawkey/mvdream-sd2.1-diffusers is not in the Hugging Face cache" in err
    assert "hf download ashawkey/mvdream-sd2.1-diffusers" in err
    assert not (tmp_path / "runs").exists()


# -- distillation ------------------------------------------------------------------------------------------------
def test_mvdream_run_defaults_scale_to_the_run():
    cfg = build_config({"prompt": "a cat", "prior": "mvdream", "steps": 1000})
    assert cfg.camera.group_views == 4 and cfg.camera.batch_size == 4 and cfg.camera.elevation_range == (0.0, 30.0)
    assert cfg.resolution == [64, 256] and cfg.resolution_milestones == [500]
    assert cfg.sds.recon_loss and cfg.sds.recon_std_rescale == 0.5
    assert cfg.sds.min_step_percent == [0, 0.98, 0.02, 800] and cfg.sds.max_step_percent == [0, 0.98, 0.5, 800]
    mine = build_config({"prompt": "a cat", "prior": "mvdream", "camera": {"batch_size": 8}, "resolution": 32})
    assert mine.camera.batch_size == 8 and mine.camera.group_views == 4 and mine.resolution == 32
    assert build_config({"prompt": "a cat", "prior": "sd"}).camera.group_views == 1


@pytest.mark.parametrize("layer, message", [
    ({"guidance": "csd"}, "guidance csd cannot drive prior mvdream: it draws a timestep per image"),
    ({"guidance": "nfsd"}, "guidance nfsd cannot drive prior mvdream: it draws a timestep per image"),
    ({"camera": {"group_views": 2}}, "prior mvdream denoises 4 views of one object together: set camera.group_views=4"),
    ({"camera": {"batch_size": 6}}, "camera.batch_size 6 is not a multiple of camera.group_views 4"),
    ({"sds": {"perp_neg": True}}, "recon_loss rescales toward the plain conditional estimate"),
    ({"sds": {"perp_neg": True, "recon_loss": False}}, "sds.perp_neg needs view prompts"),
])
def test_rules_that_cannot_drive_mvdream_are_refused_in_one_line(layer, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_config({"prompt": "a cat", "prior": "mvdream"}, layer)
    assert "\n" not in str(error.value)


def test_recon_sds_gradient_is_x_minus_the_rescaled_x0_with_one_t_per_group(model):
    cfg = build_config({"prompt": "a cat", "prior": "mvdream", "model": str(model), "steps": 100})
    prior = build_prior(cfg)
    guidance = build_guidance(cfg, prior)
    assert isinstance(guidance, SDSGuidance) and guidance.guidance_scale == 49.0
    t = guidance.sample_timesteps(8, step=90, generator=torch.Generator().manual_seed(0))
    assert (t.view(2, 4) == t.view(2, 4)[:, :1]).all() and 20 <= t.min() and t.max() <= 500
    assert (guidance.sample_timesteps(4, step=0, generator=torch.Generator()) == 980).all()

    e = prior.embed("a cat")
    cams = group_cameras()
    x, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.full((4,), 400)
    g = guidance.push_gradient(x, t, noise, e, cams, step=0)
    abar = prior.alphas_cumprod[400]
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    states = torch.stack([e.cond] * 4 + [e.uncond] * 4)
    eps = prior.predict_noise(torch.cat([x_t, x_t]), torch.full((8,), 400), states, type(cams).cat([cams, cams]))
    eps_c, eps_u = eps.chunk(2)
    eps_hat = eps_u + 50 * (eps_c - eps_u)
    x0 = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    x0_c = (x_t - (1 - abar).sqrt() * eps_c) / abar.sqrt()
    f = (x0_c.std() + 1e-8) / (x0.std() + 1e-8)
    torch.testing.assert_close(g, x - (0.5 * f * x0 + 0.5 * x0), rtol=1e-4, atol=1e-4)


def test_recon_without_rescale_is_sds_weighted_sigma_over_alpha(model):
    prior = load(model)
    e, cams = prior.embed("a cat"), group_cameras()
    x, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.full((4,), 700)
    context = RuleContext(steps=10, guidance_scale=49.0)
    recon = SDSGuidance(prior, SDSConfig(recon_loss=True), context).push_gradient(x, t, noise, e, cams, 0)
    sds = SDSGuidance(prior, SDSConfig(weighting="sigma_over_alpha"), context).push_gradient(x, t, noise, e, cams, 0)
    torch.testing.assert_close(recon, sds, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
def test_multiview_sds_end_to_end(model, representation, monkeypatch, capsys, tmp_path):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--prior", "mvdream", "--model", model,
                      "--representation", representation)
    config = (run_dir / "config.yaml").read_text()
    assert "group_views: 4" in config and "recon_loss: true" in config
    rows = metrics(run_dir)
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert rows[0]["t"] == 980  # one t for the group, annealed from 0.98
    assert all(r["nfe"] == 8 for r in rows)  # 4 views, conditional and unconditional, in one UNet pass


@pytest.mark.parametrize("options", [["--guidance", "ism"], ["--guidance", "cfd"], ["--guidance", "vsd"],
                                     ["--guidance", "esd"], ["--particles", "2"]])
def test_other_rules_and_particles_drive_mvdream(model, options, monkeypatch, capsys, tmp_path):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--prior", "mvdream", "--model", model, *options,
                      check_export=False)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in metrics(run_dir))


# -- VSD/ESD: the LoRA on the multi-view UNet -----------------------------------------------------------------------
def test_vsd_trains_a_lora_on_the_multiview_unet_with_one_t_per_group(model):
    """Three rule steps on a group of 4 views move every LoRA tensor of the multi-view UNet's attention; the prior's
    pass refuses per-view timesteps, so the steps completing shows one t per group there, and the fake score's own
    draws are one per group too."""
    from dream3d.guidance.vsd import VSDConfig, VSDGuidance

    prior = load(model)
    guidance = VSDGuidance(prior, VSDConfig(lora_lr=1e-3))
    assert guidance.multiview and guidance.camera_embedding is None
    before = [p.detach().clone() for p in guidance.lora]
    assert len(before) == 4 * 2 * sum(isinstance(m, BasicTransformerBlock3D) for m in prior.unet.modules()) * 2
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        rgb = torch.rand(8, 16, 16, 3, generator=gen, requires_grad=True)
        out = guidance(rgb, "a cat", type(group_cameras()).cat([group_cameras(), group_cameras(75.0)]), step, gen)
        out.loss.backward()
        assert rgb.grad.abs().sum() > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, guidance.lora))
    t = grouped_randint(0, 1000, 8, guidance.views, torch.Generator().manual_seed(1))
    assert (t.view(2, 4) == t.view(2, 4)[:, :1]).all() and t.view(2, 4)[0, 0] != t.view(2, 4)[1, 0]


def test_the_multiview_lora_is_off_for_the_priors_own_pass(model):
    """The LoRA lives in the prior's own UNet (no copy): with non-zero LoRA weights the prior still predicts as
    before, and the fake score (the adapter on, the same camera input) predicts otherwise."""
    from dream3d.guidance.vsd import VSDConfig, VSDGuidance

    prior = load(model)
    cams, e = group_cameras(), prior.embed("a cat")
    x_t, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 500)
    states = e.cond.expand(4, *e.cond.shape)
    plain = prior.predict_noise(x_t, t, states, cams)
    guidance = VSDGuidance(prior, VSDConfig())
    with torch.no_grad():
        for p in guidance.lora:
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(prior.predict_noise(x_t, t, states, cams), plain)
    raw = guidance.fake_output(x_t, t, states, guidance.fake_camera(cams))
    assert not torch.allclose(raw, prior.unet(x_t, t, states, mvdream_camera(cams.c2w), num_frames=4), atol=1e-4)
    torch.testing.assert_close(prior.predict_noise(x_t, t, states, cams), plain)


# -- an independent oracle: diffusers' SD UNet with the same weights -----------------------------------------------
class JointViewsProcessor:
    """diffusers self-attention over the N views of an object jointly: [B*N, L, C] -> [B, N*L, C] and back."""

    def __init__(self, num_frames: int) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_frames, self.plain = num_frames, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        BN, L, C = hidden_states.shape
        joint = hidden_states.reshape(BN // self.num_frames, self.num_frames * L, C)
        return self.plain(attn, joint, None, attention_mask, temb).reshape(BN, L, C)


def diffusers_oracle(unet: MultiViewUNet, num_frames: int):
    """SD 2.x's UNet2DConditionModel in diffusers, its class embedding as the camera MLP, given our weights
    through diffusers' own LDM -> diffusers key conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    heads = [TINY.model_channels * m // TINY.num_head_channels for m in TINY.channel_mult]
    config = dict(sample_size=TINY.image_size, in_channels=4, out_channels=4, layers_per_block=TINY.num_res_blocks,
                  block_out_channels=[TINY.model_channels * m for m in TINY.channel_mult],
                  down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2,
                  attention_head_dim=heads, cross_attention_dim=TINY.context_dim, use_linear_projection=True,
                  class_embed_type="projection", projection_class_embeddings_input_dim=TINY.camera_dim)
    ldm = {k.replace("camera_embed.", "label_emb.0."): v for k, v in unet.state_dict().items()}
    oracle = UNet2DConditionModel(**config)
    oracle.load_state_dict(convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()},
                                                       config), strict=True)
    oracle.set_attn_processor({name: JointViewsProcessor(num_frames) if name.endswith("attn1.processor")
                               else processor for name, processor in oracle.attn_processors.items()})
    return oracle.eval()


@pytest.mark.parametrize("num_frames", [1, 4])
def test_our_unet_equals_diffusers_sd_unet_with_joint_view_attention(num_frames):
    unet = tiny_unet(std=0.05)
    oracle = diffusers_oracle(unet, num_frames)
    x, context = torch.randn(8, 4, 8, 8), torch.randn(8, 8, TEXT_DIM)
    t = torch.tensor([10, 700]).repeat_interleave(4)
    camera = mvdream_camera(group_cameras().c2w).repeat(2, 1)
    with torch.no_grad():
        ours = unet(x, t, context, camera, num_frames)
        theirs = oracle(x, t, encoder_hidden_states=context, class_labels=camera).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()) + 1e-6)


# -- toy-mvdream: the same network trained on the toy world --------------------------------------------------------
@pytest.fixture(scope="module")
def toy_training():
    from dream3d.toy.train_mvdream import TrainMVDreamConfig
    from dream3d.guidance.priors.toy_mvdream import ToyMVDreamArch

    return TrainMVDreamConfig(steps=4, batch_size=2, warmup_steps=0, pool_groups=2, supersample=1, checkpoint_every=2,
                              arch=ToyMVDreamArch(resolution=16, channel_mult=(1, 2), attention_resolutions=(1, 2),
                                                  text_dim=32))


@pytest.fixture(scope="module")
def toy_model(toy_training, tmp_path_factory):
    from dream3d.toy.train_mvdream import train_mvdream

    root = tmp_path_factory.mktemp("toy-mvdream")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DREAM3D_CACHE", str(root / "cache"))
        train_mvdream(toy_training, root / "model", root / "checkpoints", False, "dream3d train-prior --arch mvdream")
    return root / "model"


def test_trained_toy_mvdream_loads_through_the_mvdream_code_path(toy_model):
    from dream3d.guidance.priors.toy_mvdream import ToyMVDreamPrior

    prior = build_prior(build_config({"prompt": "a red cube", "prior": "toy-mvdream", "model": str(toy_model)}))
    assert isinstance(prior, ToyMVDreamPrior) and isinstance(prior.unet, MultiViewUNet)
    assert prior.resolution == 16 and prior.prediction_type == "v_prediction" and prior.num_views == 4
    e = prior.embed("a red cube")
    cams, x_t = group_cameras(), torch.randn(4, 3, 16, 16)
    eps = prior.predict_noise(x_t, torch.full((4,), 600), e.cond.expand(4, *e.cond.shape), cams)
    assert eps.shape == x_t.shape and torch.isfinite(eps).all()
    with pytest.raises(PriorError, match="does not know 'banana'"):
        prior.embed("a red banana")
    with pytest.raises(PriorError, match="names more than one shape"):
        prior.embed("a cube sphere")
    with pytest.raises(PriorError, match="pixel-space model .* loads with --prior toy-mvdream"):
        load(toy_model)


def test_toy_mvdream_resume_gives_the_weights_of_an_uninterrupted_run(toy_training, tmp_path):
    from dream3d.toy.train_mvdream import train_mvdream

    straight = train_mvdream(toy_training, tmp_path / "a", tmp_path / "a-ck", False, "x")
    train_mvdream(toy_training.model_copy(update={"steps": 2}), tmp_path / "b", tmp_path / "b-ck", False, "x")
    resumed = train_mvdream(toy_training, tmp_path / "b", tmp_path / "b-ck", True, "x")
    assert resumed.step == straight.step == 4
    for (name, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_toy_mvdream_sds_end_to_end(toy_model, monkeypatch, capsys, tmp_path):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--prior", "toy-mvdream", "--model", toy_model,
                      check_export=False)
    rows = metrics(run_dir)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] and r["nfe"] == 8 for r in rows)


def test_train_prior_refuses_an_unknown_arch_in_one_line(monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "train-prior", "--arch", "magic", "--out", tmp_path / "m")
    assert status == 1 and err.count("\n") == 0 and "unknown --arch 'magic'; valid: unet, mvdream" in err
    assert not (tmp_path / "m").exists()


def test_eval_prior_scores_toy_mvdream_sets(toy_model, monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "eval-prior", "--prior", "toy-mvdream", "--model", toy_model,
                          "--views", 1, "--steps", 2, "--out", tmp_path / "eval.json")
    assert status == 0, err
    results = json.loads((tmp_path / "eval.json").read_text())["toy-mvdream"]
    assert len(results["correct"]) == 36 * 4
    assert 0 <= results["accuracy"] <= 1 and 0 <= results["median_iou"] <= 1 and 0 <= results["view_agreement"] <= 1
    status, err = dream3d(monkeypatch, capsys, "eval-prior", "--prior", "if")
    assert status == 1 and "unknown --prior 'if' for eval-prior; valid: toy-unet, toy-mvdream, sd" in err


def test_toy_mvdream_without_weights_says_how_to_train_them(monkeypatch, capsys, tmp_path):
    from dream3d.guidance.priors import toy_mvdream

    monkeypatch.setattr(toy_mvdream, "SHIPPED_MODEL", tmp_path / "absent")
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--prior", "toy-mvdream", "--out", tmp_path / "runs")
    assert status == 1 and len(err.splitlines()) == 1
    assert "toy-mvdream has no shipped weights yet: train them with `dream3d train-prior --arch mvdream`" in err
    assert not (tmp_path / "runs").exists()


def test_the_shipped_toy_mvdream_runs_and_is_scored(monkeypatch, capsys, tmp_path):
    """Acceptance: `dream3d run "a red cube" --prior toy-mvdream` on the shipped weights, then `dream3d eval`."""
    from dream3d.guidance.priors.mvdream import MVDreamPrior
    from dream3d.guidance.priors.toy_mvdream import SHIPPED_MODEL

    size = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    assert (SHIPPED_MODEL / "README.md").is_file() and size < 20 * 2**20
    prior = build_prior(build_config({"prompt": "a red cube", "prior": "toy-mvdream"}))
    assert isinstance(prior, MVDreamPrior) and isinstance(prior.unet, MultiViewUNet) and prior.resolution == 32
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--prior", "toy-mvdream")
    status, err = dream3d(monkeypatch, capsys, "eval", run_dir)
    assert status == 0, err
    scores = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert 0 <= scores["iou"] <= 1 and scores["matched_class"] == "red cube"
