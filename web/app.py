"""The Gradio page of ``dream3d web``: form, live progress, results, gallery of earlier runs.

A layer over dream3d.api: a Generate press validates the form into a RunConfig, puts a
job in the JobQueue and then polls it, redrawing the progress bar and the preview from
the loop's events until the run exports. Files are served to the browser from the runs
folder only (the /download route and Gradio's allowed_paths), and none of its hidden files.
"""

from __future__ import annotations

import html
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio reads it

import gradio as gr
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dream3d.rundir import folder as rundir
from dream3d.config import AUTO, GUIDANCES, PRIOR_CHOICES, REPRESENTATIONS, ConfigError, RunConfig, load_yaml
from dream3d.errors import user_errors
from dream3d.rundir.job import FAILED, QUEUED, RUNNING, STOPPED
from dream3d.rundir.result import Result
from dream3d.web.form import NO_RECIPE, FormValues, config_from_form, defaults, recipe_choices, resolution_text
from dream3d.web.queue import JobQueue, Snapshot
from dream3d.web.runs import DOWNLOAD_ROUTE, RunsFolder

log = logging.getLogger(__name__)
# system fonts: the default theme fetches web fonts, and the app must work offline
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class WebSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = "runs"  # the runs folder: new runs, the gallery, the only source of downloads
    base: dict[str, Any] = {}  # a config layer under the form (e.g. from --config)
    max_prompt_chars: int = Field(200, gt=0)
    # one worker serves every visitor: a run of this many steps (the default run is 600) takes some
    # minutes on a CPU, so no one visitor holds the worker for long
    max_steps: int = Field(2000, gt=0)
    preview_every: int = Field(20, gt=0)  # the page's preview cadence unless base sets one
    poll_s: float = Field(0.25, gt=0)

    def base_layer(self) -> dict[str, Any]:
        return {"preview_every": self.preview_every, **self.base}


def settings_from_files(out: str, config: Path | None, max_prompt_chars: int, max_steps: int = 2000) -> WebSettings:
    """Settings for the CLI; a bad --config fails here in one line, before the server starts."""
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {max_steps}")
    settings = WebSettings(out=out, base=load_yaml(config) if config else {}, max_prompt_chars=max_prompt_chars,
                           max_steps=max_steps)
    defaults(settings.base_layer())
    return settings


def progress_html(snap: Snapshot) -> str:
    """The progress bar: a <progress> element and one line (queue position, or step, loss, speed, ETA)."""
    if snap.state == QUEUED:
        ahead = "run" if snap.position == 1 else "runs"
        line = f"queued: position {snap.position + 1} in the queue ({snap.position} {ahead} ahead)"
    else:
        loss = "-" if snap.loss is None else f"{snap.loss:.4g}"
        eta = int(round(snap.eta_s)) if snap.state == RUNNING else 0
        line = f"{snap.state}: step {snap.step}/{snap.total} · loss {loss} · {snap.it_per_s:.1f} it/s · ETA {eta // 60}:{eta % 60:02d}"
    return (
        f'<div class="d3-progress" data-state="{snap.state}" data-step="{snap.step}" data-total="{snap.total}">'
        f'<progress value="{snap.step}" max="{max(snap.total, 1)}"></progress> <span>{html.escape(line)}</span></div>'
    )


def downloads_html(result: Result, runs: RunsFolder) -> str:
    labels = {"glb": "GLB", "obj_zip": "OBJ (zip)", "splats": "Splats PLY", "video": "Orbit video"}
    files = runs.downloads(result)
    links = [
        f'<a class="d3-download" data-kind="{kind}" href="{runs.url(files[kind])}" download>{label}</a>'
        for kind, label in labels.items() if kind in files
    ]
    return '<div class="d3-downloads">' + " · ".join(links) + "</div>" if links else ""


def download_route(runs: RunsFolder) -> Route:
    """GET /download/<path inside the runs folder>: the file as an attachment, or 403."""

    async def download(request: Request) -> Response:
        path = runs.resolve(request.path_params["path"])
        if path is None:
            return PlainTextResponse("only files inside the runs folder can be downloaded", status_code=403)
        return FileResponse(path, filename=path.name)

    return Route(DOWNLOAD_ROUTE + "/{path:path}", download, methods=["GET", "HEAD"])


