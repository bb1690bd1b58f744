"""``dream3d web`` end to end: the server on a free loopback port, driven over HTTP and by
Debian's chromium (headless, through Playwright). The finished page's screenshot is kept
under test-artifacts/web/."""

import http.client
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import pytest
import trimesh
import yaml

from tests.support import TINY
from tests.web_server import CHROMIUM, CHROMIUM_ARGS, free_port, start_web

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
PROMPT_LIMIT = 40
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")


@dataclass
class Server:
    url: str
    host: str
    port: int
    runs: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 24, "preview_every": 3}))
    port = free_port()
    log = open(root / "server.log", "w")
    try:
        process = start_web(port, ["--out", str(root / "runs"), "--config", str(config),
                                   "--max-prompt-chars", str(PROMPT_LIMIT)], log)
    except RuntimeError:
        pytest.fail(f"dream3d web did not start:\n{(root / 'server.log').read_text()}")
    yield Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, root / "runs")
    process.terminate()
    process.wait(20)
    log.close()


def _get(server: Server, raw_path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalising of .. or %2F)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("GET", raw_path)
    response = connection.getresponse()
    return response.status, response.read()


def test_downloads_come_only_from_the_runs_folder(server, tmp_path):
    inside = server.runs / "a-run" / "export" / "note.txt"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_text("inside")
    assert _get(server, "/download/a-run/export/note.txt") == (200, b"inside")
    for raw in (
        "/download/../../../../etc/passwd",
        "/download/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/download/%2Fetc%2Fpasswd",
        "/download/a-run/../../tiny.yaml",
        "/gradio_api/file=/etc/passwd",
    ):
        status, body = _get(server, raw)
        assert status in (403, 404), raw
        assert b"root:" not in body
    shutil.rmtree(server.runs / "a-run")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.wait_for_selector("#generate")
    yield page
    context.close()


def _submit(page, prompt: str, steps: int | None = None) -> None:
    page.fill("#prompt input", prompt)
    if steps is not None:
        page.fill("#steps input", str(steps))
    page.click("#generate")


def _progress(page) -> dict:
    return page.evaluate("""() => {
        const bar = document.querySelector('#progress .d3-progress');
        const img = document.querySelector('#preview img');
        return {state: bar && bar.dataset.state, step: bar ? Number(bar.dataset.step) : 0,
                text: bar ? bar.innerText : '', preview: img ? img.src : null,
                message: document.querySelector('#message').innerText};
    }""")


def _watch_until_finished(page, timeout_s: float = 240) -> list[dict]:
    """Samples the progress bar and preview until the run finishes; returns the samples."""
    samples, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples.append(_progress(page))
        if samples[-1]["state"] in ("done", "stopped", "failed"):
            return samples
        if "error" in samples[-1]["message"].lower():
            pytest.fail(f"the page shows an error: {samples[-1]['message']}")
        time.sleep(0.1)
    pytest.fail(f"the run did not finish; last: {samples[-1]}")


def _wait_for_drawing(canvas, timeout_s: float = 30) -> None:
    """Waits until the canvas shows more than a uniform background (the viewer drew the mesh)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pixels = iio.imread(canvas.screenshot(), extension=".png")[..., :3].astype(float)
        if pixels.std(axis=(0, 1)).max() > 10:
            return
        if time.monotonic() > deadline:
            pytest.fail("the 3D viewer's canvas stayed blank")
        time.sleep(0.5)


@needs_chromium
def test_generate_shows_progress_preview_viewer_and_downloads(page, tmp_path):
    glb_responses = []
    page.on("response", lambda r: glb_responses.append(r.status) if r.url.endswith(".glb") else None)
    _submit(page, "a red cube", steps=24)
    samples = _watch_until_finished(page)
    assert samples[-1]["state"] == "done", page.inner_text("#message")
    steps = [s["step"] for s in samples if s["state"] == "running"]
    assert len(set(steps)) >= 2 and steps == sorted(steps), steps
    assert any("loss" in s["text"] and "ETA" in s["text"] for s in samples if s["state"] == "running")
    previews = [s["preview"] for s in samples if s["preview"]]
    assert len(set(previews)) >= 2, "the preview did not update during the run"

    page.wait_for_selector("#model3d canvas")
    deadline = time.monotonic() + 60
    while 200 not in glb_responses and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert 200 in glb_responses, "the 3D viewer did not fetch the GLB"
    _wait_for_drawing(page.locator("#model3d canvas"))
    assert "done" in page.inner_text("#message")
    assert page.locator("#summary").inner_text().count("a red cube") >= 1
    with page.expect_download() as download:
        page.click("#downloads a[data-kind=glb]")
    glb = tmp_path / "model.glb"
    download.value.save_as(glb)
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0
    assert page.locator("#downloads a[data-kind=obj_zip]").count() == 1

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "finished-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the finished page: {shot}")

    page.click("#gallery button.thumbnail-item")
    page.wait_for_function("() => document.querySelector('#message').innerText.includes('reopened')")
    assert page.input_value("#prompt input") == "a red cube"


@needs_chromium
@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a zebra", "zebra"),
        ("a red cube " * 5, f"the limit is {PROMPT_LIMIT}"),
    ],
)
def test_bad_input_is_a_message_in_the_page(page, prompt, message):
    _submit(page, prompt)
    page.wait_for_function("() => document.querySelector('#message').innerText.includes('error')")
    text = page.inner_text("#message")
    assert message in text and "Traceback" not in text


@needs_chromium
def test_two_runs_submitted_at_once_run_one_after_the_other(browser, server):
    pages = []
    for _ in range(2):
        context = browser.new_context()
        pages.append(context.new_page())
        pages[-1].set_default_timeout(60_000)
        pages[-1].goto(server.url)
        pages[-1].wait_for_selector("#generate")
    before = set(server.runs.glob("*")) if server.runs.exists() else set()
    _submit(pages[0], "a blue sphere", steps=8)
    _submit(pages[1], "a green cone", steps=8)
    pages[1].wait_for_function("() => document.querySelector('#progress').innerText.includes('queued: position 2')")
    finished = [_watch_until_finished(p)[-1]["state"] for p in pages]
    assert finished == ["done", "done"]
    first, second = sorted(set(server.runs.glob("*")) - before, key=lambda p: p.name.startswith("a-green"))
    assert first.name.startswith("a-blue-sphere") and second.name.startswith("a-green-cone")
    # the second run's folder was made after the first had exported
    assert (second / "config.yaml").stat().st_mtime >= (first / "summary.json").stat().st_mtime
    for p in pages:
        p.context.close()
