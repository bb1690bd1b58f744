"""Export of a trained representation: mesh files (GLB/OBJ/PLY) and an orbit video.

Every file is written atomically (dream3d.atomic), so an interrupted export never
leaves a truncated file under its final name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import imageio.v2 as imageio
import numpy as np
import torch
import trimesh

from dream3d.atomic import atomic_path, write_bytes
from dream3d.sampling import orbit_cameras
from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.mesh import extract_mesh

MESH_FORMATS = ("glb", "obj", "ply")

# glTF mandates +y up; dream3d's world is +z up. A -90 degree turn about x maps +z to +y.
Z_UP_TO_Y_UP = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)

_GL_ARRAY_BUFFER, _GL_ELEMENT_ARRAY_BUFFER = 34962, 34963


def _finish_gltf_tree(tree: dict) -> None:
    """Makes trimesh's glTF tree render as intended and pass the Khronos validator cleanly.

    A primitive without a material gets glTF's default material, which is fully metallic:
    vertex-coloured meshes then look black in three.js / Babylon viewers. A matte
    dielectric material matches the Lambertian look of dream3d's renders. Buffer-view
    targets are optional but the validator hints about them and GPU loaders use them.
    """
    tree["materials"] = [
        {"name": "albedo", "pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0, "roughnessFactor": 1.0}}
    ]
    views = tree.get("bufferViews", [])
    accessors = tree["accessors"]
    for mesh in tree.get("meshes", []):
        for primitive in mesh["primitives"]:
            primitive.setdefault("material", 0)
            for accessor in primitive["attributes"].values():
                views[accessors[accessor]["bufferView"]]["target"] = _GL_ARRAY_BUFFER
            if "indices" in primitive:
                views[accessors[primitive["indices"]]["bufferView"]]["target"] = _GL_ELEMENT_ARRAY_BUFFER


def _encode(mesh: trimesh.Trimesh, fmt: str) -> bytes:
    if fmt == "glb":
        y_up = mesh.copy()
        y_up.apply_transform(Z_UP_TO_Y_UP)
        return trimesh.exchange.gltf.export_glb(y_up, include_normals=True, tree_postprocessor=_finish_gltf_tree)
    if fmt == "obj":
        return trimesh.exchange.obj.export_obj(mesh, include_normals=True, include_color=True, include_texture=False).encode()
    return trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=True)


def export_mesh(mesh: trimesh.Trimesh, out_dir: Path, formats: Sequence[str] = MESH_FORMATS) -> dict[str, Path]:
    """Writes ``model.<fmt>`` for each format into out_dir. Returns {format: path}.

    All files carry vertex normals and RGBA vertex colours. OBJ and PLY keep dream3d's
    world frame (+z up); the GLB is turned to glTF's +y up, stores colours as COLOR_0
    (normalized uint8) under a matte material. trimesh reads those colours back into
    ``visual.vertex_attributes["color"]`` (or ``visual.vertex_colors`` when loaded
    with ``skip_materials=True``).
    """
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise ValueError(f"unknown mesh format(s) {', '.join(map(repr, unknown))}; valid: {', '.join(MESH_FORMATS)}")
    paths = {}
    for fmt in dict.fromkeys(formats):
        paths[fmt] = Path(out_dir) / f"model.{fmt}"
        write_bytes(paths[fmt], _encode(mesh, fmt))
    return paths


def _cameras_to(cameras: Cameras, device: torch.device | str) -> Cameras:
    return Cameras(
        cameras.c2w.to(device), cameras.fovy.to(device), cameras.width, cameras.height,
        cameras.elevation.to(device), cameras.azimuth.to(device), cameras.distance.to(device),
    )


@torch.no_grad()
def write_orbit_video(
    render_fn: Callable[[Cameras, torch.Tensor], RenderOutput],
    path: Path,
    n_frames: int = 60,
    resolution: int = 128,
    fps: int = 24,
    elevation: float = 15.0,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Path:
    """Renders a full turn around the object and writes it as an H.264 mp4 (yuv420p).

    Args:
        render_fn: (cameras, background [3]) -> RenderOutput with rgb [B,H,W,3] in [0,1],
            e.g. a representation's ``render``.
        resolution: square frame size; must be even (yuv420p halves the chroma planes).
        batch_size: cameras rendered per call, bounding memory.
        device: where cameras and background are sent before rendering.
    """
    if resolution % 2:
        raise ValueError(f"video resolution must be even for H.264 yuv420p, got {resolution}")
    cameras = orbit_cameras(n_frames, resolution, elevation=elevation)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    path = Path(path)
    with atomic_path(path) as tmp:
        # quality 8 of 10: the videos are tiny, so sharper frames cost next to nothing.
        with imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            quality=8, macro_block_size=2, ffmpeg_log_level="error",
        ) as writer:
            for start in range(0, n_frames, batch_size):
                batch = _cameras_to(cameras[start : start + batch_size], device)
                rgb = render_fn(batch, bg).rgb
                for frame in (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy():
                    writer.append_data(frame)
    return path


class Exportable(Protocol):
    """What export needs from a representation (see docs/architecture.md#seams)."""

    def density(self, points: torch.Tensor) -> torch.Tensor: ...  # [N,3] -> [N]

    def albedo(self, points: torch.Tensor) -> torch.Tensor: ...  # [N,3] -> [N,3]

    def render(self, cameras: Cameras, background: torch.Tensor) -> RenderOutput: ...


def _device_of(rep: Exportable) -> torch.device:
    if isinstance(rep, torch.nn.Module):
        for tensor in (*rep.parameters(), *rep.buffers()):
            return tensor.device
    return torch.device("cpu")


def export_representation(
    rep: Exportable,
    out_dir: Path,
    formats: Sequence[str] = MESH_FORMATS,
    resolution: int = 128,
    threshold: float | None = None,
    video: bool = True,
    video_frames: int = 60,
    video_resolution: int = 128,
    solid: str = "hull",
    hull_views: int = 32,
    hull_image_size: int = 96,
    hull_margin: float = 3.0,
    max_faces: int | None = None,
    largest_only: bool = False,
) -> dict[str, Path]:
    """Mesh (marching cubes of ``rep.density``, coloured by ``rep.albedo``) plus an orbit video.

    Args:
        rep: a representation; its device (first parameter or buffer) is where fields run.
        largest_only: keep only the largest connected piece (floaters the renders confirm too);
            otherwise pieces with at least 5% of its faces stay.
        resolution, threshold, solid, hull_*, max_faces: passed to ``extract_mesh`` (None = automatic
            threshold); "hull" carves with ``rep.render``'s alpha over a white background.
    Returns:
        {format: path} for the mesh files, plus "video" -> orbit.mp4 (white background).
    Raises:
        representations.mesh.MeshError: the field has no surface to extract.
    """
    out_dir = Path(out_dir)
    device = _device_of(rep)
    white = torch.ones(3, device=device)
    mesh = extract_mesh(
        rep.density, rep.albedo, resolution=resolution, threshold=threshold, device=device, solid=solid,
        alpha_fn=lambda cameras: rep.render(_cameras_to(cameras, device), white).alpha[..., 0],
        hull_views=hull_views, hull_image_size=hull_image_size, hull_margin=hull_margin, max_faces=max_faces,
        min_component_fraction=1.0 if largest_only else 0.05,
    )
    paths = export_mesh(mesh, out_dir, formats)
    if video:
        paths["video"] = write_orbit_video(
            rep.render, out_dir / "orbit.mp4", n_frames=video_frames, resolution=video_resolution, device=device
        )
    _remove_stale(out_dir, set(paths.values()))
    return paths


def _remove_stale(out_dir: Path, written: set[Path]) -> None:
    """Deletes the files an earlier export of other formats left (export/ then holds this export only)."""
    for stale in [out_dir / f"model.{fmt}" for fmt in MESH_FORMATS] + [out_dir / "orbit.mp4"]:
        if stale not in written:
            stale.unlink(missing_ok=True)


__all__ = ["Exportable", "MESH_FORMATS", "Z_UP_TO_Y_UP", "export_mesh", "write_orbit_video", "export_representation"]
