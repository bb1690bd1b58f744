"""toy-sd (issue 27): its CLIP tokenizer, its training captions, and ``train-prior --arch sd``'s tiny runs."""

import json
from pathlib import Path

import pytest
import torch

from dream3d.guidance.priors.toy_world import CLASSES
from dream3d.guidance.prompts import VIEWS, view_index, view_prompts
from dream3d.toy.sd_text import NEGATIVE_PROMPTS, CaptionShares, build_tokenizer, caption, class_prompts, save_tokenizer
from dream3d.toy.train_sd import SDTrainer, ToySDArch, TrainSDConfig, pool_cameras, train_sd

# 16 px renders through a factor-2 VAE: 8x8x4 latents, as the random sd-tiny model
TINY = TrainSDConfig(
    steps=4, vae_steps=2, batch_size=4, vae_batch_size=4, warmup_steps=0, pool_views=8, supersample=1,
    checkpoint_every=2, arch=ToySDArch(resolution=16, vae_channels=(8, 16), vae_groups=4, unet_channels=(16, 32),
                                       attention_heads=2, text_dim=16, text_layers=1))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread, as test_toy_unet: two threads of these small convolutions wait on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def toy_texts() -> list[str]:
    prompts = [p for c in range(len(CLASSES)) for p in class_prompts(c)] + [f"the {c.name}" for c in CLASSES]
    return [t for p in prompts for t in (p, *view_prompts(p))]


def test_the_tokenizer_is_clips_and_spells_every_toy_prompt_and_view(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    save_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, CLIPTokenizer) and loaded.get_vocab() == tokenizer.get_vocab()
    vocab = tokenizer.get_vocab()
    for text in toy_texts() + list(NEGATIVE_PROMPTS):
        tokens = tokenizer.tokenize(text)
        assert all(t in vocab for t in tokens), text
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # CLIP's decoding spaces every punctuation mark off its word: equal but for spaces
        assert "".join(tokenizer.decode(ids, skip_special_tokens=True).split()) == "".join(text.split()), text
    # learned merges: every word of the toy grammar is one token
    assert tokenizer.tokenize("a purple pyramid, overhead view") == [
        "a</w>", "purple</w>", "pyramid</w>", ",</w>", "overhead</w>", "view</w>"]
    # text outside the grammar spells as byte pieces, never as an unknown token
    assert all(t in vocab for t in tokenizer.tokenize("an astronaut riding a horse"))


def test_captions_carry_the_view_suffix_of_each_renders_camera():
    trainer = SDTrainer(TINY.model_copy(update={"captions": CaptionShares(unconditional=0, partial=0, view_suffix=1)}))
    cams = trainer.pool.cameras
    views = torch.arange(len(cams))
    captions = trainer.captions(torch.zeros_like(views), views, torch.Generator().manual_seed(0))
    for elevation, azimuth, text in zip(cams.elevation.tolist(), cams.azimuth.tolist(), captions):
        a = abs((azimuth + 180) % 360 - 180)
        expected = "overhead" if elevation > 60 else "front" if a < 45 else "back" if a > 135 else "side"
        assert text == f"a {CLASSES[0].name}, {expected} view"


def test_the_default_pool_teaches_every_view_overhead_included():
    cams = pool_cameras(TrainSDConfig())
    counts = torch.bincount(view_index(cams.elevation, cams.azimuth), minlength=len(VIEWS))
    assert (counts > 0.05 * len(cams)).all(), counts


def test_caption_shares():
    shares = CaptionShares()
    generator = torch.Generator().manual_seed(0)
    captions = [caption(c % len(CLASSES), c % len(VIEWS), generator, shares) for c in range(6000)]
    conditional = [t for t in captions if t]
    assert abs(1 - len(conditional) / len(captions) - shares.unconditional) < 0.015
    suffixed = [t for t in conditional if t.endswith(" view")]
    assert abs(len(suffixed) / len(conditional) - shares.view_suffix) < 0.02
    bare = {t.split(",")[0] for t in conditional}
    partial = [t for t in conditional if t.split(",")[0] not in {class_prompts(c)[0] for c in range(len(CLASSES))}]
    assert abs(len(partial) / len(conditional) - shares.partial) < 0.02
    assert {"a cube", "a red object", "a red shape", "a red cube"} <= bare


