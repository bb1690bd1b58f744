"""The web app's parts without a browser: form -> config, the runs folder, the job queue."""

import json
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from dream3d import api, cli
from dream3d.config import ConfigError, build_config
from dream3d.rundir.result import Result
from dream3d.web.form import FormValues, config_from_form, defaults, guidance_setting, resolution_text
from dream3d.web.queue import JobQueue, run_and_export
from dream3d.web.runs import RunsFolder, obj_zip
from tests.support import TINY


def _form(**values) -> FormValues:
    return FormValues(**{"prompt": "a red cube", "prior": "toy", "guidance": "sds", "representation": "nerf", **values})


def test_form_becomes_the_cli_config(tmp_path):
    values = _form(steps=7, seed=3, resolution="[16, 32]", guidance_scale=5.0, lr_scale=0.5, overrides="sds.weighting=uniform")
    cfg = config_from_form(values, {"resolution_milestones": [3]}, str(tmp_path), max_prompt_chars=50)
    expected = build_config({
        "prompt": "a red cube", "prior": "toy", "steps": 7, "seed": 3, "resolution": [16, 32], "resolution_milestones": [3],
        "sds": {"guidance_scale": 5.0, "weighting": "uniform"}, "optim": {"lr_scale": 0.5}, "out": str(tmp_path),
    })
    assert cfg == expected


def test_form_keeps_runs_in_the_app_folder(tmp_path):
    cfg = config_from_form(_form(overrides="out=/elsewhere"), {}, str(tmp_path), max_prompt_chars=50)
    assert cfg.out == str(tmp_path)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(prompt="a red cube " * 5), "the prompt is 54 characters long; the limit is 20"),
        (dict(steps=0), "steps: Input should be greater than 0"),
        (dict(resolution="[16"), "resolution '[16' is neither a number nor a list of numbers"),
        (dict(particles=0), "particles: Input should be greater than or equal to 1"),
        (dict(overrides="sds.nope=1"), "sds.nope: unknown key"),
    ],
)
def test_bad_form_is_one_line(tmp_path, values, message):
    with pytest.raises(ConfigError) as error:
        config_from_form(_form(**values), {}, str(tmp_path), max_prompt_chars=20)
    assert str(error.value) == message


def test_the_particles_field_sets_the_runs_particles(tmp_path):
    """It used to look for particles inside the rule's section, where no rule has them: the field never showed."""
    cfg = config_from_form(_form(particles=3, guidance="vsd", prior="toy-unet-mv"), {}, str(tmp_path), max_prompt_chars=20)
    assert cfg.particles == 3


def test_advanced_fields_come_from_the_guidance_section():
    assert guidance_setting("sds", ("guidance_scale",)) == "sds.guidance_scale"
    assert guidance_setting("sds", ("no_such_field",)) is None
    assert resolution_text(defaults({})) == "[32, 64]"
    assert resolution_text(defaults({"resolution": 48})) == "48"


def test_runs_folder_serves_only_its_own_files(tmp_path):
    runs = RunsFolder(tmp_path / "runs")
    inside = tmp_path / "runs" / "a-run" / "export" / "model.glb"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"glb")
    (tmp_path / "secret.txt").write_text("no")
    (tmp_path / "runs" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "runs" / "a-run" / "export" / ".model.x.tmp.glb").write_bytes(b"half")
    assert runs.resolve("a-run/export/model.glb") == inside.resolve()
    assert runs.url(inside) == "/download/a-run/export/model.glb"
    for outside in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "a-run/export/.model.x.tmp.glb", "a-run", ""):
        assert runs.resolve(outside) is None, outside


def test_obj_zip_holds_the_obj_and_its_material(tmp_path):
    (tmp_path / "model.obj").write_text("mtllib material.mtl\nv 0 0 0\n")
    (tmp_path / "material.mtl").write_text("newmtl m\nmap_Kd -s 1 1 1 texture.png\n")
    (tmp_path / "texture.png").write_bytes(b"png")
    with zipfile.ZipFile(obj_zip(tmp_path / "model.obj")) as archive:
        assert sorted(archive.namelist()) == ["material.mtl", "model.obj", "texture.png"]
        assert archive.read("model.obj").startswith(b"mtllib")


