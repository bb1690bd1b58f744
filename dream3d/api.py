"""dream3d's public Python API: the calls the CLI (and the web app) make.

    result = dream3d.generate("a red cube", steps=300, on_event=print)
    result.files["glb"]  # runs/a-red-cube-.../export/model.glb
    result = run(build_config({"prompt": "a red cube"}))  # the same from a RunConfig
"""

from __future__ import annotations

import contextlib
import platform
import resource
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import trimesh

from dream3d.rundir import confine
from dream3d.rundir import folder as rundir
from dream3d.run.build import build_guidance, build_prior, build_representation, model_source
from dream3d.config import ConfigError, RunConfig, build_config, load_yaml, parse_overrides
from dream3d.run.device import resolve_device
from dream3d.eval.scores import albedo_error, evaluate_mesh_3d, evaluate_representation, mesh_iou
from dream3d.export.files import Z_UP_TO_Y_UP, export_representation, texture_image
from dream3d.guidance.priors.base import Prior
from dream3d.representations.base import Representation
from dream3d.run.loop import Progress, RunInterrupted, Trainer, disk_errors
from dream3d.run.stages import (
    StageRunner, check_stages, latest_stage, record_stage, resumed_trainer, stage_info, stage_representation,
)
from dream3d.export.refine import (
    REFINE_STEPS, check_refinable, export_folders, load_textured, refine_texture, textured_mesh, trained_light,
    write_refined,
)
from dream3d.representations.particles import Particles
from dream3d.rundir.result import Result
from dream3d.run.stop import stage

EventHandler = Callable[[Progress], None]
StopCheck = Callable[[], bool]


def generate(
    prompt: str,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    on_event: EventHandler | None = None,
    should_stop: StopCheck | None = None,
    **options: Any,
) -> Result:
    """Makes one asset: the CLI's ``dream3d run`` as a call.

    options are RunConfig fields (``steps=300``, ``prior="toy"``, ``nerf={"lr": 0.05}``);
    layers as on the command line: the YAML ``config`` file, then options, then ``key=value``
    overrides. Bad input raises its one-line error (ConfigError, PriorError, ...) before a
    run folder exists; on_event receives every Progress event (steps, previews, done).
    """
    cfg = build_config(load_yaml(config) if config else {}, {"prompt": prompt, **options}, parse_overrides(list(overrides)))
    return run(cfg, on_event, should_stop)


def run(
    cfg: RunConfig, on_event: EventHandler | None = None, should_stop: StopCheck | None = None, export_on_stop: bool = False
) -> Result:
    """Optimises cfg.prompt from scratch and exports; bad input fails before a run folder exists.

    A stop request raises RunInterrupted after a checkpoint, or with export_on_stop exports
    the parameters reached so far (summary.json then says ``stopped: true``)."""
    return train(start(cfg), on_event, should_stop, export_on_stop)


def start(cfg: RunConfig) -> Trainer:
    """Checks the input, creates the run folder and returns its Trainer at step 0 (of its first stage)."""
    rundir.check_writable(Path(cfg.out))
    resolve_device(cfg.device)  # --device cuda without a GPU fails before any work
    first = cfg.stage_configs()[0]
    prior = build_prior(first)
    # config.yaml records the hub id and commit an alias resolved to: a resume or an export loads exactly those
    cfg = _with_model_source(cfg, model_source(prior))
    first = cfg.stage_configs()[0]
    prior.embed(cfg.prompt)
    representation = build_representation(first)  # e.g. an unreadable --init-points file fails here
    guidance = build_guidance(first, prior)  # e.g. a negative prompt the prior cannot take fails here
    try:
        check_stages(cfg)  # e.g. a stage whose representation cannot start from the one before
    except ValueError as e:
        raise ConfigError(str(e)) from None
    new_out = not Path(cfg.out).exists()
    run_dir = rundir.create_run_dir(cfg)
    try:  # e.g. repulsion's feature model fails here
        return Trainer(first, run_dir, prior, representation, guidance, stage=stage_info(cfg, 0), run_cfg=cfg)
    except BaseException:
        _discard(run_dir, new_out)
        raise


