"""``dream3d doctor``: what will run where on this machine, on one screen (docs/gpu.md#dream3d-doctor).

Device, torch and CUDA versions and free GPU memory; whether gsplat's and nerfacc's CUDA kernels are built, or
can be built (an nvcc whose major version matches torch's CUDA, ninja, a C++ compiler); which rasterizer and
sampler each representation will use; half-precision support; and which models the Hugging Face cache holds.

It only looks: it never imports ``gsplat.cuda._backend`` or ``nerfacc.cuda._backend``, whose first import on a
GPU machine compiles the kernels (minutes), so "will use" is read from what is built or buildable.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# the CUDA extensions' names: the prebuilt module inside the package, and the JIT build's folder and library
KERNELS = {"gsplat": ("gsplat.csrc", "gsplat_cuda"), "nerfacc": ("nerfacc.csrc", "nerfacc_cuda")}


@dataclass(frozen=True)
class Toolchain:
    """What building a CUDA extension needs: nvcc (path, CUDA version or None), ninja, a C++ compiler."""

    nvcc: str | None
    nvcc_version: str | None
    ninja: str | None
    cxx: str | None

    def missing(self, torch_cuda: str | None) -> list[str]:
        """Why a build cannot run, [] when it can; torch_cuda: ``torch.version.cuda``."""
        if torch_cuda is None:
            return ["torch is a CPU build (no CUDA)"]
        why = []
        if self.nvcc is None:
            why.append(f"no nvcc (install a CUDA {major(torch_cuda)}.x toolkit)")
        elif self.nvcc_version is None or major(self.nvcc_version) != major(torch_cuda):
            why.append(f"nvcc is CUDA {self.nvcc_version}, torch is built for CUDA {torch_cuda}: majors differ")
        if self.ninja is None:
            why.append("no ninja (pip install ninja)")
        if self.cxx is None:
            why.append("no C++ compiler (c++/g++)")
        return why


def major(version: str) -> str:
    return version.split(".")[0]


def find_toolchain() -> Toolchain:
    """nvcc as torch's extension builder finds it (CUDA_HOME, else PATH), ninja and the C++ compiler."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").is_file() else shutil.which("nvcc")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    return Toolchain(nvcc, nvcc_release(nvcc) if nvcc else None, shutil.which("ninja"), cxx)


def nvcc_release(nvcc: str) -> str | None:
    """The CUDA version nvcc reports ("release 12.4, V12.4.131" -> "12.4"), None if it cannot be run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def jit_library(name: str) -> Path:
    """Where torch's JIT builder puts the extension ``name`` (the folder torch.utils.cpp_extension.load uses)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    cuda = f"_cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else ""
    return root / f"{python}{cuda}" / name / f"{name}.so"


def kernel_state(package: str, toolchain: Toolchain, cuda: bool) -> tuple[str, bool]:
    """(one line on ``package``'s CUDA kernels, whether a CUDA run will use them) without loading them."""
    module, name = KERNELS[package]
    if importlib.util.find_spec(package) is None:
        return "not installed", False
    if importlib.util.find_spec(module) is not None:
        return "built (prebuilt in the package)", cuda
    if jit_library(name).is_file():
        return f"built ({jit_library(name)})", cuda
    missing = toolchain.missing(torch.version.cuda)
    if missing:
        return "not built, not buildable: " + "; ".join(missing), False
    return "not built; buildable: compiled on the first GPU run (a few minutes, once)", cuda


def device_rows(device: torch.device) -> list[tuple[str, str]]:
    """Device, versions, GPUs and free memory."""
    rows = [("device (--device auto)", str(device)), ("torch", torch.__version__),
            ("torch CUDA", torch.version.cuda or "none (a CPU build of torch)")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of "
                                      f"{total / 2**30:.1f} GiB free"))
    else:
        rows.append(("GPU", "none visible to torch"))
    return rows


def precision_rows(device: torch.device) -> list[tuple[str, str]]:
    """What a diffusers prior's weights will be on ``device`` and what the GPU supports."""
    if device.type != "cuda":
        return [("float16 / bfloat16", "not used: on the CPU the priors run in float32")]
    bf16 = torch.cuda.is_bf16_supported()
    return [("float16", "supported: the priors' default (diffusers.dtype=float16), with a dynamic loss scale"),
            ("bfloat16", "supported (diffusers.dtype=bfloat16: no loss scale needed)" if bf16
             else "not supported by this GPU")]


def toolchain_rows(toolchain: Toolchain) -> list[tuple[str, str]]:
    nvcc = f"{toolchain.nvcc} (CUDA {toolchain.nvcc_version})" if toolchain.nvcc else "not found"
    return [("nvcc", nvcc), ("ninja", toolchain.ninja or "not found"), ("C++ compiler", toolchain.cxx or "not found")]


def representation_rows(device: torch.device, gsplat: bool, nerfacc: bool) -> list[tuple[str, str]]:
    """The rasterizer and sampler each representation will use on ``device`` (its config's defaults)."""
    from dream3d.representations.nerf import NeRFConfig

    nerf = NeRFConfig()
    cuda = device.type == "cuda"
    sampler = "occupancy (nerfacc's CUDA ray marching)" if cuda and nerfacc and nerf.sampler == "auto" else "dense"
    why = "" if cuda and nerfacc else (" (nerfacc's CUDA kernels unavailable)" if cuda else " (the CPU)")
    rasterizer = "gsplat's CUDA rasterizer" if cuda and gsplat else "dream3d's PyTorch rasterizer"
    slow = " (gsplat's kernels unavailable: much slower)" if cuda and not gsplat else ""
    return [("nerf", f"sampler {sampler}{why}, encoding {nerf.encoding}"), ("gaussians", f"{rasterizer}{slow}")]


def model_rows() -> list[tuple[str, str]]:
    """The model aliases' table (`dream3d models`: each id, cached or not), then any other cached model repository."""
    from dream3d.guidance.priors import hub

    rows = [("aliases" if i == 0 else "", line) for i, line in enumerate(hub.listing())]
    known = {r for a in hub.ALIASES.values() for r in (*(repo.repo for repo in a.repos), *a.removed)}
    others = sorted(set(hub.cached_repos()) - known)
    return rows + [("other cached models", ", ".join(others) if others else "none")]


def sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """The doctor's report: (title, [(key, value)]) per section."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toolchain = find_toolchain()
    cuda = device.type == "cuda"
    kernels = {name: kernel_state(name, toolchain, cuda) for name in KERNELS}
    return [
        ("Device", device_rows(device)),
        ("Half precision", precision_rows(device)),
        ("CUDA kernels", [(f"{name} kernels", state) for name, (state, _) in kernels.items()]
         + toolchain_rows(toolchain)),
        ("Representations on " + str(device), representation_rows(device, kernels["gsplat"][1],
                                                                    kernels["nerfacc"][1])),
        ("Models in the Hugging Face cache", model_rows()),
    ]


def render(console) -> None:
    """Prints the report on a rich ``console``: one table, a heading row per section."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="dream3d doctor", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for title, rows in sections():
        table.add_row(f"[underline]{title}[/underline]", "")
        for key, value in rows:
            table.add_row(Text(key), Text(value))  # paths and ids are not rich markup
    console.print(table)
