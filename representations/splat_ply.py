"""3D Gaussian splat PLY files in the layout of the original 3DGS code (and every viewer that reads it).

Binary little-endian, one float32 vertex property each: x y z, nx ny nz (zeros),
f_dc_0..2 (SH degree-0 coefficients: rgb = 0.5 + SH_C0 * f_dc), f_rest_* (higher SH
bands, channel-major as 3DGS writes them), opacity (logit), scale_0..2 (log),
rot_0..3 (quaternion wxyz, not necessarily normalised).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SH_C0 = 0.28209479177387814




class PLYError(ValueError):
    """A file cannot be read as points or splats; the message is one line."""

def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """[...,3] colours -> degree-0 SH coefficients."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: Tensor) -> Tensor:
    """[...,3] degree-0 SH coefficients -> colours (unclamped)."""
    return dc * SH_C0 + 0.5


def write_splat_ply(
    path: str | Path,
    means: Tensor,
    scales_log: Tensor,
    quats: Tensor,
    opacity_logits: Tensor,
    sh_dc: Tensor,
    sh_rest: Tensor | None = None,
) -> None:
    """Writes N Gaussians atomically (temp file in the same folder, then rename).

    Args:
        means [N,3]; scales_log [N,3]; quats [N,4] wxyz; opacity_logits [N];
        sh_dc [N,3] (use ``rgb_to_sh_dc`` for colours); sh_rest [N,K,3] or None.
    """
    n = means.shape[0]
    rest = np.zeros((n, 0), np.float32) if sh_rest is None else _np(sh_rest).transpose(0, 2, 1).reshape(n, -1)
    columns = {
        **dict(zip("xyz", _np(means).T)),
        **{name: np.zeros(n, np.float32) for name in ("nx", "ny", "nz")},
        **{f"f_dc_{i}": c for i, c in enumerate(_np(sh_dc).T)},
        **{f"f_rest_{i}": c for i, c in enumerate(rest.T)},
        "opacity": _np(opacity_logits).reshape(n),
        **{f"scale_{i}": c for i, c in enumerate(_np(scales_log).T)},
        **{f"rot_{i}": c for i, c in enumerate(_np(quats).T)},
    }
    vertices = np.empty(n, dtype=[(name, "<f4") for name in columns])
    for name, values in columns.items():
        vertices[name] = values
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in columns) + "end_header\n"
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(vertices.tobytes())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def read_splat_ply(path: str | Path) -> dict[str, Tensor]:
    """Reads the vertices of a PLY (binary little-endian or ASCII) as float32 tensors.

    Returns:
        "means" [N,3] always; "colors" [N,3] in [0,1] from f_dc_* or red/green/blue
        (uchar colours are divided by 255); "sh_rest" [N,K,3], "opacity_logits" [N],
        "scales_log" [N,3], "quats" [N,4] where the file has them.
    Raises:
        ValueError: not a PLY, no vertex element, no x/y/z, or an unsupported format.
    """
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise PLYError(f"{path}: not a PLY file")
        fmt, props, n, in_vertex, other_before = None, [], None, False, False
        while (line := f.readline().decode("ascii").strip()) != "end_header":
            words = line.split()
            if not words:
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                in_vertex = words[1] == "vertex"
                if in_vertex:
                    n = int(words[2])
                elif n is None:
                    other_before = True
            elif words[0] == "property" and in_vertex:
                if words[1] == "list":
                    raise PLYError(f"{path}: list properties on vertices are not supported")
                props.append((words[2], "<" + _PLY_TYPES[words[1]]))
        if n is None or other_before:
            raise PLYError(f"{path}: the vertex element must come first")
        if fmt == "binary_little_endian":
            data = np.frombuffer(f.read(n * np.dtype(props).itemsize), dtype=props, count=n)
        elif fmt == "ascii":
            rows = np.loadtxt(f, dtype=np.float64, max_rows=n, ndmin=2)[:, : len(props)]
            data = np.empty(n, dtype=props)
            for i, (name, _) in enumerate(props):
                data[name] = rows[:, i]
        else:
            raise PLYError(f"{path}: unsupported PLY format {fmt!r}")
    names = set(data.dtype.names)
    if not {"x", "y", "z"} <= names:
        raise PLYError(f"{path}: vertices have no x, y, z")

    def stack(keys: list[str]) -> Tensor:
        return torch.from_numpy(np.stack([data[k].astype(np.float32) for k in keys], axis=-1))

    out = {"means": stack(["x", "y", "z"])}
    if {"f_dc_0", "f_dc_1", "f_dc_2"} <= names:
        out["colors"] = sh_dc_to_rgb(stack(["f_dc_0", "f_dc_1", "f_dc_2"]))
        rest = sorted((k for k in names if k.startswith("f_rest_")), key=lambda k: int(k[7:]))
        if rest:
            out["sh_rest"] = stack(rest).view(n, 3, -1).transpose(1, 2).contiguous()
    elif {"red", "green", "blue"} <= names:
        colors = stack(["red", "green", "blue"])
        out["colors"] = colors / 255 if data["red"].dtype.kind in "ui" else colors
    if "opacity" in names:
        out["opacity_logits"] = stack(["opacity"])[:, 0]
    if {"scale_0", "scale_1", "scale_2"} <= names:
        out["scales_log"] = stack(["scale_0", "scale_1", "scale_2"])
    if {"rot_0", "rot_1", "rot_2", "rot_3"} <= names:
        out["quats"] = stack(["rot_0", "rot_1", "rot_2", "rot_3"])
    return out


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


__all__ = ["write_splat_ply", "read_splat_ply", "rgb_to_sh_dc", "sh_dc_to_rgb", "SH_C0"]
