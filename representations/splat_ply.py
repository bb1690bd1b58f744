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
from typing import BinaryIO

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
# a 3DGS header of degree-3 SH is about 1.5 KB; anything far longer is not a point file
MAX_HEADER_BYTES = 64 * 1024
ASCII_CHUNK_ROWS = 65_536  # rows parsed per call, so a long load stays interruptible between chunks


def read_splat_ply(path: str | Path) -> dict[str, Tensor]:
    """Reads the vertices of a PLY (binary little-endian or ASCII) as float32 tensors.

    Returns:
        "means" [N,3] always; "colors" [N,3] in [0,1] from f_dc_* or red/green/blue
        (uchar colours are divided by 255); "sh_rest" [N,K,3], "opacity_logits" [N],
        "scales_log" [N,3], "quats" [N,4] where the file has them.
    Raises:
        PLYError (one line): not a PLY, a malformed or over-long header, a vertex count the file's size
        cannot hold, too few or too short rows, no x/y/z, or an unsupported format.
    """
    with open(path, "rb") as f:
        fmt, props, n = _read_header(f, path)
        if fmt == "binary_little_endian":
            data = _binary_rows(f, path, n, np.dtype(props))
        elif fmt == "ascii":
            data = _ascii_rows(f, path, n, np.dtype(props))
        else:
            raise PLYError(f"{path}: unsupported PLY format {fmt!r} (binary_little_endian or ascii)")
    names = set(data.dtype.names)
    if not {"x", "y", "z"} <= names:
        raise PLYError(f"{path}: vertices have no x, y, z")

    def stack(keys: list[str]) -> Tensor:
        return torch.from_numpy(np.stack([data[k].astype(np.float32) for k in keys], axis=-1))

    out = {"means": stack(["x", "y", "z"])}
    if {"f_dc_0", "f_dc_1", "f_dc_2"} <= names:
        out["colors"] = sh_dc_to_rgb(stack(["f_dc_0", "f_dc_1", "f_dc_2"]))
        rest = sorted((k for k in names if k.startswith("f_rest_")), key=lambda k: int(k[7:]))
        if len(rest) % 3:
            raise PLYError(f"{path}: {len(rest)} f_rest_* properties are not 3 colour channels of equal length")
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


def _read_header(f: BinaryIO, path: str | Path) -> tuple[str, list[tuple[str, str]], int]:
    """(format, vertex properties as numpy fields, vertex count) of the header; the file is left at the data."""
    if f.readline(16).strip() != b"ply":
        raise PLYError(f"{path}: not a PLY file")
    fmt, props, n, in_vertex, other_before = None, [], None, False, False
    while True:
        raw = f.readline(MAX_HEADER_BYTES + 1)
        if f.tell() > MAX_HEADER_BYTES:
            raise PLYError(f"{path}: the PLY header is longer than {MAX_HEADER_BYTES} bytes")
        if not raw:
            raise PLYError(f"{path}: the PLY header has no end_header line")
        try:
            words = raw.decode("ascii").split()
        except UnicodeDecodeError:
            raise PLYError(f"{path}: the PLY header is not ASCII text") from None
        if words == ["end_header"]:
            break
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1] if len(words) > 1 else ""
        elif words[0] == "element" and len(words) == 3:
            in_vertex = words[1] == "vertex"
            if in_vertex:
                n = _count(words[2], path)
            elif n is None:
                other_before = True
        elif words[0] == "property" and in_vertex:
            props.append(_property(words, path))
        elif words[0] not in ("element", "property"):
            raise PLYError(f"{path}: unknown PLY header line {' '.join(words)[:60]!r}")
        elif words[0] == "element":
            raise PLYError(f"{path}: malformed PLY element line {' '.join(words)[:60]!r}")
    if fmt is None:
        raise PLYError(f"{path}: the PLY header has no format line")
    if n is None or other_before:
        raise PLYError(f"{path}: the vertex element must come first")
    if not props:
        raise PLYError(f"{path}: the vertex element has no properties")
    names = [name for name, _ in props]
    if len(set(names)) < len(names):
        raise PLYError(f"{path}: a vertex property is declared twice")
    return fmt, props, n


def _count(word: str, path: str | Path) -> int:
    try:
        n = int(word)
    except ValueError:
        raise PLYError(f"{path}: the vertex count {word[:40]!r} is not a whole number") from None
    if n < 0:
        raise PLYError(f"{path}: the vertex count {n} is negative")
    return n


def _property(words: list[str], path: str | Path) -> tuple[str, str]:
    if len(words) >= 2 and words[1] == "list":
        raise PLYError(f"{path}: list properties on vertices are not supported")
    if len(words) != 3:
        raise PLYError(f"{path}: malformed PLY property line {' '.join(words)[:60]!r}")
    if words[1] not in _PLY_TYPES:
        raise PLYError(f"{path}: unknown property type {words[1][:20]!r} (valid: {', '.join(_PLY_TYPES)})")
    return words[2], "<" + _PLY_TYPES[words[1]]


def _data_bytes(f: BinaryIO) -> int:
    """Bytes from the file's position to its end."""
    return os.fstat(f.fileno()).st_size - f.tell()


def _binary_rows(f: BinaryIO, path: str | Path, n: int, dtype: np.dtype) -> np.ndarray:
    # the count is checked against the file before anything is allocated: a header may claim 10^14 vertices
    if n * dtype.itemsize > _data_bytes(f):
        raise PLYError(f"{path}: {n} vertices need {n * dtype.itemsize} bytes; the file holds {_data_bytes(f)} after "
                       "its header")
    return np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype, count=n)


def _ascii_rows(f: BinaryIO, path: str | Path, n: int, dtype: np.dtype) -> np.ndarray:
    width = len(dtype.names)
    if n * 2 * width > _data_bytes(f):  # each value takes at least a digit and a separator
        raise PLYError(f"{path}: {n} vertices need at least {n * 2 * width} bytes as text; the file holds "
                       f"{_data_bytes(f)} after its header")
    data = np.empty(n, dtype=dtype)
    done = 0
    while done < n:
        rows = _ascii_chunk(f, path, min(ASCII_CHUNK_ROWS, n - done), width, done)
        if len(rows) == 0:
            raise PLYError(f"{path}: the file holds {done} of its {n} vertex rows")
        for i, name in enumerate(dtype.names):
            data[name][done : done + len(rows)] = rows[:, i]
        done += len(rows)
    return data


def _ascii_chunk(f: BinaryIO, path: str | Path, rows: int, width: int, first: int) -> np.ndarray:
    """Up to ``rows`` rows [R, width] of float64; a row with fewer values than properties is an error."""
    try:
        lines = [line.decode("latin-1") for line in (f.readline() for _ in range(rows)) if line.strip()]
        table = np.loadtxt(lines, dtype=np.float64, ndmin=2) if lines else np.empty((0, width))
    except ValueError as e:  # a word that is not a number, or rows of different lengths
        raise PLYError(f"{path}: vertex rows after row {first} are not numbers ({' '.join(str(e).split())[:80]})") from None
    if table.shape[1] < width:
        raise PLYError(f"{path}: a vertex row has {table.shape[1]} values, not {width}")
    return table[:, :width]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


__all__ = ["write_splat_ply", "read_splat_ply", "rgb_to_sh_dc", "sh_dc_to_rgb", "SH_C0"]
