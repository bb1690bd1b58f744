"""Texture refinement of an exported mesh (DreamGaussian's stage 2): the run's prior and guidance rule at small t
optimise the UV texture of ``export/model.obj``, rendered by the PyTorch mesh rasterizer; the refined texture
replaces the baked one in a new export.

The mesh is wrapped as a ``TexturedMesh`` representation, so the run's own ``Trainer.train_step`` (cameras from
the run's sampler, render, the rule's surrogate loss, Adam) does the optimisation: no loss code of its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import trimesh
from PIL import Image

from dream3d.rundir import confine
from dream3d.config import LossConfig, RunConfig
from dream3d.errors import UserError
from dream3d.export.files import Z_UP_TO_Y_UP, export_mesh, texture_image, write_orbit_video
from dream3d.guidance.priors.base import Prior
from dream3d.guidance.repulsion import RepulsionConfig
from dream3d.run.loop import Progress, RunInterrupted, Trainer
from dream3d.registry import RULES
from dream3d.representations.shading import LightConfig
from dream3d.representations.textured_mesh import TexturedMesh

# DreamGaussian refines its texture for 50 steps (iters_refine); on the toy benchmark the colour error still falls
# between 50 and 100 steps, which take well under a minute on a CPU (docs/benchmarks.md#texture-refinement)
REFINE_STEPS = 100


class RefineError(UserError, ValueError):
    """A run cannot be refined as asked; the message is one line."""


def check_refinable(cfg: RunConfig, steps: int) -> None:
    """Raises RefineError for a step count or a run that refinement cannot take."""
    if steps < 1:
        raise RefineError(f"--steps must be at least 1, got {steps}")
    if cfg.consistent_noise:
        raise RefineError(f"refine draws fresh forward noise; this run's guidance {cfg.guidance} uses consistent "
                          "noise (--noise consistent, cfd), which a texture does not carry")


def export_folders(run_dir: Path, cfg: RunConfig) -> list[Path]:
    """export/ of a single run, export/p{i}/ of each particle; RunDirError for one that links out of the run."""
    root = run_dir / "export"
    folders = [root / f"p{i}" for i in range(cfg.particles)] if cfg.particles > 1 else [root]
    return [confine.inside(run_dir, folder) for folder in folders]


def load_textured(folder: Path) -> trimesh.Trimesh:
    """The textured mesh of an export folder in dream3d's world frame (+z up): model.obj, else model.glb (neither
    read through a link out of the folder; trimesh reads the OBJ's material and texture from the folder only).

    Raises RefineError when neither holds a UV texture."""
    obj, glb = confine.inside(folder, folder / "model.obj"), confine.inside(folder, folder / "model.glb")
    mesh = None
    try:
        if obj.is_file():
            mesh = trimesh.load(obj, force="mesh")
        elif glb.is_file():
            mesh = trimesh.load(glb, force="mesh").apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
    except Exception as e:  # a damaged file: trimesh raises many kinds
        raise RefineError(f"cannot read the exported mesh in {folder}: {' '.join(str(e).split())[:160]}") from None
    if mesh is None or texture_image(mesh) is None:
        raise RefineError(f"{folder} holds no UV-textured mesh (model.obj with its texture, or model.glb); export "
                          "the run with a texture first")
    return mesh


def trained_light(cfg: RunConfig) -> LightConfig | None:
    """The light a run's colours were learned under (its representation's ``trained_light``, e.g. a NeRF with
    ``nerf.shading=lambert``), in which its texture, the albedo, is rendered for refinement and evaluation; None
    for a run that learned radiance."""
    return cfg.representation_section.trained_light()


def textured_mesh(mesh: trimesh.Trimesh, lr: float = 0.05, light: LightConfig | None = None) -> TexturedMesh:
    """The ``TexturedMesh`` representation of a UV-mapped trimesh (uv [V,2], texture from ``texture_image``),
    rendered lit by ``light`` if given."""
    image = np.asarray(texture_image(mesh).convert("RGB"), dtype=np.float32) / 255
    return TexturedMesh(torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces),
                        torch.as_tensor(np.asarray(mesh.visual.uv), dtype=torch.float32), torch.from_numpy(image), lr,
                        light)


def refine_config(cfg: RunConfig, steps: int) -> RunConfig:
    """The run's config for ``steps`` steps of texture refinement: the same prior, rule, camera sampler and
    background; the rule's t range (and ISM's warm-up start) limited to refine's; ``refine.resolution`` or the run's
    last render size;
    guidance as the only loss (alpha is fixed, so the regularizers have no gradient); one mesh at a time."""
    name = RULES[cfg.guidance].name
    section = getattr(cfg, name)
    small_t = {"min_step_percent": cfg.refine.min_step_percent, "max_step_percent": cfg.refine.max_step_percent,
               "warmup_max_step_percent": cfg.refine.max_step_percent}
    return cfg.model_copy(update={
        "steps": steps, "particles": 1, "resolution": cfg.refine.resolution or cfg.resolution_at(cfg.steps),
        "resolution_milestones": [],
        "loss": LossConfig(), "repulsion": RepulsionConfig(), "optim": cfg.optim.model_copy(update={"lr_scale": 1.0}),
        name: section.model_copy(update={k: v for k, v in small_t.items() if k in type(section).model_fields}),
    })


def refine_texture(
    cfg: RunConfig, mesh: trimesh.Trimesh, steps: int, run_dir: Path, prior: Prior | None = None,
    guidance_state: dict | None = None, on_event: Callable[[Progress], None] = lambda event: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TexturedMesh:
    """``steps`` steps of the run's training step on the mesh's texture; returns the refined ``TexturedMesh``.

    ``guidance_state``: the run's rule state (VSD's LoRA), loaded into the rebuilt rule. Raises RunInterrupted on a
    stop request (nothing is written)."""
    mesh_rep = textured_mesh(mesh, cfg.refine.lr, trained_light(cfg))
    trainer = Trainer(refine_config(cfg, steps), run_dir, prior=prior, representation=mesh_rep)
    if guidance_state:
        trainer.guidance.load_state_dict(guidance_state)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        if should_stop():
            raise RunInterrupted(f"refine stopped at step {step - 1} of {steps}; the export is unchanged")
        record = trainer.train_step()
        rate = step / max(time.perf_counter() - started, 1e-9)
        on_event(Progress("step", step, steps, losses={k: v for k, v in record.items() if k.startswith("loss") or k == "t"},
                          it_per_s=rate, eta_s=(steps - step) / rate))
    return trainer.representation


def write_refined(mesh: trimesh.Trimesh, refined: TexturedMesh, folder: Path, cfg: RunConfig) -> dict[str, Path]:
    """Re-exports the mesh with the refined texture (the run's formats, each file atomic) and re-renders the orbit
    video from the textured mesh. Returns {kind: path}."""
    image = Image.fromarray(refined.texture_image())
    material = mesh.visual.material
    if hasattr(material, "baseColorTexture"):
        material.baseColorTexture = image
    else:
        material.image = image
    files = export_mesh(mesh, folder, cfg.export.formats)
    if cfg.export.video:
        files["video"] = write_orbit_video(
            refined.render, folder / "orbit.mp4", n_frames=cfg.export.video_frames,
            resolution=cfg.export.video_resolution, background=(1.0, 1.0, 1.0), device=refined.vertices.device,
        )
    return files


__all__ = ["REFINE_STEPS", "RefineError", "check_refinable", "export_folders", "load_textured", "refine_config",
           "refine_texture", "textured_mesh", "write_refined"]
