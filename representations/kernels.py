"""Whether a library's CUDA extension loads on this machine (gsplat's rasterizer, nerfacc's ray marcher).

Both libraries ship pure-Python wheels and compile their CUDA code on first import of ``<package>.cuda._backend``
where a CUDA toolkit is found; a failed or impossible build leaves the extension ``None`` (or raises), and the
caller takes its PyTorch path instead."""

from __future__ import annotations

import importlib

import torch


def cuda_extension_loads(package: str) -> bool:
    """Whether ``package``'s CUDA extension (``package.cuda._backend._C``) loads; False without a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        backend = importlib.import_module(f"{package}.cuda._backend")
    except (ImportError, OSError, RuntimeError):  # a failed build
        return False
    return getattr(backend, "_C", None) is not None