def _with_model_source(cfg: RunConfig, source: dict[str, str]) -> RunConfig:
    """``cfg`` recording the model its first stage's prior resolved to: in that stage when it names its own prior
    or model, else in the run's settings."""
    if not source:
        return cfg
    if cfg.stages and ({"prior", "model"} & cfg.stages[0].keys()):
        return cfg.model_copy(update={"stages": [{**cfg.stages[0], **source}, *cfg.stages[1:]]})
    return cfg.model_copy(update=source)


def _discard(run_dir: Path, new_out: bool) -> None:
    """Removes a run folder that failed before its first step (and its --out folder if this run made it), so no
    folder holding only config.yaml is left."""
    (run_dir / "config.yaml").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # anything else in them is not ours to delete
        run_dir.rmdir()
        if new_out:
            run_dir.parent.rmdir()


def resume(
    run_dir: Path, on_event: EventHandler | None = None, should_stop: StopCheck | None = None, export_on_stop: bool = False
) -> Result:
    """Continues a run from its latest checkpoint, exactly as if it had not stopped (stops as in ``run``)."""
    run_dir = Path(run_dir)
    cfg = rundir.load_run_config(run_dir)
    rundir.require_checkpoint(run_dir)  # before the lock file is touched
    with rundir.locked(run_dir), disk_errors(run_dir):
        return train(resumed_trainer(cfg, run_dir), on_event, should_stop, export_on_stop)


def train(
    trainer: Trainer, on_event: EventHandler | None = None, should_stop: StopCheck | None = None,
    export_on_stop: bool = False,
) -> Result:
    """Steps a trainer to the end of its run (or a stop request), then writes summary.json and export/.

    Holds the run folder's lock throughout; a write that fails ends in one RunError line."""
    with rundir.locked(trainer.run_dir), disk_errors(trainer.run_dir):
        return _train(trainer, on_event, should_stop, export_on_stop)


def _train(trainer: Trainer, on_event: EventHandler | None, should_stop: StopCheck | None, export_on_stop: bool) -> Result:
    stopped = False
    on_event, should_stop = on_event or (lambda event: None), should_stop or (lambda: False)
    runner = StageRunner(trainer)
    try:
        trainer = runner.run(on_event, should_stop)
    except RunInterrupted:
        if not export_on_stop:
            raise
        stopped = True
        trainer = runner.trainer
        record_stage(trainer)
    cfg, run_dir = trainer.cfg, trainer.run_dir
    if stopped:
        rundir.update_summary(run_dir, stopped=True)
    steps, skipped, seconds = trainer.step, trainer.skipped_steps, trainer.elapsed
    if trainer.stage.staged:  # the run's totals over the stages it ran
        ran = [s for s in rundir.read_summary(run_dir).get("stages", []) if isinstance(s, dict) and s]
        steps, skipped = sum(s["steps"] for s in ran), sum(s["skipped_steps"] for s in ran)
        seconds = sum(s["train_seconds"] for s in ran)
    rundir.update_summary(
        run_dir,
        prompt=cfg.prompt, prior=cfg.prior, guidance=cfg.guidance, representation=cfg.representation,
        model=getattr(trainer.prior, "model", None), model_resolved=cfg.model_resolved, model_revision=cfg.model_revision,
        seed=cfg.seed, steps=steps, skipped_steps=skipped,
        train_seconds=round(seconds, 2), seconds_per_step=round(seconds / max(steps, 1), 4),
        peak_memory_mb=_peak_memory_mb(), versions=_versions(),
    )
    with stage("exporting", f"the checkpoint of {trainer.stage.where(trainer.step)} is kept; `dream3d export "
               f"{run_dir}` exports it"):
        export(run_dir, representation=trainer.representation, cfg=cfg)
    if cfg.refine.steps and not stopped:
        try:
            _refine_export(trainer, on_event, should_stop)
        except RunInterrupted:
            if not export_on_stop:
                raise
            rundir.update_summary(run_dir, stopped=True)  # the export stays as trained, unrefined
    on_event(Progress("done", trainer.stage.steps_before + trainer.step, trainer.stage.total))
    return Result.load(run_dir)