def build_app(settings: WebSettings, jobs: JobQueue, runs: RunsFolder) -> gr.Blocks:
    """The page; ``jobs`` runs the optimisations, ``runs`` is the folder they write to."""
    start = defaults(settings.base_layer())
    with gr.Blocks(title="dream3d", analytics_enabled=False) as demo:
        gr.Markdown("# dream3d\nText to 3D by score distillation.")
        job_id = gr.State(None)
        gallery_runs = gr.State([])
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", elem_id="prompt", max_lines=1)
                with gr.Row():
                    # auto unless the --config layer names a prior: the concrete one is picked per prompt
                    prior = gr.Dropdown(list(PRIOR_CHOICES), value=settings.base_layer().get("prior", AUTO), label="Prior",
                                        elem_id="prior")
                    guidance = gr.Dropdown(list(GUIDANCES), value=start.guidance, label="Guidance", elem_id="guidance")
                    representation = gr.Dropdown(
                        list(REPRESENTATIONS), value=start.representation, label="Representation", elem_id="representation"
                    )
                recipe = gr.Dropdown(recipe_choices(), value=NO_RECIPE, elem_id="recipe",
                                     label="Recipe (a pipeline of stages: it sets the guidance and representation)")
                with gr.Row():
                    steps = gr.Number(start.steps, label="Steps", precision=0, minimum=1, elem_id="steps")
                    seed = gr.Number(start.seed, label="Seed", precision=0, elem_id="seed")
                    resolution = gr.Textbox(resolution_text(start), label="Resolution", elem_id="resolution")
                with gr.Accordion("Advanced", open=False):
                    guidance_scale = gr.Number(None, label="Guidance scale (empty: the prior's default)", elem_id="guidance-scale")
                    lr_scale = gr.Number(
                        start.optim.lr_scale if isinstance(start.optim.lr_scale, (int, float)) else None,
                        label="Learning-rate scale (multiplies every parameter group's rate)", elem_id="lr-scale",
                    )
                    particles = gr.Number(
                        None, label="Particles (representations optimised together, one export each)", precision=0,
                        elem_id="particles",
                    )
                    overrides = gr.Textbox(
                        label="More settings: key=value per line (as on the command line)", lines=2, elem_id="overrides"
                    )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                message = gr.Markdown(elem_id="message")
                progress = gr.HTML(elem_id="progress")
                preview = gr.Image(label="Preview", type="filepath", interactive=False, elem_id="preview")
            with gr.Column():
                model3d = gr.Model3D(label="3D model", elem_id="model3d")
                video = gr.Video(label="Orbit", interactive=False, height=300, elem_id="orbit")
                downloads = gr.HTML(elem_id="downloads")
                summary = gr.JSON(label="Run summary", elem_id="summary")
        gallery = gr.Gallery(
            label="Earlier runs (click one to reopen it)", columns=6, height=200, object_fit="contain", allow_preview=False,
            elem_id="gallery",
        )

        form = [prompt, prior, guidance, representation, steps, seed, resolution, guidance_scale, lr_scale, particles, overrides,
                recipe]
        results = [model3d, video, downloads, summary]

        def show(result: Result) -> dict:
            return {
                model3d: str(result.files["glb"]) if "glb" in result.files else None,
                video: str(result.files["video"]) if "video" in result.files else None,
                downloads: downloads_html(result, runs),
                summary: result.summary or None,
                preview: str(result.preview) if result.preview else None,
            }

        def refresh_gallery() -> dict:
            listed = [run for run in runs.runs() if run.preview is not None]
            return {
                gallery: [(str(run.preview), run.run_dir.name) for run in listed],
                gallery_runs: [run.run_dir.name for run in listed],
            }

        def on_generate(*values: Any) -> Iterator[dict]:
            """Streams the queue position, then progress and preview, until the job finishes."""
            try:
                cfg = config_from_form(FormValues(*values), settings.base_layer(), settings.out, settings.max_prompt_chars,
                                       settings.max_steps)
            except ConfigError as e:
                yield {job_id: None, message: f"**error:** {e}", progress: ""}
                return
            except Exception as e:  # a bug: one line in the page, the traceback in the server log
                log.exception("the form could not be read")
                yield {job_id: None, message: f"**error:** internal error ({type(e).__name__}); see the server log", progress: ""}
                return
            job = jobs.submit(cfg)
            yield {job_id: job.id, message: "", model3d: None, video: None, downloads: "", summary: None, preview: None}
            shown = None
            while not job.finished:
                snap = jobs.snapshot(job)
                if snap.preview is not None and (shown is None or snap.preview != shown.preview):
                    yield {progress: progress_html(snap), preview: str(snap.preview)}
                elif shown is None or (snap.state, snap.position, snap.step) != (shown.state, shown.position, shown.step):
                    yield {progress: progress_html(snap)}
                shown = snap
                time.sleep(settings.poll_s)
            yield {progress: progress_html(jobs.snapshot(job))}

        def on_finished(current: str | None) -> dict:
            """The results of a finished job (a separate event: Model3D renders a value set by a plain
            event, not the last one of a generator)."""
            job = jobs.get(current) if current else None
            if job is None or not job.finished:
                return gr.skip()  # the form was refused: its message is already shown
            if job.state == FAILED:
                return {message: f"**error:** {job.error}"}
            if job.run_dir is None:
                return {message: "stopped before it started"}
            result = Result.load(Path(job.run_dir))
            note = "stopped early; exported what it reached" if job.state == STOPPED else "done"
            return {message: f"{note}: `{result.run_dir.name}`", **show(result), **refresh_gallery()}

        def on_stop(current: str | None) -> dict:
            job = jobs.get(current) if current else None
            if job is None or not jobs.stop(current):
                return {message: "nothing is running"}
            return {message: "removed from the queue" if job.finished else "stopping after the current step..."}

        def on_reopen(names: list[str], evt: gr.SelectData) -> dict:
            result = runs.find(names[evt.index]) if evt.index < len(names) else None
            if result is None:
                return {message: "**error:** that run is no longer in the runs folder", **refresh_gallery()}
            update = {message: f"reopened `{result.run_dir.name}`", progress: "", **show(result)}
            cfg = _saved_config(result.run_dir)
            if cfg is not None:
                update.update({
                    prompt: cfg.prompt, prior: cfg.prior, guidance: cfg.guidance, representation: cfg.representation,
                    steps: cfg.steps, seed: cfg.seed, resolution: resolution_text(cfg),
                })
            return update

        generate.click(
            on_generate, form, [job_id, message, progress, preview, *results], concurrency_limit=None, show_progress="hidden"
        ).then(on_finished, [job_id], [message, preview, *results, gallery, gallery_runs], show_progress="hidden")
        stop.click(on_stop, [job_id], [message], concurrency_limit=None, show_progress="hidden")
        gallery.select(on_reopen, [gallery_runs], [message, progress, preview, *results, *form, gallery, gallery_runs])
        demo.load(refresh_gallery, None, [gallery, gallery_runs])
    return demo


