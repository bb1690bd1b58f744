"""Staged runs (config ``stages``) and recipes: both stages run and export, a resume inside either stage (or at the
boundary between them) ends where an uninterrupted run does, bad stages and recipes fail in one line before any
folder exists, and every shipped recipe runs end to end on a toy prior at tiny sizes."""

import json
import re
import shutil
import sys

import pytest
import torch

from dream3d import api, cli, registry
from dream3d.batch.batch_file import BatchFileError, read_jobs
from dream3d.config import ConfigError, build_config, load_yaml, parse_overrides
from dream3d.config.recipes import recipe_names
from dream3d.representations.gaussians import Gaussians, GaussiansConfig
from dream3d.representations.nerf import NeRF, NeRFConfig
from dream3d.run.loop import RunInterrupted
from dream3d.web.form import NO_RECIPE, FormValues, config_from_form
from tests.support import TINY, assert_same, dream3d, final_params, metrics

# export the cheapest way: the loop, not the mesh, is under test
FAST_EXPORT = {"export": {"formats": ["ply"], "texture": False, "video": False, "solid": "none", "mesh_resolution": 16}}
TWO_STAGES = [{"name": "coarse", "steps": 4}, {"name": "fine", "steps": 4, "resolution": 24, "nerf": {"num_samples": 16}}]


def two_stage_layers(out, **extra):
    return [TINY, FAST_EXPORT, {"prompt": "a red cube", "prior": "toy-mv", "out": str(out), "checkpoint_every": 2,
                                "preview_every": 2, "stages": TWO_STAGES, **extra}]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    events = []
    result = api.run(build_config(*two_stage_layers(out)), on_event=events.append)
    return result, events


def test_a_two_stage_run_runs_both_stages_in_their_folders_and_exports(uninterrupted):
    result, events = uninterrupted
    run = result.run_dir
    assert [p.name for p in sorted((run / "stages").iterdir())] == ["0-coarse", "1-fine"]
    assert [p.name for p in sorted((run / "stages" / "1-fine" / "checkpoints").iterdir())] == ["step_000002.pt",
                                                                                                "step_000004.pt"]
    assert not (run / "checkpoints").exists()
    logged = metrics(run)
    assert [(m["stage"], m["step"]) for m in logged] == [("coarse", s) for s in range(1, 5)] + [("fine", s) for s in range(1, 5)]
    steps = [(e.stage, e.step, e.total) for e in events if e.kind == "step"]
    assert steps == [("coarse", s, 8) for s in range(1, 5)] + [("fine", s, 8) for s in range(5, 9)]
    assert [(e.stage_index, e.stages) for e in events if e.kind == "stage"] == [(0, 2), (1, 2)]
    assert (run / "export" / "model.ply").stat().st_size > 0
    assert [s["name"] for s in result.summary["stages"]] == ["coarse", "fine"] and result.summary["steps"] == 8
    assert result.preview.name == "stage_1_step_000004.png"
    # the second stage went on from the first: its field is not a fresh one, and not the first stage's either
    coarse = torch.load(run / "stages" / "0-coarse" / "checkpoints" / "step_000004.pt", weights_only=True)
    fine = final_params(run)
    fresh = NeRF(NeRFConfig(**TINY["nerf"])).state_dict()
    assert not torch.equal(fine["grids.0"], fresh["grids.0"]) and not torch.equal(fine["grids.0"], coarse["representation"]["grids.0"])
    # config.yaml holds the resolved stages: a re-read config is the same run
    assert build_config(load_yaml(run / "config.yaml")).stages == TWO_STAGES


@pytest.mark.parametrize("stops, crash", [(2, False), (6, False), (4, True)],
                         ids=["in-stage-0", "in-stage-1", "crash-at-the-boundary"])
