"""A run folder writes nothing outside itself: `export`, `resume`, `eval` and `refine` on a run folder whose
`.lock`, `export/`, `previews/`, `checkpoints/` or `summary.json` is a symlink out are refused in one line
naming the link, and the files outside stay byte-identical. Also: leftovers of a killed write are removed at the
next start, cleanup deletes only dream3d's own files, a damaged summary or metrics log is refused or recovered
before anything is rewritten, and the web app's own file route serves no hidden file of a run."""

import errno
import json
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dream3d import api
from dream3d.rundir import folder as rundir
from dream3d.config import build_config
from dream3d.run.loop import RunError, disk_errors
from tests.support import TINY, dream3d

COMMANDS = {"export": ["--formats", "ply"], "resume": [], "eval": [], "refine": ["--steps", "2"]}
# a quick export that still has a texture (refine's input): no video, the density filled rather than carved
QUICK_EXPORT = {"export": {**TINY["export"], "solid": "fill", "video": False}}
BINARY = bytes(range(256)) * 4  # not UTF-8, NUL bytes


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny NeRF run stopped at step 7 of 12 and exported (checkpoints 5 and 7, previews, a textured export),
    kept pristine: tests use copies."""
    out = tmp_path_factory.mktemp("runs")
    seen = []
    cfg = build_config({"prompt": "a red cube"}, TINY, QUICK_EXPORT, {"out": str(out)})
    api.run(cfg, seen.append, lambda: bool(seen) and seen[-1].step >= 7, export_on_stop=True)
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture
def run_dir(stopped, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped, copy)
    return copy


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def link_out(run_dir: Path, outside: Path, name: str) -> Path:
    """Moves ``run_dir/name`` (a file or a folder, if there) to ``outside`` and leaves a symlink to it in its place;
    ``.lock`` points at an outside file holding some text. Returns the link."""
    link, target = run_dir / name, outside / name
    if name == ".lock":
        target.write_text("precious\n")
        link.unlink(missing_ok=True)
    else:
        shutil.move(link, target)
    link.symlink_to(target)
    return link


def one_error_line(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines


@pytest.mark.parametrize("name", [".lock", "export", "previews", "checkpoints", "summary.json"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_link_out_of_the_run_folder_is_refused_and_nothing_outside_changes(run_dir, outside, monkeypatch, capsys,
                                                                               command, name):
    link = link_out(run_dir, outside, name)
    before = snapshot(outside)
    status, err = dream3d(monkeypatch, capsys, command, run_dir, *COMMANDS[command])
    assert status == 1
    one_error_line(err, str(link), "outside the run folder")
    assert snapshot(outside) == before
    assert link.is_symlink()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_dangling_lock_link_creates_no_file_outside(run_dir, outside, monkeypatch, capsys, command):
    (run_dir / ".lock").unlink(missing_ok=True)
    (run_dir / ".lock").symlink_to(outside / "created")
    status, err = dream3d(monkeypatch, capsys, command, run_dir, *COMMANDS[command])
    assert status == 1
    one_error_line(err, str(run_dir / ".lock"))
    assert list(outside.iterdir()) == []


def test_the_api_raises_run_dir_error_for_a_link_out(run_dir, outside):
    link = link_out(run_dir, outside, "export")
    before = snapshot(outside)
    with pytest.raises(rundir.RunDirError, match=f"refusing {link}: .*outside the run folder"):
        api.export(run_dir)
    assert snapshot(outside) == before


def test_a_link_inside_the_run_folder_is_followed(run_dir, monkeypatch, capsys):
    (run_dir / "export").rename(run_dir / "export-real")
    (run_dir / "export").symlink_to("export-real")
    status, err = dream3d(monkeypatch, capsys, "export", run_dir, "--formats", "ply")
    assert status == 0, err
    assert (run_dir / "export-real" / "model.ply").stat().st_size > 0


# -- cleanup deletes only its own files --------------------------------------------------------------------------

def test_checkpoint_cleanup_deletes_only_its_own_files(run_dir, outside):
    checkpoints = run_dir / "checkpoints"
    victim = outside / "step_000001.pt"
    shutil.copy(checkpoints / "step_000005.pt", victim)
    (checkpoints / "step_000001.pt").symlink_to(victim)  # a link is not a checkpoint dream3d wrote
    (checkpoints / "step_000002.pt").mkdir()  # nor is a folder
    (checkpoints / "step_notes.pt").write_text("the user's notes")  # nor a name it never gives
    before = snapshot(outside)
    rundir.save_checkpoint(run_dir, {"step": 12}, 12, keep=2)  # what the loop calls: cleanup keeps the newest 2
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_000001.pt", "step_000002.pt", "step_000007.pt", "step_000012.pt", "step_notes.pt"]
    assert (checkpoints / "step_000001.pt").is_symlink() and snapshot(outside) == before


def test_a_checkpoint_path_that_is_a_folder_is_no_checkpoint(run_dir):
    (run_dir / "checkpoints" / "step_000099.pt").mkdir()
    assert rundir.latest_state(run_dir)[0].name == "step_000007.pt"  # what resume, export and eval load
    with pytest.raises(RunError, match="the last good checkpoint is .*step_000007.pt "):
        with disk_errors(run_dir):
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "metrics.jsonl"))


# -- leftovers of a killed write ---------------------------------------------------------------------------------

LEFTOVERS = ["checkpoints/.step_000009.k2j4h5g6.tmp.pt", "previews/.step_000010.abcdefgh.tmp.png", ".summary.x1_y2z3w.tmp.json",
             "export/.model.ab12cd34.tmp.glb", "export/.splats.ply.abcd_fgh.tmp"]
NOT_LEFTOVERS = ["checkpoints/notes.txt", "export/.hidden", ".step_000009.tmp.pt", "export/.model.glb.tmp.bak"]


def test_leftovers_of_a_killed_write_are_removed_at_the_next_start(run_dir, outside, monkeypatch, capsys):
    for name in LEFTOVERS + NOT_LEFTOVERS:
        (run_dir / name).write_bytes(b"x" * 1000)
    (outside / "victim").write_text("precious")
    (run_dir / "checkpoints" / ".step_000011.abcdefgh.tmp.pt").symlink_to(outside / "victim")
    status, err = dream3d(monkeypatch, capsys, "export", run_dir, "--formats", "ply")
    assert status == 0, err
    assert [name for name in LEFTOVERS if (run_dir / name).exists()] == []
    assert [name for name in NOT_LEFTOVERS if not (run_dir / name).is_file()] == []
    assert (run_dir / "checkpoints" / ".step_000011.abcdefgh.tmp.pt").is_symlink()
    assert (outside / "victim").read_text() == "precious"


# -- damaged records ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [b"{not json", BINARY, b"[1, 2]"], ids=["text", "binary", "not-an-object"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_damaged_summary_is_refused_before_anything_is_rewritten(run_dir, monkeypatch, capsys, command, damage):
    (run_dir / "summary.json").write_bytes(damage)
    before = snapshot(run_dir)
    status, err = dream3d(monkeypatch, capsys, command, run_dir, *COMMANDS[command])
    assert status == 1
    one_error_line(err, str(run_dir / "summary.json"))
    after = snapshot(run_dir)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


def test_binary_garbage_after_the_metrics_log_is_dropped_on_resume(run_dir):
    with open(run_dir / "metrics.jsonl", "ab") as log:
        log.write(BINARY)
    rundir.truncate_metrics(run_dir, 7)  # what resume calls before it trains on
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_result_load_reads_nothing_through_a_link_out(run_dir, outside):
    link_out(run_dir, outside, "summary.json")
    link_out(run_dir, outside, "previews")
    result = api.Result.load(run_dir)
    assert result.summary == {} and result.files == {} and result.preview is None


def test_result_load_lists_no_export_file_behind_a_linked_export_folder(run_dir, outside):
    link_out(run_dir, outside, "export")
    assert api.Result.load(run_dir).files == {}


# -- the web app's own file route ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_gradios_file_route_serves_no_hidden_file_of_a_run(tmp_path):
    from dream3d.web.app import WebSettings, build_app, serving
    from dream3d.web.queue import JobQueue
    from dream3d.web.runs import RunsFolder

    run = tmp_path / "runs" / "a-run"
    (run / "export").mkdir(parents=True)
    (run / ".lock").write_text("pid 1 (dream3d run)")
    (run / "export" / ".model.abcdefgh.tmp.glb").write_bytes(b"half")
    (run / "export" / "model.glb").write_bytes(b"glb")
    runs = RunsFolder(tmp_path / "runs")
    demo = build_app(WebSettings(out=str(runs.root)), JobQueue(), runs)
    port = _free_port()
    demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True, **serving(runs))
    try:
        base = f"http://127.0.0.1:{port}/gradio_api/file="
        assert _status(base + str(runs.root / "a-run" / "export" / "model.glb")) == 200
        assert _status(base + str(runs.root / "a-run" / ".lock")) == 403
        assert _status(base + str(runs.root / "a-run" / "export" / ".model.abcdefgh.tmp.glb")) == 403
        assert _status(base + str(runs.root / "a-run" / "export" / "%2Emodel.abcdefgh.tmp.glb")) == 403
    finally:
        demo.close()