def test_two_jobs_run_one_after_the_other():
    spans: dict[str, tuple[float, float]] = {}
    release = threading.Event()

    def runner(cfg, on_event, should_stop):
        began = time.monotonic()
        release.wait(5)
        spans[cfg.prompt] = (began, time.monotonic())
        return Result(Path(cfg.prompt))

    jobs = JobQueue(runner)
    first, second = jobs.submit(build_config({"prompt": "first"})), jobs.submit(build_config({"prompt": "second"}))
    assert jobs.snapshot(second).state == "queued" and jobs.snapshot(second).position == 1
    release.set()
    assert jobs.wait(first, 5) and jobs.wait(second, 5)
    assert (first.state, second.state) == ("done", "done")
    assert spans["first"][1] <= spans["second"][0]


def test_user_errors_become_a_jobs_message_and_bugs_a_generic_one():
    def runner(cfg, on_event, should_stop):
        if cfg.prompt == "bad":
            raise ConfigError("one line")
        raise KeyError("boom")

    jobs = JobQueue(runner)
    bad, bug = jobs.submit(build_config({"prompt": "bad"})), jobs.submit(build_config({"prompt": "bug"}))
    assert jobs.wait(bad, 5) and jobs.wait(bug, 5)
    assert (bad.state, bad.error) == ("failed", "one line")
    assert bug.error == "internal error (KeyError); see the server log"


def test_stop_ends_the_run_and_exports_what_it_reached(tiny):
    def runner(cfg, on_event, should_stop):
        def stop_at_step_three(event):
            on_event(event)
            if event.kind == "step" and event.step == 3:
                jobs.stop(job.id)

        return run_and_export(cfg, stop_at_step_three, should_stop)

    jobs = JobQueue(runner)
    job = jobs.submit(build_config(tiny, {"prompt": "a red cube", "steps": 200}))
    assert jobs.wait(job, 120)
    assert job.state == "stopped", job.error
    runs = RunsFolder(Path(tiny["out"]))
    (result,) = runs.runs()
    assert result.run_dir == Path(job.run_dir).resolve()
    assert result.summary["stopped"] is True and result.summary["steps"] == 3
    assert {"glb", "video", "obj_zip"} <= set(runs.downloads(result))