def test_a_resume_inside_either_stage_ends_where_an_uninterrupted_run_does(tmp_path, uninterrupted, stops, crash):
    stop = iter([False] * stops + [True])
    with pytest.raises(RunInterrupted, match="of stage"):
        api.run(build_config(*two_stage_layers(tmp_path)), should_stop=lambda: next(stop))
    (run,) = tmp_path.iterdir()
    if crash:  # killed after the first stage's last checkpoint, before the second stage's first
        shutil.rmtree(run / "stages" / "1-fine")
    api.resume(run)
    whole = uninterrupted[0].run_dir
    assert_same(final_params(run), final_params(whole))
    assert metrics(run) == metrics(whole)


def test_eval_stages_scores_each_stages_final_representation(monkeypatch, capsys, uninterrupted):
    run = uninterrupted[0].run_dir
    scored = []

    def score(representation, prompt, background):  # the toy-world scores are tested elsewhere; these are which
        scored.append(representation.state_dict()["grids.0"].clone())
        return {"iou": float(len(scored))}

    monkeypatch.setattr(api, "evaluate_representation", score)
    meshes = []  # each stage's mesh, as its export settings make it
    monkeypatch.setattr(api, "evaluate_mesh_3d", lambda mesh, prompt: meshes.append(mesh) or {"faces": len(mesh.faces)})
    status, err = dream3d(monkeypatch, capsys, "eval", run, "--stages")
    assert status == 0, err
    stage_final = [torch.load(run / "stages" / name / "checkpoints" / "step_000004.pt", weights_only=True)
                   ["representation"]["grids.0"] for name in ("0-coarse", "1-fine")]
    assert [torch.equal(a, b) for a, b in zip(scored, [stage_final[1], *stage_final])] == [True] * 3
    summary = json.loads((run / "summary.json").read_text())
    faces = [len(m.faces) for m in meshes[-2:]]
    assert min(faces) > 0 and summary["eval"]["iou"] == 1.0
    assert summary["eval_stages"] == {"coarse": {"iou": 2.0, "faces": faces[0]}, "fine": {"iou": 3.0, "faces": faces[1]}}


@pytest.mark.parametrize("stage, message", [
    ({"name": "geometry", "representation": "no-such"}, "stages[1] (geometry): representation: unknown representation 'no-such'"),
    ({"name": "geometry", "steps": -3}, "stages[1] (geometry): steps: Input should be greater than 0"),
    ({"name": "geometry", "seed": 3}, "stages[1] (geometry): seed: a setting of the whole run"),
    ({"name": "coarse"}, "stages[1] (coarse): the name 'coarse' is taken"),
    ({"name": "geometry", "loss": {"lambda_normal_consistency": 1}},
     "stages[1] (geometry): loss.lambda_normal_consistency weights a regulariser the nerf representation does not"),
])
def test_a_bad_stage_is_one_line_naming_it_before_any_folder(monkeypatch, capsys, tmp_path, stage, message):
    stages = json.dumps([{"name": "coarse"}, stage])
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--out", tmp_path / "runs", f"stages={stages}")
    assert status == 1 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_stage_that_cannot_start_from_the_previous_is_refused_before_any_folder(tmp_path):
    layers = two_stage_layers(tmp_path / "runs")
    layers[-1]["stages"] = [{"name": "splats", "representation": "gaussians"}, {"name": "field", "representation": "nerf"}]
    with pytest.raises(ConfigError, match=r"stages\[1\] \(field\): init: NeRF cannot start from Gaussians"):
        api.start(build_config(*layers))
    assert not (tmp_path / "runs").exists()


def test_gaussians_start_where_a_nerfs_density_is():
    nerf = NeRF(NeRFConfig(grid_resolutions=[8]))
    with torch.no_grad():  # a dense red ball at (0.5, 0, 0), nothing elsewhere
        axis = torch.linspace(-1, 1, 8)
        z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
        ball = ((x - 0.5) ** 2 + y**2 + z**2).sqrt() < 0.35
        nerf.grids[0][0, 0] = torch.where(ball, 20.0, -30.0)
        nerf.grids[0][0, 1:] = torch.tensor([4.0, -4.0, -4.0]).view(3, 1, 1, 1)
    cfg = NeRFConfig(grid_resolutions=[8], blob_density=0.0)
    nerf.cfg = cfg
    splats = Gaussians(GaussiansConfig(num_points=200), generator=torch.Generator().manual_seed(0))
    splats.init_from(nerf)
    means = splats.params["means"].detach()
    assert len(splats) == 200 and (means - torch.tensor([0.5, 0.0, 0.0])).norm(dim=1).median() < 0.4
    assert splats.colors.detach().mean(0).argmax() == 0  # red, from the NeRF's albedo


