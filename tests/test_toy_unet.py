"""The trained toy prior: its training (loss, checkpoint/resume), its tokenizer, and the shipped folder
loaded through the generic pixel prior loader, as `dream3d run --prior toy-unet(-mv)` loads it."""

import json
import shutil

import pytest
import torch

from dream3d import api
from dream3d.run.build import build_prior
from dream3d.config import build_config
from dream3d.toy.train_unet import PriorTrainer, TrainPriorConfig, train_prior
from dream3d.guidance.priors.base import PriorError
from dream3d.guidance.priors.ddim import ddim_sample
from dream3d.guidance.priors.toy_unet import SHIPPED_MODEL, ToyUNetArch
from dream3d.representations.cameras import look_at_cameras
from tests.support import dream3d

TINY_ARCH = ToyUNetArch(resolution=16, block_out_channels=(8, 16), norm_num_groups=4, attention_heads=2, text_dim=16,
                        text_layers=1)
TINY = TrainPriorConfig(steps=4, batch_size=4, warmup_steps=0, pool_views=8, supersample=1, checkpoint_every=2,
                        arch=TINY_ARCH)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread: on a busy shared machine two threads of these small convolutions wait on each other
    (steps ran 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model trained for 4 steps: a toy-unet folder with the shipped layout."""
    root = tmp_path_factory.mktemp("toy-unet")
    train_prior(TINY, root / "model", root / "checkpoints", False, "dream3d train-prior (test)")
    return root / "model"


def load(prior, model=None):
    return build_prior(build_config({"prompt": "a red cube", "prior": prior, **({"model": str(model)} if model else {})}))


def cameras(azimuths, size=16):
    az = torch.tensor(azimuths, dtype=torch.float32)
    return look_at_cameras(torch.full_like(az, 20.0), az, torch.full_like(az, 2.5), 45.0, size, size)


def test_a_few_steps_reduce_the_loss():
    trainer = PriorTrainer(TINY.model_copy(update={"batch_size": 8}))

    def held_out() -> float:
        with torch.no_grad():
            return sum(trainer.loss(torch.Generator().manual_seed(s)).item() for s in range(4)) / 4

    before = held_out()
    for _ in range(10):
        trainer.train_step()
    assert held_out() < 0.8 * before


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = train_prior(TINY, tmp_path / "a", tmp_path / "a-ck", False, "x")
    train_prior(TINY.model_copy(update={"steps": 2}), tmp_path / "b", tmp_path / "b-ck", False, "x")
    resumed = train_prior(TINY, tmp_path / "b", tmp_path / "b-ck", True, "x")
    assert resumed.step == straight.step == 4
    for a, b in zip(straight.state_dict()["unet"].values(), resumed.state_dict()["unet"].values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    assert (tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_training_refuses_to_overwrite_or_resume_nothing(tmp_path, tiny_model):
    from dream3d.config import ConfigError

    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train_prior(TINY, tmp_path / "m", tmp_path / "ck", True, "x")
    train_prior(TINY.model_copy(update={"steps": 2}), tmp_path / "m", tmp_path / "ck", False, "x")
    with pytest.raises(ConfigError, match="already holds training checkpoints"):
        train_prior(TINY, tmp_path / "m", tmp_path / "ck", False, "x")
    with pytest.raises(ConfigError, match="another configuration"):
        train_prior(TINY.model_copy(update={"lr": 0.5}), tmp_path / "m", tmp_path / "ck", True, "x")


def test_tokenizer_rejects_unknown_words_listing_the_vocabulary(tiny_model):
    prior = load("toy-unet", tiny_model)
    with pytest.raises(PriorError) as error:
        prior.embed("a red banana")
    message = str(error.value)
    assert "'banana'" in message and "red green blue" in message and "pyramid" in message and "\n" not in message
    prior.embed("The RED cube, front view")  # case and punctuation are the tokenizer's business


def test_cli_rejects_an_unknown_word_in_one_line(monkeypatch, capsys, tiny_model, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "run", "a red banana", "--prior", "toy-unet-mv", "--model", tiny_model,
                          "--out", tmp_path)
    assert status == 1 and "does not know 'banana'" in err and "sphere cube" in err and len(err.splitlines()) == 1


def test_camera_conditioning_is_declared_by_the_folder(tiny_model):
    mv, free = load("toy-unet-mv", tiny_model), load("toy-unet", tiny_model)
    assert mv.camera_features == ("elevation_rad", "sin_azimuth", "cos_azimuth")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    states = mv.embed("a red cube").cond.expand(2, -1, -1)
    cams = cameras([0.0, 90.0])
    assert torch.equal(free.predict_noise(x, t, states, cams), free.predict_noise(x, t, states, None))
    assert not torch.allclose(mv.predict_noise(x, t, states, cams), mv.predict_noise(x, t, states, None))
    labels = mv.camera_labels(cams, 2)
    assert torch.allclose(labels[1], torch.tensor([torch.deg2rad(torch.tensor(20.0)), 1.0, 0.0]), atol=1e-6)


def test_an_unknown_camera_feature_is_refused(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_camera_features": ["roll", "a", "b"]}))
    with pytest.raises(PriorError, match="unknown camera features roll"):
        load("toy-unet-mv", folder)


def test_the_shipped_model_loads_offline_and_samples():
    assert (SHIPPED_MODEL / "README.md").is_file()
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    prior = load("toy-unet-mv")
    assert prior.folder == SHIPPED_MODEL and prior.resolution == 32
    images = ddim_sample(prior, ["a red cube"] * 2, cameras([0.0, 180.0], 32), steps=5,
                         generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("prior", ["toy-unet", "toy-unet-mv"])
def test_run_end_to_end_on_the_shipped_model(prior, tiny):
    result = api.run(build_config({"prompt": "a red cube", "prior": prior}, tiny, {"steps": 5}))
    assert (result.run_dir / "summary.json").is_file()


def test_cli_sample_writes_a_row_of_images(monkeypatch, capsys, tiny_model, tmp_path):
    import imageio.v3 as iio

    status, err = dream3d(monkeypatch, capsys, "sample", "a red cube", "--model", tiny_model, "--n", 2, "--steps", 3,
                          "--out", tmp_path / "s.png")
    assert status == 0, err
    assert iio.imread(tmp_path / "s.png").shape == (16, 32, 3)


def test_cli_train_prior_resume_needs_a_checkpoint(monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "train-prior", "--out", tmp_path / "m", "--checkpoints", tmp_path / "ck",
                          "--resume")
    assert status == 1 and "no checkpoint" in err and len(err.splitlines()) == 1
