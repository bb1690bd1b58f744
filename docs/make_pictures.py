"""Regenerates the README's pictures in docs/images/: two toy-world runs (a NeRF and 3D Gaussians)
made through the public API, an orbit strip of each and one GIF of both, and a screenshot of the
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

import imageio.v2 as imageio
import numpy as np
from PIL import Image

import dream3d

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from docs/: the browser test's helpers live in tests/
from tests.web_server import CHROMIUM, CHROMIUM_ARGS, free_port, start_web  # noqa: E402

IMAGES = ROOT / "docs" / "images"
RUNS = {"nerf": "a blue torus", "gaussians": "a yellow cone"}
STRIP_FRAMES = 6
GIF_FRAMES = 24
SCREENSHOT_WIDTH = 960


def orbit_frames(video: Path, count: int) -> list[np.ndarray]:
    """``count`` frames evenly spaced over the orbit video (one full turn)."""
    with imageio.get_reader(video, "ffmpeg") as reader:
        frames = [frame for frame in reader]
    picks = np.linspace(0, len(frames), count, endpoint=False).astype(int)
    return [frames[i] for i in picks]


def make_run(representation: str, prompt: str, runs: Path, steps: int | None, reuse: bool) -> Path:
    """The orbit video of a run of ``prompt``: the newest finished one in ``runs`` with reuse, else a new one."""
    if reuse:
        made = sorted(runs.glob(prompt.replace(" ", "-") + "-*"))
        videos = [dream3d.Result.load(run).files.get("video") for run in made]
        if videos and videos[-1] is not None:
            return videos[-1]
    options = {"representation": representation, "out": str(runs)}
    if steps is not None:
        options["steps"] = steps
    started = time.monotonic()
    result = dream3d.generate(prompt, **options)
    print(f"{representation}: '{prompt}' in {time.monotonic() - started:.0f} s -> {result.run_dir}")
    return result.files["video"]


def write_orbits(videos: dict[str, Path]) -> None:
    for name, video in videos.items():
        strip = np.concatenate(orbit_frames(video, STRIP_FRAMES), axis=1)
        Image.fromarray(strip).save(IMAGES / f"orbit-{name}.png", optimize=True)
    # both runs side by side in one small looping GIF
    columns = [orbit_frames(video, GIF_FRAMES) for video in videos.values()]
    frames = [Image.fromarray(np.concatenate(row, axis=1)).quantize(64) for row in zip(*columns)]
    frames[0].save(IMAGES / "orbit.gif", save_all=True, append_images=frames[1:], duration=120, loop=0, optimize=True)


def screenshot_web(runs: Path) -> None:
    """Serves ``runs`` with ``dream3d web``, reopens the first run of its gallery and screenshots the page."""
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
            page.screenshot(path=str(shot), full_page=True)
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
    videos = {name: make_run(name, prompt, runs, args.steps, args.reuse) for name, prompt in RUNS.items()}
    write_orbits(videos)
    if not args.no_screenshot:
        screenshot_web(runs)
    print(f"pictures in {IMAGES} after {time.monotonic() - started:.0f} s:")
    for path in sorted(IMAGES.iterdir()):
        print(f"  {path.name}: {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