def _refine_export(trainer: Trainer, on_event: EventHandler, should_stop: StopCheck) -> None:
    """Refines the texture of the export just written (``refine.steps`` > 0), with the trainer's prior and rule."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    unchanged = f"the export is as trained; `dream3d refine {run_dir}` refines it"
    with stage("loading the export to refine", unchanged):
        folders = export_folders(run_dir, cfg)
        meshes = [load_textured(folder) for folder in folders]
    _refine(run_dir, cfg, cfg.refine.steps, trainer.prior, trainer.guidance.state_dict(), folders, meshes, on_event,
            should_stop, unchanged)


def load_representation(run_dir: Path) -> tuple[RunConfig, Representation]:
    """The config and the latest checkpointed representation of a run: of its latest stage with a checkpoint,
    with that stage's effective config, for a staged run."""
    run_dir = Path(run_dir)
    run_cfg = rundir.load_run_config(run_dir)
    index = latest_stage(run_cfg, run_dir)
    return run_cfg.stage_configs()[index], stage_representation(run_cfg, run_dir, index)


def _final_config(run_dir: Path) -> RunConfig:
    """The effective config of a run's latest stage with a checkpoint (the run's own for a one-stage run)."""
    run_cfg = rundir.load_run_config(run_dir)
    return run_cfg.stage_configs()[latest_stage(run_cfg, run_dir)]


def export(
    run_dir: Path,
    formats: Sequence[str] | None = None,
    resolution: int | None = None,
    threshold: float | None = None,
    representation: Representation | None = None,
    cfg: RunConfig | None = None,
) -> dict[str, Path]:
    """Writes export/ (mesh files and orbit video) for a run; options default to the run's config (``cfg``, the
    config ``representation`` was trained with: a staged run's stage's).

    Holds the run folder's lock; a write that fails ends in one RunError line."""
    run_dir = Path(run_dir)
    cfg = cfg or _final_config(run_dir)
    if representation is None:
        rundir.require_checkpoint(run_dir)  # before the lock file is touched
    with rundir.locked(run_dir), disk_errors(run_dir, retry="export"):
        if representation is None:
            cfg, representation = load_representation(run_dir)
        return _export(run_dir, cfg, representation, formats, resolution, threshold)


def _export(
    run_dir: Path, cfg: RunConfig, representation: Representation, formats: Sequence[str] | None,
    resolution: int | None, threshold: float | None,
) -> dict[str, Path]:
    ex = cfg.export
    tick = time.perf_counter()
    files = {}
    for name, member in _particles(representation):
        folder = confine.folder(run_dir, run_dir / "export" / name)
        own = export_representation(
            member,
            folder,
            formats=list(formats or ex.formats),
            resolution=resolution or ex.mesh_resolution,
            threshold=threshold if threshold is not None else ex.threshold,
            solid=ex.solid,
            hull_views=ex.hull_views,
            hull_image_size=ex.hull_image_size,
            hull_margin=member.hull_margin if ex.hull_margin is None else ex.hull_margin,
            hull_level=ex.hull_level,
            max_faces=ex.max_faces,
            largest_only=ex.largest_only,
            texture_size=ex.texture_size if ex.texture else None,
            video=ex.video,
            video_frames=ex.video_frames,
            video_resolution=ex.video_resolution,
        )
        own.update(member.export_extras(folder))
        files.update({f"{name}/{kind}" if name else kind: path for kind, path in own.items()})
    rundir.update_summary(
        run_dir, export_seconds=round(time.perf_counter() - tick, 2),
        files={k: str(v.relative_to(run_dir)) for k, v in files.items()},
    )
    return files