def test_tiny_training_resumes_to_the_same_weights_and_writes_an_sd_folder(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    straight = train_sd(TINY, tmp_path / "a", tmp_path / "a-work", False, "dream3d train-prior --arch sd")
    out, work = tmp_path / "b", tmp_path / "b-work"
    for stop_at in (1, 3):  # inside the VAE phase, then inside the UNet phase (the scaling factor is set)
        steps: list[int] = []
        train_sd(TINY, out, work, stop_at == 3, "dream3d train-prior --arch sd", on_step=lambda s: steps.append(s.step),
                 should_stop=lambda: bool(steps) and steps[-1] >= stop_at)
        assert steps[-1] == stop_at and not out.exists()  # no folder before training ends
    resumed = train_sd(TINY, out, work, True, "dream3d train-prior --arch sd --resume")
    assert resumed.step == straight.step == TINY.steps
    assert resumed.scaling_factor == straight.scaling_factor
    for module in ("vae", "unet", "text_encoder"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), module

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline.tokenizer, CLIPTokenizer)
    assert pipeline.vae.config.latent_channels == 4 and pipeline.vae.config.scaling_factor == resumed.scaling_factor
    schedule = pipeline.scheduler.config
    assert (schedule.prediction_type, schedule.beta_schedule, schedule.beta_start, schedule.beta_end,
            schedule.num_train_timesteps, schedule.clip_sample) == ("epsilon", "scaled_linear", 0.00085, 0.012, 1000, False)
    assert not DDIMScheduler.from_config(schedule).config.clip_sample  # a swapped-in sampler leaves latents unclipped
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    images = pipeline("a red cube, back view", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "dream3d train-prior --arch sd --resume" in card and "seed 0, 4 steps" in card
    assert (Path(out) / "tokenizer" / "merges.txt").is_file()


def test_cli_train_prior_takes_arch_sd(monkeypatch, capsys, tmp_path):
    from tests.support import dream3d

    common = ["train-prior", "--arch", "sd", "--out", tmp_path / "m", "--checkpoints", tmp_path / "ck"]
    status, err = dream3d(monkeypatch, capsys, *common, "--resume")
    assert status == 1 and "no checkpoint" in err and len(err.splitlines()) == 1
    status, err = dream3d(monkeypatch, capsys, *common, "--steps", 100)
    assert status == 1 and "vae_steps" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists() and not (tmp_path / "ck").exists()


def test_eval_prior_scores_an_sd_layout_model_through_the_sd_path(monkeypatch, capsys, tmp_path):
    """eval-prior --prior sd samples a toy-sd folder as `--prior sd --model FOLDER` does (a view suffix per camera)
    and reports class accuracy, silhouette IoU and the view accuracy of each view it asked for."""
    from tests.support import dream3d

    train_sd(TINY, tmp_path / "m", tmp_path / "work", False, "dream3d train-prior --arch sd")
    status, err = dream3d(monkeypatch, capsys, "eval-prior", "--prior", "sd", "--model", tmp_path / "m", "--views", 2,
                          "--steps", 2, "--out", tmp_path / "eval.json")
    assert status == 0, err
    results = json.loads((tmp_path / "eval.json").read_text())["sd"]
    assert len(results["correct"]) == 2 * len(CLASSES) and 0 <= results["accuracy"] <= 1
    assert 0 <= results["median_iou"] <= 1 and set(results["view_accuracy"]) <= {"front", "side", "back", "overhead"}


def test_eval_prior_sd_needs_a_model(monkeypatch, capsys):
    from tests.support import dream3d

    status, err = dream3d(monkeypatch, capsys, "eval-prior", "--prior", "sd")
    assert status == 1 and "--model" in err and len(err.splitlines()) == 1


def test_a_short_sds_run_through_toy_sd_ends_with_the_prompted_class(tmp_path):
    """The path most users take, with weights that know something: SDS on `--prior sd --model assets/toy-sd` (VAE
    encode, latent scaling, view suffixes, CFG at SD's 100) for 60 steps makes the prompted object, by the toy
    eval's R-precision (share of views whose nearest class is the prompt's)."""
    from dream3d import api
    from dream3d.config import build_config
    from tests.support import REPO

    cfg = build_config({"prompt": "a blue torus", "prior": "sd", "model": str(REPO / "assets" / "toy-sd"),
                        "steps": 60, "out": str(tmp_path), "export": {"formats": ["glb"], "video": False}})
    scores = api.evaluate(api.run(cfg).run_dir)
    assert scores["matched_class"] == "blue torus" and scores["r_precision"] >= 0.75, scores
