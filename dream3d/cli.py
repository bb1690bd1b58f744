"""The ``dream3d`` command line: run, resume, export, refine, eval, batch, bench, bench-guidance, bench-gpu,
train-prior, sample, eval-prior, recipes, models, doctor, web.

Every failure the user can cause ends in one line on stderr and a non-zero exit:
1 for bad input or a failed run, 2 for a malformed command line, 130 for an interrupt.
Nothing heavy (torch, diffusers) is imported until a command runs: ``--help`` and argument
errors take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import click
import typer
from typer.exceptions import Abort, TyperException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dream3d.errors import UserError, one_line, user_errors
from dream3d.registry import PRIORS, REPRESENTATIONS, RULES
from dream3d.run.stop import SignalStop, exit_after_signal, stage

if TYPE_CHECKING:
    from dream3d import api
    from dream3d.config import RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
console = Console(stderr=True)
# train-prior's checkpoints are step-XXXXXXX.pt and found by sorting names: 7 digits sort right
MAX_PRIOR_STEPS = 9_999_999


def _train(start: Any) -> api.Result:
    """Runs ``start(on_event, should_stop)`` with a rich progress bar that appears at the first step."""
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  t {task.fields[t]}  {task.fields[rate]} it/s"), TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=console)
    task = bar.add_task("optimising", total=None, loss="-", t="-", rate="-")

    def on_event(event: Any) -> None:  # a dream3d.run.loop.Progress
        nonlocal task
        if event.kind == "step":
            bar.start()
            bar.update(
                task, completed=event.step, total=event.total, loss=f"{event.losses.get('loss', 0):.4g}",
                t=f"{event.losses.get('t', 0):.0f}", rate=f"{event.it_per_s:.1f}",
            )
        elif event.kind == "stage":  # a staged run's stage begins: one bar over every stage, named for this one
            bar.update(task, description=f"stage {event.stage_index + 1}/{event.stages} {event.stage}")
        elif event.kind == "refine":  # the texture refinement after the export: a bar of its own
            bar.update(task, description="optimised")
            task = bar.add_task("refining", total=event.total, loss="-", t="-", rate="-")
        elif event.kind == "done":
            bar.update(task, description="done")

    try:
        return start(on_event, SignalStop())
    finally:
        if bar.live.is_started:
            bar.stop()


def _report(result: api.Result) -> None:
    console.print(f"run folder: {result.run_dir}")
    for kind, path in result.files.items():
        console.print(f"  {kind}: {path}")

# the run options, shared by `run` and `batch` (where they are every job's defaults)
OVERRIDES = typer.Argument(None, help="key=value config overrides, e.g. sds.weighting=uniform")
PRIOR = typer.Option(None, help="auto (the default: a toy prior for a toy-world prompt, else sd) | "
                     + " | ".join(PRIORS.names))
MODEL = typer.Option(None, help="diffusers priors: an alias (`dream3d models`), a Hugging Face hub id or a local "
                     "diffusers folder.")
GUIDANCE = typer.Option(None, help=" | ".join(RULES.names))
REPRESENTATION = typer.Option(None, help=" | ".join(REPRESENTATIONS.names))
STEPS = typer.Option(None, help="Optimisation steps.")
SEED = typer.Option(None)
RESOLUTION = typer.Option(None, help="Render size (one size for the whole run).")
CONFIG = typer.Option(None, help="A YAML config; flags and overrides win over it.")
INIT_POINTS = typer.Option(None, help="Gaussians: start from the points of this PLY file.")
RECIPE = typer.Option(None, help="A pipeline of stages (`dream3d recipes`): a shipped recipe's name or a YAML file.")
PARTICLES = typer.Option(None, help="Optimise N representations together (exported to export/p{i}/).")
REPULSION = typer.Option(None, help="Weight of the kernel repulsion between particles (needs --particles 3+).")
DEVICE = typer.Option(None, help="auto | cpu | cuda | cuda:N: where the whole run lives (auto: CUDA if any).")
NOISE = typer.Option(None, help="independent | consistent: forward noise fresh per step, or fixed on the 3D "
                     "representation (sds, ism; cfd always).")


def _run_flags(
    prior: str | None, model: str | None, guidance: str | None, representation: str | None, steps: int | None,
    seed: int | None, resolution: int | None, init_points: Path | None, particles: int | None, repulsion: float | None,
    noise: str | None, device: str | None = None, recipe: str | None = None,
) -> dict[str, Any]:
    """The config layer of the run options that were given."""
    flags = dict(prior=prior, model=model, guidance=guidance, representation=representation, steps=steps, seed=seed,
                 resolution=resolution, particles=particles, noise=noise, device=device, recipe=recipe)
    if init_points is not None:
        takers = [spec.name for spec in REPRESENTATIONS if spec.takes_init_points]
        flags.update({name: {"init_points": str(init_points)} for name in takers})
    if repulsion is not None:
        flags["repulsion"] = {"weight": repulsion}
    return {k: v for k, v in flags.items() if v is not None}


@app.command()
def run(
    prompt: str = typer.Argument(..., help="What to make, e.g. 'a red cube'."),
    overrides: Optional[list[str]] = OVERRIDES,
    prior: Optional[str] = PRIOR,
    model: Optional[str] = MODEL,
    guidance: Optional[str] = GUIDANCE,
    representation: Optional[str] = REPRESENTATION,
    steps: Optional[int] = STEPS,
    seed: Optional[int] = SEED,
    resolution: Optional[int] = RESOLUTION,
    out: Optional[str] = typer.Option(None, help="Folder that receives the run folder (default runs/)."),
    config: Optional[Path] = CONFIG,
    init_points: Optional[Path] = INIT_POINTS,
    particles: Optional[int] = PARTICLES,
    repulsion: Optional[float] = REPULSION,
    noise: Optional[str] = NOISE,
    device: Optional[str] = DEVICE,
    refine_steps: Optional[int] = typer.Option(None, help="Then refine the exported texture for N steps "
                                               "(`dream3d refine`; 0, the default: no refinement)."),
    recipe: Optional[str] = RECIPE,
) -> None:
    """Optimise a 3D asset for PROMPT and export it."""
    from dream3d import api

    cfg = _run_config(prompt, overrides, prior, model, guidance, representation, steps, seed, resolution, out, config,
                      init_points, particles, repulsion, noise, device, refine_steps, recipe)
    _report(_train(lambda on_event, stop: api.run(cfg, on_event, stop)))


def _run_config(
    prompt: str, overrides: list[str] | None, prior: str | None, model: str | None, guidance: str | None,
    representation: str | None, steps: int | None, seed: int | None, resolution: int | None, out: str | None,
    config: Path | None, init_points: Path | None, particles: int | None, repulsion: float | None, noise: str | None,
    device: str | None = None, refine_steps: int | None = None, recipe: str | None = None,
) -> RunConfig:
    """The config of `dream3d run` from its arguments (layers: --recipe, --config, flags, overrides)."""
    from dream3d.config import build_config, load_yaml, parse_overrides

    flags = _run_flags(prior, model, guidance, representation, steps, seed, resolution, init_points, particles, repulsion,
                       noise, device, recipe)
    if refine_steps is not None:
        flags["refine"] = {"steps": refine_steps}
    return build_config(
        load_yaml(config) if config else {},
        {"prompt": prompt, **flags, **({"out": out} if out is not None else {})},
        parse_overrides(overrides or []),
    )


def check_run_args(args: list[str]) -> RunConfig:
    """The RunConfig that ``dream3d run ARGS`` would train, without running it: the benchmarks check
    every run they will start before the first one, so a bad option fails in one line up front."""
    command = typer.main.get_command(app).get_command(click.Context(click.Group()), "run")
    try:
        params = command.make_context("run", list(args)).params
    except click.ClickException as e:
        raise UserError(e.format_message()) from None
    return _run_config(**params)


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="A run folder made by `dream3d run`.")) -> None:
    """Continue an interrupted run from its latest checkpoint."""
    from dream3d import api

    _report(_train(lambda on_event, stop: api.resume(run_dir, on_event, stop)))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    formats: Optional[str] = typer.Option(None, help="Comma-separated: glb,obj,ply"),
    resolution: Optional[int] = typer.Option(None, help="Marching-cubes grid resolution."),
    threshold: Optional[float] = typer.Option(None, help="Density iso-level (default: automatic)."),
) -> None:
    """Export (again) the mesh and the orbit video of a run."""
    from dream3d import api
    from dream3d.config import check_export_options

    if threshold is not None and not math.isfinite(threshold):
        raise UserError(f"--threshold must be a finite number, got {threshold}")
    chosen = formats.split(",") if formats else None
    check_export_options(chosen, resolution)
    SignalStop()
    with stage("exporting", "each file under export/ is whole: new, or as it was"):
        files = api.export(run_dir, chosen, resolution, threshold)
    _report(api.Result(run_dir, files))


@app.command()
def refine(
    run_dir: Path = typer.Argument(..., help="A run folder with a UV-textured export."),
    steps: Optional[int] = typer.Option(None, help="Refinement steps (default 100)."),
) -> None:
    """Refine the exported mesh's texture, then export again.

    The run's prior and guidance refine it at small t."""
    from dream3d import api
    from dream3d.export.refine import REFINE_STEPS

    chosen = REFINE_STEPS if steps is None else steps
    _report(_train(lambda on_event, stop: api.refine(run_dir, chosen, on_event, stop)))


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder with a toy-world prompt."),
    mesh: bool = typer.Option(False, "--mesh", help="Score the exported textured mesh instead of the representation."),
    stages: bool = typer.Option(False, "--stages", help="Also score each stage's final representation (a staged run)."),
) -> None:
    """Score a toy-prompt run against the toy world.

    Compares with the toy world's ground truth; writes summary.json."""
    from dream3d import api

    SignalStop()
    with stage("evaluating", "summary.json is as it was"):
        metrics = api.evaluate(run_dir, mesh=mesh, stages=stages)
    for name, scores in metrics.pop("stages", {}).items():
        typer.echo(f"stage {name}: " + ", ".join(_fmt_metric(k, v) for k, v in scores.items()))
    for i, particle in enumerate(metrics.pop("particles", [])):
        typer.echo(f"p{i}: " + ", ".join(_fmt_metric(k, v) for k, v in particle.items()))
    for key, value in metrics.items():
        typer.echo(_fmt_metric(key, value))