def refine(
    run_dir: Path, steps: int = REFINE_STEPS, on_event: EventHandler | None = None, should_stop: StopCheck | None = None,
) -> Result:
    """Refines the texture of a run's exported mesh for ``steps`` steps (``dream3d.export.refine``) and re-exports it.

    Bad input (not a run folder, no textured export, ``steps`` < 1) fails in one line before anything is written;
    a stop request raises RunInterrupted and leaves the export as it was."""
    run_dir = Path(run_dir)
    cfg = _final_config(run_dir)
    check_refinable(cfg, steps)
    folders = export_folders(run_dir, cfg)
    meshes = [load_textured(folder) for folder in folders]  # bad input fails here, before the lock file is made
    with rundir.locked(run_dir), disk_errors(run_dir, retry="refine"):
        # the run's rule state (VSD's LoRA) from its latest checkpoint; a run without one starts the rule afresh
        state = rundir.latest_state(run_dir)[1].get("guidance") if rundir.checkpoint_paths(run_dir) else None
        _refine(run_dir, cfg, steps, build_prior(cfg), state, folders, meshes, on_event or (lambda event: None),
                should_stop or (lambda: False), "the export is as it was")
        if on_event:
            on_event(Progress("done", steps, steps))
        return Result.load(run_dir)


def _refine(
    run_dir: Path, cfg: RunConfig, steps: int, prior: Prior, guidance_state: dict | None, folders: list[Path],
    meshes: list[trimesh.Trimesh], on_event: EventHandler, should_stop: StopCheck, unchanged: str,
) -> None:
    """Refines the textured mesh of each export folder (one per particle), then re-exports each under the same names.

    A stop request raises RunInterrupted (``unchanged`` says what it leaves), between steps or, while the
    refined files are written, at once (each file is replaced whole)."""
    tick = time.perf_counter()
    on_event(Progress("refine", 0, steps))
    with stage("refining", unchanged, polled=True):
        refined = [refine_texture(cfg, mesh, steps, run_dir, prior, guidance_state, on_event, should_stop)
                   for mesh in meshes]
    with stage("writing the refined export", "each file is either refined or as it was"):
        for folder, mesh, textured in zip(folders, meshes, refined):
            write_refined(mesh, textured, folder, cfg)
    rundir.update_summary(run_dir, refine={"steps": steps, "seconds": round(time.perf_counter() - tick, 2),
                                           "t_percent": [cfg.refine.min_step_percent, cfg.refine.max_step_percent],
                                           "lr": cfg.refine.lr})


def evaluate(run_dir: Path, mesh: bool = False, stages: bool = False) -> dict:
    """Scores a toy-prompt run against the toy world; the result is merged into summary.json.

    With an exported ``model.glb`` it also scores the mesh against the renders (``mesh_iou``)
    and as a solid against the toy shape (``evaluate_mesh_3d``: volume_iou, volume_ratio,
    watertight, components).
    A run of N > 1 particles scores each (``particles``: N dicts) and reports their means.
    With ``mesh`` it scores the exported textured mesh instead, rendered by the mesh rasterizer from the same
    views (iou, r_precision, colour_error; summary.json's ``eval_mesh``): what a user of the asset sees.
    With ``stages`` (a staged run) it also scores each stage's final representation (``stages``: name -> its
    scores; summary.json's ``eval_stages``).
    """
    run_dir = Path(run_dir)
    if mesh:
        return _evaluate_mesh(run_dir)
    run_cfg = rundir.load_run_config(run_dir)  # not a run folder, or no checkpoint: that error, before a lock file
    rundir.require_checkpoint(run_dir)
    if stages and not run_cfg.stages:
        raise ConfigError(f"--stages scores the stages of a staged run, and {run_dir} has none (config `stages`)")
    with rundir.locked(run_dir), disk_errors(run_dir, retry="eval"):
        metrics = _evaluate(run_dir, *load_representation(run_dir))
        if stages:
            metrics["stages"] = _evaluate_stages(run_dir, run_cfg)
        return metrics