def test_a_nerf_starts_from_a_nerf_of_its_field_only():
    first, second = NeRF(NeRFConfig(grid_resolutions=[8, 16])), NeRF(NeRFConfig(grid_resolutions=[8, 16]))
    with torch.no_grad():
        first.grids[1].normal_()
    second.init_from(first)
    assert torch.equal(second.grids[1], first.grids[1])
    with pytest.raises(ValueError, match="same field"):
        NeRF(NeRFConfig(grid_resolutions=[8])).init_from(first)


def test_indexed_overrides_and_stage_lists_merge_by_index():
    cfg = build_config({"prompt": "a red cube", "prior": "toy-mv", "stages": TWO_STAGES},
                       parse_overrides(["stages[1].steps=7", "stages[0].nerf.lr=0.5"]))
    assert [c.steps for c in cfg.stage_configs()] == [4, 7] and cfg.stage_configs()[0].nerf.lr == 0.5
    assert cfg.stages[1]["resolution"] == 24  # the rest of the stage stays
    with pytest.raises(ConfigError, match="index 100 is above"):
        parse_overrides(["stages[100].steps=1"])


def test_an_unknown_recipe_is_one_line_listing_the_shipped_ones(monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--recipe", "no-such", "--out", tmp_path / "runs")
    assert status == 1 and "unknown recipe 'no-such'; valid: " in err and len(err.splitlines()) == 1
    assert all(name in err for name in recipe_names()) and not (tmp_path / "runs").exists()


def test_recipes_lists_every_shipped_recipe_with_its_stages(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dream3d", "recipes"])
    cli.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(recipe_names()) and lines
    for line in lines:  # name: stage: representation/rule/steps, ...  (description)
        assert re.fullmatch(r"[a-z0-9-]+: ([a-z0-9_-]+: [a-z0-9_-]+/[a-z0-9_-]+/\d+(, )?)+  \(.+\)", line), line


def test_a_recipe_file_lays_its_stages_under_the_config_and_its_toy_block_for_a_toy_prior(tmp_path):
    recipe = tmp_path / "pair.yaml"
    recipe.write_text("description: two NeRF stages\nanchor: none\nprior: sd\nsteps: 900\n"
                      "stages: [{name: coarse, steps: 1000, resolution: 64}, {name: fine, steps: 500}]\n"
                      "toy: {stages: [{steps: 3}, {steps: 2}]}\n")
    toy = build_config({"prompt": "a red cube", "recipe": str(recipe), "prior": "toy-mv"})
    assert toy.prior == "toy-mv" and [c.steps for c in toy.stage_configs()] == [3, 2]
    assert toy.stage_configs()[0].resolution == 64 and "recipe" not in toy.model_dump()
    real = build_config({"prompt": "a red cube", "recipe": str(recipe)}, {"stages": [{}, {"steps": 8}]})
    assert real.prior == "sd" and [c.steps for c in real.stage_configs()] == [1000, 8]


def test_a_batch_job_and_the_web_form_name_a_recipe(tmp_path):
    name = recipe_names()[0]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red cube", "recipe": name, "prior": "toy-mv"}) + "\n")
    (job,) = read_jobs(jobs)
    expected = build_config({"prompt": "a red cube", "recipe": name, "prior": "toy-mv"})
    assert build_config(job.settings) == expected
    jobs.write_text(json.dumps({"prompt": "a red cube", "recipe": 3}) + "\n")
    with pytest.raises(BatchFileError, match="recipe"):
        read_jobs(jobs)
    form = FormValues("a red cube", "toy-mv", "csd", "gaussians", recipe=name)
    assert config_from_form(form, {}, str(tmp_path), 200).model_dump(exclude={"out"}) == \
        expected.model_dump(exclude={"out"})
    plain = config_from_form(FormValues("a red cube", "toy-mv", "csd", "gaussians", recipe=NO_RECIPE), {}, "runs", 200)
    assert plain.guidance == "csd" and not plain.stages


def _tiny_layer(count: int) -> dict:
    stage = {"steps": 2, "resolution": 16, "resolution_milestones": [], "checkpoint_every": 2, "preview_every": 2,
             "nerf": {"grid_resolutions": [8], "num_samples": 16, "occupancy_resolution": 8, "encoding": "dense"},
             "gaussians": {"num_points": 64, "max_gaussians": 256}, "refine": {"steps": 0}}
    run = {**stage, **FAST_EXPORT}
    return {**run, "stages": [dict(stage) for _ in range(count)]} if count else run


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_runs_end_to_end_on_a_toy_prior(tmp_path, name):
    recipe = load_yaml(f"{api.__file__.rsplit('/', 1)[0]}/recipes/{name}.yaml")
    layers = [{"prompt": "a red cube", "recipe": name, "out": str(tmp_path)}]
    needs_unet = any(registry.RULES[g].needs_unet for g in
                     {recipe.get("guidance", "sds"), *(s.get("guidance", "sds") for s in recipe.get("stages", []))})
    representations = {recipe.get("representation"), *(s.get("representation") for s in recipe.get("stages", []))}
    missing = [r for r in representations if r is not None and r not in registry.REPRESENTATIONS]
    if missing:
        pytest.skip(f"representation {missing[0]} is not registered yet")
    views = registry.PRIORS[recipe.get("prior", "sd")].views
    prior = "toy-mvdream" if views > 1 else "toy-unet-mv" if needs_unet else "toy-mv"
    cfg = build_config(*layers, {"prior": prior}, _tiny_layer(len(recipe.get("stages", []))))
    result = api.run(cfg)
    assert (result.run_dir / "export" / "model.ply").stat().st_size > 0
    assert result.summary["steps"] == 2 * max(len(cfg.stages), 1)


def test_magic3d_on_a_toy_prior_runs_its_nerf_then_its_dmtet_and_exports(monkeypatch, capsys, tmp_path):
    if "dmtet" not in registry.REPRESENTATIONS:
        pytest.skip("dmtet is not registered yet")
    tiny = [f"stages[{i}].{key}" for i in (0, 1) for key in ("steps=2", "resolution=16", "resolution_milestones=[]")]
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--recipe", "magic3d", "--prior", "toy-mv", "--out",
                          tmp_path, *tiny, "stages[0].nerf.grid_resolutions=[8]", "stages[0].nerf.num_samples=16",
                          "stages[1].dmtet.resolution=8", "export.formats=[ply]", "export.texture=false",
                          "export.video=false", "export.mesh_resolution=16")
    assert status == 0, err
    (run,) = tmp_path.iterdir()
    assert [p.name for p in sorted((run / "stages").iterdir())] == ["0-coarse", "1-geometry"]
    logged = metrics(run)
    assert [m["stage"] for m in logged] == ["coarse"] * 2 + ["geometry"] * 2
    assert all("loss_normal_consistency" in m for m in logged[2:])
    assert (run / "export" / "model.ply").stat().st_size > 0


@pytest.mark.parametrize("name", ["stages", "stages/1-fine/checkpoints"])
@pytest.mark.parametrize("command", [["eval", "--stages"], ["export", "--formats", "ply"], ["resume"]])
def test_a_stage_folder_linked_out_of_the_run_is_refused_and_nothing_outside_changes(
        monkeypatch, capsys, tmp_path, uninterrupted, name, command):
    """docs/security.md's run-folder rule holds for a staged run's stages/ and each stage's checkpoints/."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0].run_dir, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(run / name, outside / "moved")
    (run / name).symlink_to(outside / "moved")
    before = {p: p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()}
    status, err = dream3d(monkeypatch, capsys, command[0], run, *command[1:])
    assert status == 1 and len(err.strip().splitlines()) == 1 and "link" in err, err
    assert {p: p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()} == before