def _saved_config(run_dir: Path) -> RunConfig | None:
    try:
        return rundir.load_run_config(run_dir)
    except user_errors():
        return None


def launch(settings: WebSettings, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serves the page until interrupted."""
    runs = RunsFolder(Path(settings.out))
    runs.root.mkdir(parents=True, exist_ok=True)
    demo = build_app(settings, JobQueue(), runs)
    demo.queue(default_concurrency_limit=None).launch(
        server_name=host, server_port=port, share=share, theme=THEME, ssr_mode=False, **serving(runs),
    )


def serving(runs: RunsFolder) -> dict[str, Any]:
    """Gradio's launch options for the files it serves: the runs folder only, none of its hidden files, and the
    /download route."""
    return {"allowed_paths": [str(runs.root)],
            "app_kwargs": {"routes": [download_route(runs)], "middleware": [Middleware(HiddenRunFiles, runs=runs)]}}


class HiddenRunFiles:
    """ASGI middleware: Gradio's own file route (``/gradio_api/file=PATH``) serves no hidden file under the runs
    folder (a run's ``.lock``, the temporary file of an unfinished write), as /download does not; Gradio's
    ``blocked_paths`` names whole paths, not a rule for names that appear with every new run."""

    def __init__(self, app: ASGIApp, runs: RunsFolder) -> None:
        self.app, self.root = app, runs.root

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._hidden(scope["path"]):
            await PlainTextResponse("hidden files of a run are not served", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _hidden(self, path: str) -> bool:
        _, route, target = path.partition("/file=")
        if not route:
            return False
        try:
            # as written (after "..") and with links resolved: a visible link may lead to a hidden file
            candidates = (Path(os.path.abspath(target)), Path(target).resolve())
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop: not a file to serve either
            return True
        return any(c.is_relative_to(self.root) and any(part.startswith(".") for part in c.relative_to(self.root).parts)
                   for c in candidates)