def _evaluate_stages(run_dir: Path, run_cfg: RunConfig) -> dict[str, dict]:
    """Each checkpointed stage's final representation scored against the toy world, by stage name: its renders,
    and the mesh its stage's export settings make of it, as a solid (``evaluate_mesh_3d``), so a stage's
    geometry can be compared with the next one's."""
    background = torch.tensor(run_cfg.background)
    scores = {}
    for index in range(latest_stage(run_cfg, run_dir) + 1):
        representation = stage_representation(run_cfg, run_dir, index)
        scores[run_cfg.stage_name(index)] = {
            **evaluate_representation(representation, run_cfg.prompt, background),
            **_stage_mesh_scores(run_cfg.stage_config(index), representation),
        }
    rundir.update_summary(run_dir, eval_stages=scores)
    return scores


def _stage_mesh_scores(cfg: RunConfig, representation: Representation) -> dict:
    """The solid scores of the mesh a stage's export settings make of its representation, written to a temporary
    folder (the run's export/ is the last stage's)."""
    ex = cfg.export
    with tempfile.TemporaryDirectory() as folder:
        path = export_representation(
            representation, Path(folder), formats=["ply"], resolution=ex.mesh_resolution, threshold=ex.threshold,
            solid=ex.solid, hull_views=ex.hull_views, hull_image_size=ex.hull_image_size,
            hull_margin=representation.hull_margin if ex.hull_margin is None else ex.hull_margin,
            hull_level=ex.hull_level, max_faces=ex.max_faces, largest_only=ex.largest_only, video=False,
        )["ply"]
        return evaluate_mesh_3d(trimesh.load(path, process=True), cfg.prompt)


def _evaluate(run_dir: Path, cfg: RunConfig, representation: Representation) -> dict:
    background = torch.tensor(cfg.background)
    per_particle = []
    for name, member in _particles(representation):
        metrics = evaluate_representation(member, cfg.prompt, background)
        glb = confine.inside(run_dir, run_dir / "export" / name / "model.glb")
        if glb.is_file():
            mesh = trimesh.load(glb, force="mesh").apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
            texture = texture_image(mesh)
            if texture is not None:
                metrics["albedo_error"] = albedo_error(mesh, np.asarray(texture.convert("RGB")), cfg.prompt)
            mesh.merge_vertices(merge_tex=True, merge_norm=True)  # a textured mesh is split along its UV seams
            metrics["mesh_iou"] = mesh_iou(mesh, member, background)
            metrics.update(evaluate_mesh_3d(mesh, cfg.prompt))
        per_particle.append(metrics)
    metrics = _mean_metrics(per_particle)
    rundir.update_summary(run_dir, eval=metrics)
    return metrics


def _evaluate_mesh(run_dir: Path) -> dict:
    cfg = rundir.load_run_config(run_dir)
    meshes = [load_textured(folder) for folder in export_folders(run_dir, cfg)]
    with rundir.locked(run_dir), disk_errors(run_dir, retry="eval"):
        background = torch.tensor(cfg.background)
        light = trained_light(cfg)
        per_particle = [evaluate_representation(textured_mesh(m, light=light), cfg.prompt, background) for m in meshes]
        metrics = _mean_metrics(per_particle)
        rundir.update_summary(run_dir, eval_mesh=metrics)
        return metrics


def _mean_metrics(per_particle: list[dict]) -> dict:
    """One particle's metrics as they are; several particles' means of the averaged scores, and each under ``particles``."""
    if len(per_particle) == 1:
        return per_particle[0]
    averaged = ("iou", "r_precision", "colour_error", "janus", "view_iou_spread", "mesh_iou", "volume_iou", "volume_ratio")
    scores = [k for k in averaged if all(k in m for m in per_particle)]
    metrics = {k: sum(m[k] for m in per_particle) / len(per_particle) for k in scores}
    metrics["particles"] = per_particle
    return metrics


def _particles(representation: Representation) -> list[tuple[str, Representation]]:
    """(export subfolder, representation) per particle: ("", it) for a single one, ("p{i}", member i) for Particles."""
    if isinstance(representation, Particles):
        return [(f"p{i}", member) for i, member in enumerate(representation.members)]
    return [("", representation)]


def _peak_memory_mb() -> float:
    # ru_maxrss is in kilobytes on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        **{name: version(name) for name in ("dream3d", "torch", "nerfacc", "trimesh")},
    }
