"""Regenerates the README's pictures in docs/images/: two toy-world runs (a NeRF and 3D Gaussians)
made through the public API, an orbit strip of each (rendered from its trained representation) and one GIF of both turning, and a screenshot of the
web app reopening one of them.

    .venv/bin/python docs/make_pictures.py                          # two default runs: minutes each on a CPU
    .venv/bin/python docs/make_pictures.py --runs /tmp/pictures --reuse  # pictures again from runs made before

The screenshot needs Debian's chromium (apt-get install chromium) and the web extra; the browser
is driven through Playwright with the browser test's helpers (tests/web_server.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dream3d
from dream3d import api
from dream3d.representations.cameras import look_at_cameras

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from docs/: the browser test's helpers live in tests/
from tests.web_server import CHROMIUM, CHROMIUM_ARGS, free_port, start_web  # noqa: E402

IMAGES = ROOT / "docs" / "images"
RUNS = {"nerf": "a blue torus", "gaussians": "a yellow cone"}
STRIP_FRAMES = 6
GIF_FRAMES = 24
FRAME_SIZE = 128
DISTANCE = 2.0  # closer than the export's video (2.5): the toy shapes fill more of the frame
FOVY = 45.0
GIF_ELEVATION = 30.0  # above the video's 15 degrees, so that a torus shows its hole
RENDER_BATCH = 8
SCREENSHOT_WIDTH = 960


def render_views(run_dir: Path, elevations: np.ndarray, azimuths: np.ndarray) -> list[np.ndarray]:
    """The run's trained representation seen from each (elevation, azimuth) in degrees, as uint8 frames."""
    _, representation = api.load_representation(run_dir)
    n = len(azimuths)
    cameras = look_at_cameras(torch.tensor(elevations, dtype=torch.float32), torch.tensor(azimuths, dtype=torch.float32),
                              torch.full((n,), DISTANCE), FOVY, FRAME_SIZE, FRAME_SIZE)
    frames = []
    with torch.no_grad():
        for start in range(0, n, RENDER_BATCH):
            rgb = representation.render(cameras[start:start + RENDER_BATCH], torch.ones(3)).rgb.clamp(0, 1)
            frames += list((rgb.numpy() * 255).round().astype(np.uint8))
    return frames


def make_run(representation: str, prompt: str, runs: Path, steps: int | None, reuse: bool) -> Path:
    """The folder of a run of ``prompt``: the newest finished one in ``runs`` with reuse, else a new one."""
    if reuse:
        made = [run for run in sorted(runs.glob(prompt.replace(" ", "-") + "-*")) if dream3d.Result.load(run).files]
        if made:
            return made[-1]
    options = {"representation": representation, "out": str(runs)}
    if steps is not None:
        options["steps"] = steps
    started = time.monotonic()
    result = dream3d.generate(prompt, **options)
    print(f"{representation}: '{prompt}' in {time.monotonic() - started:.0f} s -> {result.run_dir}")
    return result.run_dir


def write_orbits(run_dirs: dict[str, Path]) -> None:
    # the strip climbs as it turns (0 to 60 degrees of elevation), so a round shape shows more than one face
    strip_views = np.linspace(0, 60, STRIP_FRAMES), np.linspace(0, 360, STRIP_FRAMES, endpoint=False)
    gif_views = np.full(GIF_FRAMES, GIF_ELEVATION), np.linspace(0, 360, GIF_FRAMES, endpoint=False)
    for name, run_dir in run_dirs.items():
        strip = np.concatenate(render_views(run_dir, *strip_views), axis=1)
        Image.fromarray(strip).save(IMAGES / f"orbit-{name}.png", optimize=True)
    # both runs side by side in one small looping GIF
    columns = [render_views(run_dir, *gif_views) for run_dir in run_dirs.values()]
    frames = [Image.fromarray(np.concatenate(row, axis=1)).quantize(64) for row in zip(*columns)]
    frames[0].save(IMAGES / "orbit.gif", save_all=True, append_images=frames[1:], duration=120, loop=0, optimize=True)


def screenshot_web(runs: Path) -> None:
    """Serves ``runs`` with ``dream3d web``, reopens the first run of its gallery and screenshots the page above it."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_web(port, ["--out", str(runs)])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}")
            page.click("#gallery button.thumbnail-item")
            page.wait_for_function("() => document.querySelector('#message').innerText.includes('reopened')")
            page.wait_for_selector("#model3d canvas")
            page.wait_for_timeout(5000)  # the viewer fetches the GLB and draws it after the page settles
            shot = Path(tempfile.mkdtemp()) / "web.png"
            # down to the gallery: once a run is reopened its thumbnails scroll out of their frame
            gallery_top = page.locator("#gallery").bounding_box()["y"]
            page.screenshot(path=str(shot), full_page=True, clip={"x": 0, "y": 0, "width": 1400, "height": gallery_top})
            browser.close()
    finally:
        server.terminate()
        server.wait(20)
    image = Image.open(shot).convert("RGB")
    image = image.resize((SCREENSHOT_WIDTH, round(image.height * SCREENSHOT_WIDTH / image.width)), Image.LANCZOS)
    image.save(IMAGES / "web.webp", quality=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the run default)")
    parser.add_argument("--runs", type=Path, default=None, help="runs folder to keep (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="take finished runs of the prompts from --runs")
    parser.add_argument("--no-screenshot", action="store_true", help="only the orbit pictures")
    args = parser.parse_args()
    runs = args.runs or Path(tempfile.mkdtemp(prefix="dream3d-pictures-"))
    IMAGES.mkdir(exist_ok=True)
    started = time.monotonic()
    run_dirs = {name: make_run(name, prompt, runs, args.steps, args.reuse) for name, prompt in RUNS.items()}
    write_orbits(run_dirs)
    if not args.no_screenshot:
        screenshot_web(runs)
    print(f"pictures in {IMAGES} after {time.monotonic() - started:.0f} s:")
    for path in sorted(IMAGES.iterdir()):
        print(f"  {path.name}: {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