@pytest.mark.parametrize(
    "config_text, message",
    [("steps: [", "does not parse as YAML"), ("nope: 1", "nope: unknown key"), ("steps: 0", "steps: Input should be greater than 0")],
)
def test_web_with_a_bad_config_fails_in_one_line_before_serving(monkeypatch, capsys, tmp_path, config_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    monkeypatch.setattr(sys, "argv", ["dream3d", "web", "--config", str(config), "--out", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and message in err and len(err.splitlines()) == 1


def test_the_web_run_list_and_the_api_give_the_same_record(tiny):
    result = api.run(build_config(tiny, {"prompt": "a red cube", "export": {"formats": ["glb", "obj"], "video": False}}))
    assert RunsFolder(Path(tiny["out"])).runs() == [result]
    assert {"glb", "obj"} <= set(result.files) and result.preview is not None and result.summary["steps"] == TINY["steps"]


def test_a_run_folder_names_no_file_outside_itself_and_a_damaged_one_hides_no_other(tmp_path):
    runs_dir = tmp_path / "runs"
    for name in ("crafted", "damaged"):
        (runs_dir / name / "export").mkdir(parents=True)
        (runs_dir / name / "config.yaml").write_text("prompt: x\n")
    (tmp_path / "secret.glb").write_bytes(b"no")
    (runs_dir / "crafted" / "export" / "model.glb").write_bytes(b"glb")
    (runs_dir / "crafted" / "export" / "link.ply").symlink_to(tmp_path / "secret.glb")
    files = {"glb": "export/model.glb", "obj": "../../secret.glb", "ply": "export/link.ply", "video": "a\u0000b",
             "splats": "config.yaml"}
    (runs_dir / "crafted" / "summary.json").write_text(json.dumps({"files": files}))
    (runs_dir / "damaged" / "summary.json").write_text("{not json")
    by_name = {r.run_dir.name: r for r in RunsFolder(runs_dir).runs()}
    assert by_name["crafted"].files == {"glb": runs_dir.resolve() / "crafted" / "export" / "model.glb"}
    assert (by_name["damaged"].files, by_name["damaged"].summary) == ({}, {})


def test_obj_zip_leaves_out_files_linked_from_outside_the_export_folder(tmp_path):
    export = tmp_path / "runs" / "a-run" / "export"
    export.mkdir(parents=True)
    (tmp_path / "secret.mtl").write_text("newmtl stolen\n")
    (tmp_path / "runs" / "other.png").write_bytes(b"another run's file")
    (export / "model.obj").write_text("mtllib material.mtl\nmtllib linked.mtl\nv 0 0 0\n")
    (export / "material.mtl").write_text("newmtl m\nmap_Kd texture.png\n")
    (export / "linked.mtl").symlink_to(tmp_path / "secret.mtl")
    (export / "texture.png").symlink_to(tmp_path / "runs" / "other.png")
    with zipfile.ZipFile(obj_zip(export / "model.obj")) as archive:
        assert archive.namelist() == ["model.obj", "material.mtl"]


def test_an_obj_linked_from_outside_gets_no_zip(tmp_path):
    export = tmp_path / "runs" / "a-run" / "export"
    export.mkdir(parents=True)
    (tmp_path / "a-run.yaml").write_text("prompt: x\n")
    (export.parent / "config.yaml").write_text("prompt: x\n")
    (tmp_path / "secret.obj").write_text("v 0 0 0\n")
    (export / "model.obj").symlink_to(tmp_path / "secret.obj")
    (export.parent / "summary.json").write_text('{"files": {"obj": "export/model.obj"}}')
    runs = RunsFolder(tmp_path / "runs")
    assert "obj_zip" not in runs.downloads(runs.find("a-run")) and not (export / "model-obj.zip").exists()


@pytest.mark.parametrize("path", ["a" * 100_000, "a\x00b", "a-run/\x00", "../secret.txt", "a/" * 5000 + "x"])
def test_download_of_a_hostile_path_is_refused_not_an_error(tmp_path, path):
    import asyncio

    from starlette.requests import Request

    from dream3d.web.app import download_route

    (tmp_path / "runs" / "a-run").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    route = download_route(RunsFolder(tmp_path / "runs"))
    # the decoded path as the router hands it over (an HTTP client refuses a 100k-character URL itself)
    request = Request({"type": "http", "method": "GET", "headers": [], "path_params": {"path": path}})
    assert asyncio.run(route.endpoint(request)).status_code in (403, 404)


def test_stop_on_a_queued_job_takes_it_out_of_the_line_at_once():
    release, ran = threading.Event(), []

    def runner(cfg, on_event, should_stop):
        ran.append(cfg.prompt)
        release.wait(5)
        return Result(Path(cfg.prompt))

    jobs = JobQueue(runner)
    jobs.submit(build_config({"prompt": "first"}))
    second = jobs.submit(build_config({"prompt": "second"}))
    third = jobs.submit(build_config({"prompt": "third"}))
    assert jobs.stop(second.id)
    assert second.finished and jobs.snapshot(second).state == "stopped" and second.run_dir is None
    assert jobs.snapshot(third).position == 1  # one run ahead of it now, not two
    assert not jobs.stop(second.id)
    release.set()
    assert jobs.wait(third, 5) and ran == ["first", "third"]


def test_the_server_caps_a_visitors_steps(tmp_path):
    with pytest.raises(ConfigError) as error:
        config_from_form(_form(steps=10**12), {}, str(tmp_path), max_prompt_chars=50, max_steps=1000)
    assert str(error.value).startswith("steps: ")
    with pytest.raises(ConfigError, match="this server runs at most 1000 steps"):
        config_from_form(_form(steps=1001), {}, str(tmp_path), max_prompt_chars=50, max_steps=1000)
    assert config_from_form(_form(steps=1000), {}, str(tmp_path), max_prompt_chars=50, max_steps=1000).steps == 1000


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(steps=float("nan")), "steps: must be a whole number, got nan"),
        (dict(seed=float("inf")), "seed: must be a whole number, got inf"),
        (dict(steps=2.5), "steps: must be a whole number, got 2.5"),
        (dict(lr_scale=float("nan")), "optim.lr_scale: must be a finite number, got nan"),
        (dict(seed=10**26), "seed: the seed must lie in"),
        (dict(resolution="100000"), "resolution 100000 would need about"),
        (dict(overrides="export.video_resolution=33"), "export.video_resolution: the video resolution must be even"),
    ],
)
def test_hostile_numbers_in_the_form_are_one_line(tmp_path, values, message):
    with pytest.raises(ConfigError) as error:
        config_from_form(_form(**values), {}, str(tmp_path), max_prompt_chars=50)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_refused_form_leaves_the_finish_handler_nothing_to_update(tmp_path):
    import asyncio

    import gradio as gr

    from dream3d.web.app import WebSettings, build_app

    demo = build_app(WebSettings(out=str(tmp_path)), JobQueue(), RunsFolder(tmp_path))
    finish = next(fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "on_finished")
    assert finish.fn(None) == gr.skip()
    # what the server does with it: before the fix, gradio raised ValueError on the {} it got
    output = asyncio.run(demo.process_api(finish, [None], state=None))
    assert len(output["data"]) == len(finish.outputs)