def _fmt_metric(key: str, value: Any) -> str:
    return f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}"


@app.command()
def batch(
    file: Path = typer.Argument(..., help="Prompts: text, one a line (# comments), or JSONL with per-job settings."),
    overrides: Optional[list[str]] = OVERRIDES,
    out: Optional[Path] = typer.Option(None, help="Output folder for batch.jsonl and the jobs (default batches/FILE-STEM)."),
    workers: Optional[int] = typer.Option(None, help="Concurrent jobs (default: one per GPU, else one; Ray: the cluster's)."),
    ray: Optional[str] = typer.Option(None, help="Run on Ray: 'auto' starts a local instance, an ADDRESS joins a cluster."),
    retries: int = typer.Option(1, help="Times a failed job is started again (input errors are not retried)."),
    status: bool = typer.Option(False, "--status", help="Show the manifest's table and summary; run nothing."),
    prior: Optional[str] = PRIOR,
    model: Optional[str] = MODEL,
    guidance: Optional[str] = GUIDANCE,
    representation: Optional[str] = REPRESENTATION,
    steps: Optional[int] = STEPS,
    seed: Optional[int] = SEED,
    resolution: Optional[int] = RESOLUTION,
    config: Optional[Path] = CONFIG,
    init_points: Optional[Path] = INIT_POINTS,
    particles: Optional[int] = PARTICLES,
    repulsion: Optional[float] = REPULSION,
    noise: Optional[str] = NOISE,
    recipe: Optional[str] = RECIPE,
) -> None:
    """Make an asset for every prompt in FILE.

    Re-running continues where it stopped. The run options are every job's defaults."""
    from dream3d.batch.command import run_batch_command, show_status
    from dream3d.config import load_yaml, merge, parse_overrides

    if status:
        raise typer.Exit(show_status(file, out, console))
    flags = _run_flags(prior, model, guidance, representation, steps, seed, resolution, init_points, particles, repulsion,
                       noise, recipe=recipe)
    defaults = merge(merge(load_yaml(config) if config else {}, flags), parse_overrides(overrides or []))
    raise typer.Exit(run_batch_command(file, out, defaults, workers, ray, retries, console))


