"""The GPU check as one prepared script (``dream3d bench-gpu``, issue 25 item 5), exercised on the CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dream3d.eval import bench_gpu
from dream3d.eval.bench_gpu import DRY, STAGES, KernelBuilds, gpu_check as run_check
from tests.support import dream3d


class Stop(Exception):
    pass


@pytest.mark.slow
def test_the_dry_run_writes_every_stage_as_it_finishes(tmp_path):
    """After each stage the JSON on disk holds that stage and every one before it, and nothing after. (Slow: two
    toy runs with their exports and a tiny SD's steps; the stop test below covers the partial file by default.)"""
    seen = []

    def on_stage(name: str, results: dict) -> None:
        on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
        seen.append(name)
        assert list(on_disk["stages"]) == seen
        assert f"| {name} |" in (tmp_path / "gpu-check.md").read_text()

    results = run_check(tmp_path, "cpu", DRY, on_stage=on_stage)
    assert seen == list(STAGES)
    status = {name: r["status"] for name, r in results["stages"].items()}
    assert status == {**{name: "done" for name in STAGES}, "kernels": "skipped", "host_waits": "skipped"}, results["stages"]
    assert "no CUDA device" in results["stages"]["kernels"]["reason"]
    # dense on both sides: the CPU against itself is exact, for both encodings
    assert results["nerf_parity"]["dense_max_abs_rgb"] == 0 and results["nerf_parity"]["hashgrid_rel_grad_param0"] == 0
    assert results["nerf_encodings"]["hashgrid_ms_per_step"] > 0
    assert [(r["representation"], r["steps"]) for r in results["toy_demo"]] == [("nerf", 3), ("gaussians", 3)]
    assert all(r["skipped_steps"] == 0 for r in results["toy_demo"])
    assert [(r["rule"], r["batch"]) for r in results["guidance_steps"]] == [("sds", 1), ("vsd", 1)]
    assert all(r["host_waits_per_step"] is None and r["skipped_steps"] == 0 for r in results["guidance_steps"])


def test_every_stage_is_on_disk_when_it_finishes(tmp_path, monkeypatch):
    """The dry run's order and files with the two costly stages (toy runs, SD steps) stubbed: the JSON on disk
    after each stage holds that stage and those before it."""
    demo = {"representation": "nerf", "steps": 3, "wall_seconds": 1.0, "train_seconds": 1.0, "seconds_per_step": 0.3,
            "skipped_steps": 0, "iou": 0.5, "run_dir": str(tmp_path / "none")}
    monkeypatch.setattr(bench_gpu, "toy_demo", lambda *args: demo)
    monkeypatch.setattr(bench_gpu, "_guidance_rows", lambda *args: [])
    seen = []

    def on_stage(name: str, results: dict) -> None:
        seen.append(name)
        assert list(json.loads((tmp_path / "gpu-check.json").read_text())["stages"]) == seen

    results = run_check(tmp_path, "cpu", DRY, on_stage=on_stage)
    assert seen == list(STAGES)
    assert results["stages"]["nerf_samplers"]["status"] == "failed"  # the stub's run folder holds no NeRF
    assert "| toy demo | steps |" in (tmp_path / "gpu-check.md").read_text()


def test_a_check_stopped_after_two_stages_leaves_them_on_disk(tmp_path):
    def stop_after_two(name: str, results: dict) -> None:
        if len(results["stages"]) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_check(tmp_path, "cpu", DRY, on_stage=stop_after_two)
    on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(on_disk["stages"]) == list(STAGES[:2]) and on_disk["stages"]["nerf_parity"]["status"] == "done"
    assert "dense_max_abs_alpha" in on_disk["nerf_parity"] and "toy_demo" not in on_disk
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(bench_gpu, "nerf_parity", broken)
    seen = []

    def stop_after_three(name: str, results: dict) -> None:
        seen.append(name)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_check(tmp_path, "cpu", DRY, on_stage=stop_after_three)
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert stages["nerf_parity"] == {"status": "failed", "seconds": stages["nerf_parity"]["seconds"],
                                     "reason": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert stages["nerf_encodings"]["status"] == "done"


def test_the_kernel_builds_run_at_once_and_stop_at_the_cap(monkeypatch):
    """Two builds of 3 s each end in about 3 s together; builds past the cap are killed and say so."""
    monkeypatch.setattr(bench_gpu, "_build_script", lambda package: (
        "import json, time; time.sleep(3); print(json.dumps({'loaded': True, 'reason': ''}))"))
    tick = time.monotonic()
    row = KernelBuilds(cap_s=60).join()
    assert time.monotonic() - tick < 5.5
    assert row["gsplat"]["loaded"] and row["nerfacc"]["loaded"]
    monkeypatch.setattr(bench_gpu, "_build_script", lambda package: "import time; time.sleep(60)")
    tick = time.monotonic()
    row = KernelBuilds(cap_s=1).join()
    assert time.monotonic() - tick < 10
    assert row["gsplat"] == {"loaded": False, "reason": "not built within the 1 s cap", "seconds": row["gsplat"]["seconds"]}
    assert row["nerfacc"]["reason"] == "not built within the 1 s cap"


def test_host_waits_are_the_sync_debug_warnings(monkeypatch):
    """The count is the number of synchronising-operation warnings per step (CUDA's sync debug mode mocked)."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        import warnings

        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("something else", UserWarning)

    assert bench_gpu.sync_warnings(step, 3) == 2.0
    assert modes == ["warn", "default"]


def test_the_nerf_parity_compares_the_dense_path_on_both_sides(monkeypatch):
    """Issue 25: NeRFConfig() defaults to the auto sampler, which on CUDA is the occupancy path; the parity must
    render the dense path on the device too. A device where auto means occupancy is simulated on the CPU."""
    chosen = []
    real = bench_gpu.NeRF.render

    def render(self, *args, **kwargs):
        chosen.append(self.cfg.sampler)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bench_gpu.NeRF, "render", render)
    bench_gpu.nerf_parity(torch.device("cpu"), resolution=8, settings=dict(DRY.nerf_settings))
    assert chosen == ["dense"] * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_gpu_dry_run_needs_no_gpu_and_model_flags_apply(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(bench_gpu, "gpu_check", lambda out, device, sizes: calls.append((device, sizes)) or
                        {"device": "cpu", "torch": "", "model": sizes.model, "stages": {}})
    status, _ = dream3d(monkeypatch, capsys, "bench-gpu", "--dry-run", "--toy-steps", 5, "--out", tmp_path / "c")
    assert status == 0
    device, sizes = calls[0]
    assert device == "cpu" and sizes.model == "random:sd-tiny" and sizes.demo_steps == 5 and sizes.batches == (1,)
