"""A staged run (config ``stages``): each stage's trainer in turn, each stage's representation started from the
previous stage's final one (``init: previous``), and where a resume picks the run up again.

Stage k builds its prior, rule and representation from its effective config (``RunConfig.stage_config``), its
representation then ``init_from`` stage k-1's, in one order whether stage k-1 just ended in this process or its final
checkpoint was read by a resume, so both give the same parameters. A stage shares the previous stage's prior when
their prior settings are equal and neither rule trains on its UNet (a LoRA stays on the UNet it was added to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dream3d.config import RunConfig
from dream3d.registry import RULES
from dream3d.rundir import folder as rundir
from dream3d.run.build import build_representation
from dream3d.run.device import resolve_device
from dream3d.run.loop import Progress, RunError, StageInfo, Trainer
from dream3d.guidance.priors.base import Prior
from dream3d.representations.base import Representation

# the settings that make two stages' priors one and the same
PRIOR_SETTINGS = ("prior", "model", "model_resolved", "model_revision", "diffusers", "prompts", "device")


def stage_info(run_cfg: RunConfig, index: int) -> StageInfo:
    """Stage ``index`` of a run (a one-stage run's only stage when it has no ``stages``)."""
    steps = [c.steps for c in run_cfg.stage_configs()]
    if not run_cfg.stages:
        return StageInfo(total=steps[0])
    name = run_cfg.stage_name(index)
    return StageInfo(index, name, len(steps), rundir.stage_folder(index, name), sum(steps[:index]), sum(steps))


def describe(cfg: RunConfig, info: StageInfo) -> str:
    """What a stage's checkpoints hold, for the error of one that does not fit: 'a nerf run (2 particles)',
    'stage 1 (geometry) of a run, a gaussians one'."""
    if info.staged:
        return f"stage {info.index} ({info.name}) of a run, a {cfg.representation} one"
    return f"a {cfg.representation} run" + (f" ({cfg.particles} particles)" if cfg.particles > 1 else "")


def check_stages(run_cfg: RunConfig) -> None:
    """Raises ValueError in one line, before any work, when a stage's representation cannot start from the one before
    (``init_from`` on freshly built ones)."""
    previous = None
    for index, cfg in enumerate(run_cfg.stage_configs()):
        representation = build_representation(cfg)
        if previous is not None and run_cfg.stage_init(index) == "previous":
            try:
                representation.init_from(previous)
            except ValueError as e:
                raise ValueError(f"stages[{index}] ({run_cfg.stage_name(index)}): init: {e}") from None
        previous = representation


def stage_trainer(
    run_cfg: RunConfig, run_dir: Path, index: int, previous: Representation | None, prior: Prior | None = None,
) -> Trainer:
    """Stage ``index``'s trainer at its step 0, its representation started from ``previous`` (None: as built)."""
    cfg = run_cfg.stage_config(index)
    representation = build_representation(cfg)
    if previous is not None and run_cfg.stage_init(index) == "previous":
        representation.init_from(previous)
    return Trainer(cfg, run_dir, prior, representation, stage=stage_info(run_cfg, index), run_cfg=run_cfg)


class StageRunner:
    """Runs a trainer's stage and every stage after it; ``trainer`` is the current stage's (the last one's once
    ``run`` returns, the stopped one's after a stop)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def run(self, on_event: Callable[[Progress], None], should_stop: Callable[[], bool]) -> Trainer:
        run_cfg = self.trainer.run_cfg
        while True:
            trainer, info = self.trainer, self.trainer.stage
            if info.staged:
                on_event(Progress("stage", info.steps_before + trainer.step, info.total, stage=info.name,
                                  stage_index=info.index, stages=info.count))
            trainer.run(on_event, should_stop)
            record_stage(trainer)
            if info.index + 1 == info.count:
                return trainer
            self.trainer = stage_trainer(run_cfg, trainer.run_dir, info.index + 1, trainer.representation,
                                         _shared_prior(trainer, run_cfg.stage_config(info.index + 1)))


def _shared_prior(trainer: Trainer, cfg: RunConfig) -> Prior | None:
    """The trainer's prior when the next stage (config ``cfg``) can use it as it is, else None (it builds its own)."""
    same = all(getattr(trainer.cfg, key) == getattr(cfg, key) for key in PRIOR_SETTINGS)
    lora = RULES[trainer.cfg.guidance].needs_unet or RULES[cfg.guidance].needs_unet
    return trainer.prior if same and not lora else None


def record_stage(trainer: Trainer) -> None:
    """A staged run's summary.json ``stages``: what each stage ran, written as it ends (or stops)."""
    if not trainer.stage.staged:
        return
    cfg, info = trainer.cfg, trainer.stage
    stages = rundir.read_summary(trainer.run_dir).get("stages")
    stages = stages if isinstance(stages, list) and len(stages) == info.count else [{} for _ in range(info.count)]
    stages[info.index] = {"name": info.name, "representation": cfg.representation, "guidance": cfg.guidance,
                          "prior": cfg.prior, "steps": trainer.step, "skipped_steps": trainer.skipped_steps,
                          "train_seconds": round(trainer.elapsed, 2)}
    rundir.update_summary(trainer.run_dir, stages=stages)


def latest_stage(run_cfg: RunConfig, run_dir: Path) -> int:
    """The index of the last stage with a checkpoint (0 when none has one)."""
    held = [i for i in range(len(run_cfg.stage_configs())) if rundir.checkpoint_paths(run_dir, stage_info(run_cfg, i).folder)]
    return held[-1] if held else 0


def stage_representation(run_cfg: RunConfig, run_dir: Path, index: int) -> Representation:
    """Stage ``index``'s representation from its latest checkpoint."""
    cfg, info, path, state = _latest_checkpoint(run_cfg, run_dir, index)
    representation = build_representation(cfg)
    rundir.apply_checkpoint(path, state, lambda s: representation.load_state_dict(s["representation"]),
                            describe(cfg, info))
    return representation


def _latest_checkpoint(run_cfg: RunConfig, run_dir: Path, index: int) -> tuple[RunConfig, StageInfo, Path, dict]:
    """Stage ``index``'s effective config, its place in the run, and its newest readable checkpoint and state (a
    one-stage run's: the run's own)."""
    cfg, info = run_cfg.stage_config(index) if run_cfg.stages else run_cfg, stage_info(run_cfg, index)
    path, state = rundir.latest_state(run_dir, info.folder) if info.staged else rundir.latest_state(run_dir)
    return cfg, info, path, state


def resumed_trainer(run_cfg: RunConfig, run_dir: Path) -> Trainer:
    """The trainer a resume continues with: the latest checkpoint's stage at its step, or, when that stage had
    ended, the next stage at step 0 started from its final representation; metrics after that point dropped."""
    index = latest_stage(run_cfg, run_dir)
    cfg, info, path, state = _latest_checkpoint(run_cfg, run_dir, index)
    if info.staged and index + 1 < info.count and state.get("step") == cfg.steps:
        previous = stage_representation(run_cfg, run_dir, index).to(resolve_device(cfg.device))
        rundir.truncate_metrics(run_dir, cfg.steps, index)
        try:
            return stage_trainer(run_cfg, run_dir, index + 1, previous)
        except ValueError as e:
            raise RunError(f"stage {index + 1} cannot start: {e}") from None
    trainer = Trainer(cfg, run_dir, stage=info, run_cfg=run_cfg)
    rundir.apply_checkpoint(path, state, trainer.load_state_dict, describe(cfg, info))
    rundir.truncate_metrics(run_dir, trainer.step, index)
    return trainer
