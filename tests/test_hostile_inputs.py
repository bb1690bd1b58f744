"""Every command fed hostile input: exactly one line on stderr, exit 1 (2 for a malformed command
line), and nothing written, neither under --out nor anywhere else in the working folder.

The commands run in-process through ``cli.main`` (as the ``dream3d`` script does); every case is
refused before any training starts, so the whole table takes seconds.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from dream3d import api, cli
from dream3d.config import build_config
from tests.support import TINY

HUGE = str(10**26)
BINARY = bytes(range(256)) * 4  # not UTF-8, NUL bytes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with one finished tiny run and the hostile files the cases name."""
    root = tmp_path_factory.mktemp("hostile")
    quick = {"steps": 5, "checkpoint_every": 5, "export": {**TINY["export"], "video": False, "formats": ["glb"]}}
    api.run(build_config(TINY, quick, {"prompt": "a red cube", "out": str(root / "runs")}))
    (run,) = (root / "runs").iterdir()
    run = run.rename(root / "run")
    (root / "runs").rmdir()
    (root / "binary.bin").write_bytes(BINARY)
    (root / "a-folder").mkdir()
    (root / "prompts.txt").write_text("a red cube\n")
    (root / "nan.yaml").write_text("optim:\n  lr_scale: .nan\n")
    (root / "unknown.yaml").write_text("nope: 1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "bad.jsonl").write_text('{"prompt": "a red cube", "steps": 1e400}\n')
    for name, change in {"binary-config": None, "no-config": "", "no-checkpoint": "checkpoints"}.items():
        shutil.copytree(run, root / name)
        if change is None:
            (root / name / "config.yaml").write_bytes(BINARY)
        elif change == "":
            (root / name / "config.yaml").unlink()
        else:
            shutil.rmtree(root / name / change)
    return root


RUN_FLAGS = [
    (["--seed", HUGE], 1, "seed: the seed must lie in"),
    (["--seed", "-" + HUGE], 1, "seed: the seed must lie in"),
    (["--resolution", "100000"], 1, "would need about"),
    (["--resolution", "0"], 1, "resolution must be positive"),
    (["--steps", HUGE], 1, "at most 999999 steps"),
    (["--steps", "-5"], 1, "steps: Input should be greater than 0"),
    (["--steps", "1.5"], 2, "Invalid value for '--steps'"),
    (["--steps", "nan"], 2, "Invalid value for '--steps'"),
    (["--particles", "100000"], 1, "particles: Input should be less than or equal to 64"),
    (["--particles", "0"], 1, "particles: Input should be greater than or equal to 1"),
    (["--repulsion", "nan", "--particles", "3"], 1, "repulsion.weight: "),
    (["--repulsion", "inf", "--particles", "3"], 1, "must be a finite number, got inf"),
    (["optim.lr_scale=.nan"], 1, "optim.lr_scale: must be a finite number, got nan"),
    (["optim.lr_scale=-.inf"], 1, "optim.lr_scale: must be a finite number, got -inf"),
    (["sds.guidance_scale=.nan"], 1, "must be a finite number, got nan"),
    (["background=[.nan, 1, 1]"], 1, "background[0]: must be a finite number, got nan"),
    (["export.video_resolution=33"], 1, "export.video_resolution: the video resolution must be even"),
    (["export.video_resolution=1000000"], 1, "would need about"),
    (["export.mesh_resolution=2000"], 1, "export.mesh_resolution: a mesh resolution of 2000 would need about"),
    (["camera.batch_size=100000", "--resolution", "512"], 1, "would need about"),
    (["export.formats=[stl]"], 1, "unknown export format 'stl'"),
    (["export.texture_size=100000"], 1, "export.texture_size: Input should be less than or equal to 4096"),
    (["no.such.key=1"], 1, "no: unknown key"),
    (["steps"], 1, "is not key=value"),
    (["--config", "{world}/binary.bin"], 1, "is not UTF-8 text"),
    (["--config", "{world}/a-folder"], 1, "cannot read config"),
    (["--config", "{world}/missing.yaml"], 1, "cannot read config"),
    (["--config", "{world}/nan.yaml"], 1, "optim.lr_scale: must be a finite number, got nan"),
    (["--config", "{world}/unknown.yaml"], 1, "nope: unknown key"),
    (["--config", "{world}/list.yaml"], 1, "must be a mapping"),
    (["--init-points", "{world}/prompts.txt"], 1, "--init-points (gaussians.init_points) starts the gaussians"),
    (["--init-points", "{world}/missing.ply", "--representation", "gaussians"], 1, "does not exist"),
    (["--init-points", "{world}/a-folder", "--representation", "gaussians"], 1, "does not exist"),
    (["--no-such-flag"], 2, "No such option"),
]

CASES = [
    *[(["run", "a red cube", "--out", "{out}", *flags], code, text) for flags, code, text in RUN_FLAGS],
    (["run", "zq" * 1_000_000, "--out", "{out}"], 1, "the prompt is 2000000 characters long; the limit is 1000"),
    (["run", "a red zq" + "q" * 900, "--out", "{out}"], 1, "does not know"),
    (["run", "   ", "--out", "{out}"], 1, "the prompt is empty"),
    (["run", "a red cube", "--out", "{world}/binary.bin/x"], 1, "cannot write to output folder"),
    (["resume", "{world}/missing"], 1, "is not a dream3d run folder"),
    (["resume", "{world}/binary.bin"], 1, "is not a dream3d run folder"),
    (["resume", "{world}/no-config"], 1, "is not a dream3d run folder"),
    (["resume", "{world}/binary-config"], 1, "is not UTF-8 text"),
    (["resume", "{world}/no-checkpoint"], 1, "has no checkpoint"),
    (["export", "{world}/run", "--resolution", "2000"], 1, "a mesh resolution of 2000 would need about"),
    (["export", "{world}/run", "--resolution", HUGE], 1, "would need about"),
    (["export", "{world}/run", "--resolution", "4"], 1, "mesh_resolution: Input should be greater than 8"),
    (["export", "{world}/run", "--formats", "glb,stl"], 1, "unknown export format 'stl'"),
    (["export", "{world}/run", "--threshold", "nan"], 1, "--threshold must be a finite number"),
    (["export", "{world}/binary-config"], 1, "is not UTF-8 text"),
    (["export", "{world}/no-checkpoint"], 1, "has no checkpoint"),
    (["export", "{world}/missing"], 1, "is not a dream3d run folder"),
    (["eval", "{world}/binary-config"], 1, "is not UTF-8 text"),
    (["eval", "{world}/no-config"], 1, "is not a dream3d run folder"),
    (["eval", "{world}/no-checkpoint"], 1, "has no checkpoint"),
    (["batch", "{world}/binary.bin", "--out", "{out}"], 1, "cannot read batch file"),
    (["batch", "{world}/missing.txt", "--out", "{out}"], 1, "cannot read batch file"),
    (["batch", "{world}/a-folder", "--out", "{out}"], 1, "cannot read batch file"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--workers", "0"], 1, "--workers must be at least 1"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--retries", "-1"], 1, "--retries must be 0 or more"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--config", "{world}/binary.bin"], 1, "is not UTF-8 text"),
    (["batch", "{world}/prompts.txt", "--out", "{out}", "--status"], 1, "no batch has run"),
    (["bench", "--seeds", "x", "--out", "{out}"], 1, "seeds must be comma-separated integers, got 'x'"),
    (["bench", "--seeds", HUGE, "--out", "{out}"], 1, "seed: the seed must lie in"),
    (["bench", "--out", "{out}", "optim.lr_scale=.nan"], 1, "optim.lr_scale: must be a finite number"),
    (["bench", "--out", "{out}", "nope=1"], 1, "nope: unknown key"),
    (["bench-guidance", "--seeds", "x", "--out", "{out}"], 1, "seeds must be comma-separated integers"),
    (["bench-guidance", "--rules", "magic", "--out", "{out}"], 1, "magic"),
    (["bench-guidance", "--representations", "mesh", "--out", "{out}"], 1, "mesh"),
    (["bench-guidance", "--steps", "0", "--out", "{out}"], 1, "steps"),
    (["bench-guidance", "--steps", HUGE, "--out", "{out}"], 1, "steps"),
    (["bench-guidance", "--particles", "0", "--out", "{out}"], 1, "particles"),
    (["bench-guidance", "--out", "{out}", "optim.lr_scale=.nan"], 1, "must be a finite number"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--n", "0"], 1, "n: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--n", HUGE], 1, "n: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--steps", "0"], 1, "steps: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--steps", HUGE], 1, "steps: "),
    (["sample", "a red cube", "--out", "{out}/s.png", "--seed", HUGE], 1, "seed: the seed must lie in"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--elevation", "nan"], 1, "elevation: Input should be a finite number"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--guidance-scale", "inf"], 1, "finite number"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--prior", "sd"], 1, "not in the Hugging Face cache"),
    (["sample", "a red cube", "--out", "{out}/s.png", "--model", "{world}/a-folder"], 1, ""),
    (["sample", "a red cube", "--out", "{out}/s.png", "--model", "{world}/binary.bin"], 1, ""),
    (["train-prior", "--out", "{out}/m", "--steps", "0"], 1, "steps: "),
    (["train-prior", "--out", "{out}/m", "--steps", HUGE], 1, "steps: "),
    (["train-prior", "--out", "{out}/m", "--seed", HUGE], 1, "seed: the seed must lie in"),
    (["train-prior", "--out", "{out}/m", "--threads", "0"], 1, "--threads must be at least 1"),
    (["eval-prior", "--views", "0", "--out", "{out}/r.json"], 1, "views: "),
    (["eval-prior", "--views", HUGE, "--out", "{out}/r.json"], 1, "samples would need about"),
    (["eval-prior", "--steps", "-1", "--out", "{out}/r.json"], 1, "steps: "),
    (["eval-prior", "--guidance-scale", "nan", "--out", "{out}/r.json"], 1, "finite number"),
    (["eval-prior", "--seed", HUGE, "--out", "{out}/r.json"], 1, "seed: the seed must lie in"),
    (["eval-prior", "--model", "{world}/binary.bin", "--out", "{out}/r.json"], 1, ""),
    (["no-such-command"], 2, "No such command"),
]


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("args, code, text", CASES, ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else None)
def test_hostile_input_is_one_line_and_writes_nothing(world, tmp_path, monkeypatch, capsys, args, code, text):
    monkeypatch.chdir(tmp_path)  # defaults such as runs/, bench/, samples.png would land here
    out = tmp_path / "out"
    argv = [a.replace("{world}", str(world)).replace("{out}", str(out)) for a in args]
    before = _listing(world)
    monkeypatch.setattr(sys, "argv", ["dream3d", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == code, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000, err[-2000:]
    assert text in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "wrote into the working folder or under --out"
    assert _listing(world) == before, "changed the run folders it was given"


FORMS = [
    (dict(steps=10**12), "steps: "),
    (dict(steps=5000), "this server runs at most 2000 steps"),
    (dict(steps=-1), "steps: Input should be greater than 0"),
    (dict(steps=float("nan")), "steps: must be a whole number, got nan"),
    (dict(seed=10**26), "seed: the seed must lie in"),
    (dict(seed=float("inf")), "seed: must be a whole number, got inf"),
    (dict(resolution="100000"), "resolution 100000 would need about"),
    (dict(resolution="[16, 100000]"), "resolution 100000 would need about"),
    (dict(resolution="{a: 1}"), "resolution"),
    (dict(resolution="[16"), "is neither a number nor a list of numbers"),
    (dict(lr_scale=float("nan")), "optim.lr_scale: must be a finite number, got nan"),
    (dict(guidance_scale=float("-inf")), "must be a finite number, got -inf"),
    (dict(particles=10**9, guidance="vsd", prior="toy-unet-mv"), "particles"),
    (dict(prompt="x" * 10**6), "the prompt is 1000000 characters long"),
    (dict(prompt=""), "the prompt is empty"),
    (dict(prior="sd9"), "unknown prior 'sd9'"),
    (dict(overrides="export.video_resolution=33"), "export.video_resolution: the video resolution must be even"),
    (dict(overrides="export.mesh_resolution=100000"), "export.mesh_resolution: a mesh resolution of 100000"),
    (dict(overrides="optim.lr_scale=.inf"), "optim.lr_scale: must be a finite number, got inf"),
    (dict(overrides="gaussians.init_points=/etc/passwd"), "--init-points (gaussians.init_points) starts the gaussians"),
    (dict(overrides="no.such=1"), "no: unknown key"),
    (dict(overrides="\x00=1"), "unknown key"),
]


@pytest.mark.parametrize("values, text", FORMS, ids=lambda v: str(v)[:60] if isinstance(v, dict) else None)
def test_hostile_form_is_one_line(tmp_path, values, text):
    from dream3d.config import ConfigError
    from dream3d.web.app import WebSettings
    from dream3d.web.form import FormValues, config_from_form

    settings = WebSettings(out=str(tmp_path / "runs"))
    form = FormValues(**{"prompt": "a red cube", "prior": "toy", "guidance": "sds", "representation": "nerf", **values})
    with pytest.raises(ConfigError) as error:
        config_from_form(form, settings.base_layer(), settings.out, 10**7, settings.max_steps)
    assert text in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) < 1000
    assert list(tmp_path.iterdir()) == []