@app.command("bench")
def benchmark(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides applied to every run"),
    out: Path = typer.Option(Path("bench"), help="Folder for the runs and the table."),
    quick: bool = typer.Option(False, help="Two prompts instead of twelve."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    prompts: Optional[str] = typer.Option(None, help="Comma-separated prompts instead of the benchmark's."),
) -> None:
    """Run the toy benchmark and write bench.md / bench.json."""
    from dream3d.eval import bench

    matrix = bench.with_choices(bench.TOY_QUICK if quick else bench.TOY, seeds=_seeds(seeds), faithful=_prompts(prompts))
    _check_runs(bench.cells(matrix, out, list(overrides or [])))
    rows = bench.run_matrix(matrix, out, list(overrides or []), bench.stop_at_failure)
    typer.echo(bench.write_runs(out, list(overrides or []), rows))


@app.command("bench-guidance")
def bench_guidance(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides applied to every run (last)"),
    out: Path = typer.Option(Path("bench-guidance"), help="Folder for the runs, bench.md and bench.json."),
    quick: bool = typer.Option(False, help="The small matrix CI runs (2 rules, NeRF, toy-mv, 1 faithful + 1 ambiguous prompt, a few steps)."),
    rules: Optional[str] = typer.Option(None, help="Comma-separated rules (default: every registered rule, and rsd = sds + repulsion); "
                                 "sds-no-view and sds-perp-neg by name, on a prior with view prompts"),
    representations: Optional[str] = typer.Option(None, help="Comma-separated: nerf,gaussians (default: both)."),
    prior: Optional[str] = typer.Option(None, help="The embedded prior of every run (default toy-unet-mv)."),
    faithful: Optional[str] = typer.Option(None, help="Comma-separated one-class prompts (default: 4 of them)."),
    ambiguous: Optional[str] = typer.Option(None, help="Comma-separated ambiguous prompts (default: a red shape,a cube)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds of the faithful prompts (default 0)."),
    diversity_seeds: Optional[str] = typer.Option(None, help="Seeds of the ambiguous prompts (default 0,1,2)."),
    particles: Optional[int] = typer.Option(None, help="Particles per ambiguous run (default 4)."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps of every run (default 100)."),
) -> None:
    """Compare the guidance rules: fidelity, diversity, cost.

    Cost is time per step; writes bench.md / bench.json."""
    from dream3d.eval import bench

    matrix = bench.with_choices(
        bench.RULES_QUICK if quick else bench.RULES_FULL, rules=_names(rules), representations=_names(representations),
        prior=prior, faithful=_prompts(faithful), ambiguous=_prompts(ambiguous), seeds=_seeds(seeds),
        ambiguous_seeds=_seeds(diversity_seeds), particles=particles,
    )
    extra = [*([f"steps={steps}"] if steps is not None else []), *(overrides or [])]
    _check_runs(bench.cells(matrix, out, extra))

    def on_row(row: dict) -> None:
        outcome = row.get("error") or f"{row['wall_seconds']} s"
        console.print(f"{row['rule']} {row['representation']} {row['prompt']!r} seed {row['seed']}: {outcome}")

    typer.echo(bench.write_cells(out, matrix, extra, bench.run_matrix(matrix, out, extra, on_row)))


def _check_runs(runs: Iterable[tuple[dict, str, int, Path, list[str]]]) -> None:
    """Checks every run of a benchmark (``bench.cells``) before the first starts: bad input fails at once."""
    configs = [check_run_args([prompt, "--seed", str(seed), "--out", str(folder), *options])
               for _, prompt, seed, folder, options in runs]
    _check_words(configs)


def _check_words(configs: list[RunConfig]) -> None:
    """Embeds every prompt of the runs whose prior has a closed vocabulary (the toy priors), each prior built once,
    so a word it does not know fails in one line before the first run; open-vocabulary priors take any words."""
    from dream3d.run.build import build_prior

    priors: dict[tuple, Any] = {}
    for cfg in configs:
        if PRIORS[cfg.prior].open_vocabulary:
            continue
        key = (cfg.prior, cfg.model)
        if key not in priors:
            priors[key] = build_prior(cfg)
        priors[key].embed(cfg.prompt)


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(n.strip() for n in value.split(",") if n.strip())


def _prompts(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(p.strip() for p in value.split(",") if p.strip())


def _seeds(value: str | None) -> tuple[int, ...] | None:
    try:
        return None if value is None else tuple(int(s) for s in value.split(","))
    except ValueError:
        raise UserError(f"seeds must be comma-separated integers, got {value!r}") from None


@app.command("bench-gpu")
def bench_gpu(
    out: Path = typer.Option(Path("gpu-check"), help="Folder for gpu-check.json / gpu-check.md and the runs."),
    device: str = typer.Option("cuda", help="cuda | cuda:N (cpu: the same checks, for a smoke test)."),
    model: Optional[str] = typer.Option(None, help="The latent prior of the SDS/VSD steps (default random:sd-2.1-base; "
                                        "with --dry-run random:sd-tiny)."),
    toy_steps: Optional[int] = typer.Option(None, help="Steps of the toy demos (default 300; with --dry-run 3)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Every stage on the CPU at tiny sizes (needs no GPU)."),
    parts_only: bool = typer.Option(False, help="Only time one SDS step's parts (text, UNet x2, VAE encode/backward)."),
    batch: int = typer.Option(1, help="With --parts-only: the batch."),
) -> None:
    """Check the GPU: CPU parity, kernels, speed (docs/gpu.md).

    CPU-vs-GPU parity, kernel builds, host waits, toy demos, SDS/VSD steps vs the bare UNet+VAE cost;
    results written after every stage."""
    import dataclasses

    from dream3d.eval import bench_gpu
    from dream3d.run.device import resolve_device

    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    if parts_only:
        from dream3d.guidance.priors.diffusers_prior import DiffusersConfig
        from dream3d.guidance.priors.sd import StableDiffusionPrior
        from dream3d.guidance.prompts import PromptConfig

        where = str(resolve_device(device))
        prior = StableDiffusionPrior(model or bench_gpu.MODEL, DiffusersConfig(device=where), PromptConfig())
        typer.echo(bench_gpu.parts_table(bench_gpu.sds_parts(prior, batch)))
        return
    sizes = bench_gpu.DRY if dry_run else bench_gpu.FULL
    sizes = dataclasses.replace(sizes, **({"model": model} if model else {}),
                                **({"demo_steps": toy_steps} if toy_steps else {}))
    device = "cpu" if dry_run else device
    resolve_device(device)  # no GPU: one line, nothing written
    typer.echo(bench_gpu.markdown(bench_gpu.gpu_check(out, device, sizes)))


@app.command("train-prior")
def train_prior(
    out: Optional[Path] = typer.Option(None, help="The model folder to write (default assets/toy-<arch>, toy-unet for unet)."),
    arch: str = typer.Option("unet", help="unet (--prior toy-unet) | mvdream (--prior toy-mvdream: MVDream's multi-view network) | sd (toy-sd, SD 2.1-base's layout)."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the shipped model's)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint."),
    checkpoints: Optional[Path] = typer.Option(None, help="Checkpoint folder (default runs/train-prior/<out name>)."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="CPU threads (1 is fastest on a busy machine)."),
) -> None:
    """Train a toy-world diffusion model (--arch picks which).

    --arch unet: the model that --prior toy-unet / toy-unet-mv load; mvdream: toy-mvdream; sd: toy-sd."""
    import torch

    from dream3d.config import SampleOptions, check_options
    from dream3d.toy.train_unet import TrainPriorConfig, TrainStep, train_prior

    if arch not in ("unet", "mvdream", "sd"):
        raise UserError(f"unknown --arch {arch!r}; valid: unet, mvdream, sd")
    config_class, train = TrainPriorConfig, train_prior
    if arch == "mvdream":
        from dream3d.toy.train_mvdream import TrainMVDreamConfig, train_mvdream

        config_class, train = TrainMVDreamConfig, train_mvdream
    if arch == "sd":
        from dream3d.toy.train_sd import TrainSDConfig, train_sd

        config_class, train = TrainSDConfig, train_sd
    out = out or Path(f"assets/toy-{arch}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    check_options(SampleOptions, seed=seed)  # torch's 64-bit seeds
    if steps is not None and steps > MAX_PRIOR_STEPS:
        raise UserError(f"steps: at most {MAX_PRIOR_STEPS} steps (checkpoint names hold 7 digits), got {steps}")
    cfg = check_options(config_class, seed=seed, **({"steps": steps} if steps is not None else {}))
    if threads is not None:
        torch.set_num_threads(threads)
    work = checkpoints or Path("runs") / "train-prior" / out.name
    _check_output_folder(out, "--out")  # before the training, not after it
    _check_output_folder(work, "--checkpoints")
    command = " ".join(["dream3d", "train-prior", *sys.argv[2:]])
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  {task.fields[rate]} it/s"), TimeRemainingColumn())
    bar = Progress(*columns, console=console)
    task = bar.add_task("training", total=cfg.steps, loss="-", rate="-")

    def on_step(event: TrainStep) -> None:
        bar.start()  # at the first step, so that a refused start prints only its error
        bar.update(task, completed=event.step, loss=f"{event.loss:.4f}", rate=f"{event.it_per_s:.2f}")

    try:
        train(cfg, out, work, resume, command, on_step, SignalStop())
    finally:
        if bar.live.is_started:
            bar.stop()
    console.print(f"model: {out}  checkpoints: {work}")


@app.command("sample")
def sample(
    prompt: str = typer.Argument(..., help="A prompt in the model's vocabulary."),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid of the samples."),
    prior: str = typer.Option("toy-unet-mv", help="toy-unet | toy-unet-mv | if (a pixel-space diffusers prior)."),
    model: Optional[str] = typer.Option(None, help="A diffusers folder or hub id (default: the prior's)."),
    n: int = typer.Option(4, help="How many samples."),
    elevation: float = typer.Option(15.0, help="Camera elevation (degrees) for camera-conditioned models."),
    azimuth: Optional[float] = typer.Option(None, help="Camera azimuth (degrees); default: n views around."),
    steps: int = typer.Option(50, help="DDIM steps."),
    guidance_scale: Optional[float] = typer.Option(None, help="CFG scale (default: the prior's)."),
    seed: int = typer.Option(0),
) -> None:
    """Draw DDIM samples of PROMPT as one PNG row.

    The prior is a pixel-space one."""
    from dream3d.config import SampleOptions, check_options
    from dream3d.toy.eval_prior import save_row, sample_views

    check_options(SampleOptions, n=n, steps=steps, seed=seed, elevation=elevation, azimuth=azimuth,
                  guidance_scale=guidance_scale)
    _check_output_file(out, "--out")
    images = sample_views(prior, model, prompt, n, elevation, azimuth, steps, guidance_scale, seed)
    save_row(images, out)
    console.print(f"samples: {out}")


@app.command("eval-prior")
def eval_prior(
    model: Optional[str] = typer.Option(None, help="A diffusers folder (default: the shipped one; needed for sd)."),
    prior: str = typer.Option("toy-unet", help="toy-unet (scores toy-unet and toy-unet-mv) | toy-mvdream | sd (a toy-sd folder)."),
    views: int = typer.Option(4, help="Cameras per class (toy-mvdream: 4-view sets per class)."),
    steps: int = typer.Option(50, help="DDIM steps."),
    guidance_scale: Optional[float] = typer.Option(None, help="Sampling CFG scale (default 9, from a sweep)."),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Also write the results here as JSON."),
) -> None:
    """Score a toy prior's samples of every toy class.

    toy-unet(-mv) samples: classification accuracy and silhouette IoU."""
    import json

    from dream3d.rundir.atomic import write_text
    from dream3d.config import SampleOptions, check_options
    from dream3d.toy.eval_prior import evaluate_multiview_prior, evaluate_prior, evaluate_sd_prior
    from dream3d.guidance.priors.toy_world import CLASSES

    evaluators = {"toy-unet": (evaluate_prior, ("toy-unet-mv", "toy-unet")),
                  "toy-mvdream": (evaluate_multiview_prior, ("toy-mvdream",)), "sd": (evaluate_sd_prior, ("sd",))}
    if prior not in evaluators:
        raise UserError(f"unknown --prior {prior!r} for eval-prior; valid: {', '.join(evaluators)}")
    if prior == "sd" and model is None:
        raise UserError("eval-prior --prior sd needs --model: a toy model in SD's layout (dream3d train-prior --arch sd)")
    if views < 1:
        raise UserError(f"views: must be at least 1, got {views}")
    check_options(SampleOptions, n=len(CLASSES) * views, steps=steps, seed=seed, guidance_scale=guidance_scale)
    evaluate, rows = evaluators[prior]
    results = evaluate(model, views, steps, guidance_scale, seed)
    if out is not None:
        write_text(out, json.dumps(results, indent=2) + "\n")
    typer.echo("| prior | class accuracy | median silhouette IoU | mean silhouette IoU |\n|---|---|---|---|")
    for name in rows:
        row = results[name]
        ious = [f"{row[k]:.3f}" if k in row else "-" for k in ("median_iou", "mean_iou")]
        typer.echo(f"| {name} | {row['accuracy']:.3f} | {' | '.join(ious)} |")
    if "view_agreement" in results[rows[0]]:
        typer.echo(f"4-view sets whose views all get one class: {results[rows[0]]['view_agreement']:.3f}")
    if "view_accuracy" in results[rows[0]]:
        typer.echo("view accuracy (the nearest render's view is the one asked): "
                   + ", ".join(f"{v} {a:.3f}" for v, a in results[rows[0]]["view_accuracy"].items()))


@app.command("recipes")
def recipes() -> None:
    """List the recipes (--recipe NAME): pipelines of stages.

    Each one's stages (name: representation/rule/steps) and what it follows."""
    from dream3d.config import RunSettings
    from dream3d.config.recipes import load_recipe, recipe_names, stage_lines

    for name in recipe_names():
        recipe = load_recipe(name)
        typer.echo(f"{name}: {', '.join(stage_lines(recipe, RunSettings.model_fields['steps'].default))}  "
                   f"({recipe.description})")


@app.command("models")
def models() -> None:
    """List the model aliases (--model NAME).

    Each one's hub ids in the order they are tried, which are in the local Hugging Face cache, and their
    sizes."""
    from dream3d.guidance.priors.hub import listing

    for line in listing():
        typer.echo(line)


@app.command("doctor")
def doctor() -> None:
    """Show what will run where on this machine.

    Device, torch/CUDA versions, free GPU memory, gsplat's and nerfacc's CUDA kernels (built or buildable),
    each representation's rasterizer and sampler, half precision, cached models."""
    from dream3d.eval.doctor import render

    render(Console(width=max(Console().width, 140)))


@app.command("web")
def web(
    host: str = typer.Option("127.0.0.1", help="Address to serve on (0.0.0.0: the local network)."),
    port: int = typer.Option(7860),
    share: bool = typer.Option(False, help="Also open a public share link through Gradio."),
    out: str = typer.Option("runs", help="The runs folder: new runs, the gallery, the only source of downloads."),
    config: Optional[Path] = typer.Option(None, help="A YAML config whose values become the page's defaults."),
    max_prompt_chars: int = typer.Option(200, help="Longer prompts are refused."),
    max_steps: int = typer.Option(2000, help="Runs of more steps are refused (one worker serves every visitor)."),
) -> None:
    """Serve the web app (needs: pip install 'dream3d[web]')."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must lie in 1..65535, got {port}")
    if max_prompt_chars < 1:
        raise UserError(f"--max-prompt-chars must be at least 1, got {max_prompt_chars}")
    _check_output_folder(Path(out), "--out")
    _check_host(host)
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web app needs gradio: pip install 'dream3d[web]'")
    from dream3d.web.app import launch, settings_from_files

    launch(settings_from_files(out, config, max_prompt_chars, max_steps), host, port, share)


def _check_output_folder(folder: Path, flag: str) -> None:
    """One line unless ``folder`` is, or can be made as, a writable folder; creates nothing."""
    existing = folder.absolute()
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if existing == folder.absolute() and not existing.is_dir():
        raise UserError(f"{flag} {folder} is not a folder")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {folder}: {existing} is not a writable folder")


def _check_output_file(path: Path, flag: str) -> None:
    """One line unless ``path`` can be written as a file (not a folder, in a folder that is or can be made writable)."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file")
    try:
        _check_output_folder(path.parent, flag)
    except UserError:
        raise UserError(f"cannot write {flag} {path}: its folder is not writable") from None


def _check_host(host: str) -> None:
    """One line unless the server can listen on ``host`` (an address of this machine, or a name resolving to one)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as e:  # socket.gaierror included
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror or e})") from None


def _fail(line: str) -> None:
    # plain write: rich would wrap a long message over several lines
    sys.stderr.write(line.replace("\n", " ") + "\n")


def main() -> None:
    try:
        status = app(standalone_mode=False)  # a command's typer.Exit(code) comes back here
    except (Abort, KeyboardInterrupt):
        sys.exit(130)
    except TyperException as e:
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _fail(f"error: {message}")
        sys.exit(2)
    except Exception as e:
        if type(e).__name__ in ("RunInterrupted", "BatchInterrupted"):
            _fail(f"interrupted: {e}")
            exit_after_signal(130)
            sys.exit(130)
        if not isinstance(e, user_errors()):
            raise
        _fail(f"error: {one_line(e)}")
        sys.exit(1)
    if status:
        sys.exit(status)
