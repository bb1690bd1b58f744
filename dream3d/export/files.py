"""Export of a trained representation: mesh files (GLB/OBJ/PLY) and an orbit video.

Every file is written atomically (dream3d.rundir.atomic), so an interrupted export never
leaves a truncated file under its final name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import imageio.v2 as imageio
import numpy as np
import torch
import trimesh
from PIL import Image
from trimesh.visual.material import PBRMaterial, SimpleMaterial

from dream3d.rundir.atomic import atomic_path, write_bytes
from dream3d.run.camera_sampling import orbit_cameras
from dream3d.representations.cameras import Cameras, RenderOutput
from dream3d.representations.mesh_extraction import extract_mesh
from dream3d.representations.texture import texture_mesh

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
    dielectric material matches the Lambertian look of dream3d's renders; a textured mesh's
    material keeps its ``baseColorTexture`` and is made matte the same way. Buffer-view
    targets are optional but the validator hints about them and GPU loaders use them.
    """
    matte = {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0, "roughnessFactor": 1.0}
    materials = tree.setdefault("materials", [{"name": "albedo"}])
    for material in materials:
        material["pbrMetallicRoughness"] = {**material.get("pbrMetallicRoughness", {}), **matte}
    views = tree.get("bufferViews", [])
    accessors = tree["accessors"]
    for mesh in tree.get("meshes", []):
        for primitive in mesh["primitives"]:
            primitive.setdefault("material", 0)
            for accessor in primitive["attributes"].values():
                views[accessors[accessor]["bufferView"]]["target"] = _GL_ARRAY_BUFFER
            if "indices" in primitive:
                views[accessors[primitive["indices"]]["bufferView"]]["target"] = _GL_ELEMENT_ARRAY_BUFFER


def texture_image(mesh: trimesh.Trimesh) -> Image.Image | None:
    """The colour texture of a UV-mapped mesh (a GLB's PBR ``baseColorTexture``, an OBJ's map_Kd image), or None."""
    if not isinstance(mesh.visual, trimesh.visual.TextureVisuals) or mesh.visual.uv is None:
        return None
    material = mesh.visual.material
    return material.baseColorTexture if isinstance(material, PBRMaterial) else getattr(material, "image", None)


def _obj_textured(mesh: trimesh.Trimesh, image: Image.Image) -> trimesh.Trimesh:
    """The mesh under an OBJ material named "model" whose map is ``image`` (as a PNG), white and matte.

    trimesh names the texture file after the material and its image format, hence the name and a
    format-less RGB copy; Kd multiplies map_Kd in OBJ viewers, so it is white, and Ks is black.
    """
    material = SimpleMaterial(
        name="model", image=Image.fromarray(np.asarray(image.convert("RGB"))),
        ambient=(255, 255, 255, 255), diffuse=(255, 255, 255, 255), specular=(0, 0, 0, 255),
    )
    return trimesh.Trimesh(
        mesh.vertices, mesh.faces, vertex_normals=mesh.vertex_normals,
        visual=trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material), process=False,
    )


def _vertex_coloured(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A textured mesh as one with vertex colours (the texture at each vertex's uv), seams welded."""
    colours = mesh.visual.to_color().vertex_colors
    plain = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=colours, process=False)
    plain.merge_vertices()
    return plain


def _encode(mesh: trimesh.Trimesh, fmt: str) -> dict[str, bytes]:
    """The files of one format: {file name: bytes}, the ``model.<fmt>`` file last."""
    image = texture_image(mesh)
    if fmt == "glb":
        y_up = mesh.copy()
        y_up.apply_transform(Z_UP_TO_Y_UP)
        return {"model.glb": trimesh.exchange.gltf.export_glb(y_up, include_normals=True, tree_postprocessor=_finish_gltf_tree)}
    if fmt == "obj" and image is not None:
        text, files = trimesh.exchange.obj.export_obj(
            _obj_textured(mesh, image), include_normals=True, include_texture=True, return_texture=True, mtl_name="model.mtl"
        )
        return {"model.png": files["model.png"], "model.mtl": files["model.mtl"], "model.obj": text.encode()}
    if fmt == "obj":
        return {"model.obj": trimesh.exchange.obj.export_obj(mesh, include_normals=True, include_color=True, include_texture=False).encode()}
    plain = mesh if image is None else _vertex_coloured(mesh)
    return {"model.ply": trimesh.exchange.ply.export_ply(plain, encoding="binary", vertex_normal=True)}


# What export_mesh names each extra file it writes beside the mesh files.
_EXTRA_KINDS = {"model.mtl": "mtl", "model.png": "texture"}


def export_mesh(mesh: trimesh.Trimesh, out_dir: Path, formats: Sequence[str] = MESH_FORMATS) -> dict[str, Path]:
    """Writes ``model.<fmt>`` for each format into out_dir. Returns {format: path} (+ "mtl", "texture").

    All files carry vertex normals; OBJ and PLY keep dream3d's world frame (+z up), the GLB
    is turned to glTF's +y up, under a matte material.

    A mesh with ``TextureVisuals`` (uv + a material with an image, as ``texture_mesh`` makes)
    is written textured: the GLB embeds the image as the material's ``baseColorTexture``
    (PNG), the OBJ names ``model.mtl``, whose ``map_Kd`` is ``model.png`` (written first, so
    the OBJ never refers to a missing file); the PLY gets vertex colours sampled from the
    texture, seams welded. trimesh loads the GLB and OBJ back with ``visual.uv`` and the image
    (``visual.material.baseColorTexture`` / ``visual.material.image``).

    Any other mesh carries RGBA vertex colours: the GLB stores them as COLOR_0 (normalized
    uint8), which trimesh reads back into ``visual.vertex_attributes["color"]`` (or
    ``visual.vertex_colors`` when loaded with ``skip_materials=True``).
    """
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise ValueError(f"unknown mesh format(s) {', '.join(map(repr, unknown))}; valid: {', '.join(MESH_FORMATS)}")
    paths = {}
    for fmt in dict.fromkeys(formats):
        for name, data in _encode(mesh, fmt).items():
            path = Path(out_dir) / name
            write_bytes(path, data)
            paths[_EXTRA_KINDS.get(name, fmt)] = path
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
    hull_level: str = "depth",
    max_faces: int | None = None,
    largest_only: bool = False,
    texture_size: int | None = None,
) -> dict[str, Path]:
    """Mesh (marching cubes of ``rep.density``, coloured by ``rep.albedo``) plus an orbit video.

    Args:
        rep: a representation; its device (first parameter or buffer) is where fields run.
        largest_only: keep only the largest connected piece (floaters the renders confirm too);
            otherwise pieces with at least 5% of its faces stay.
        resolution, threshold, solid, hull_* (hull_level included), max_faces: passed to ``extract_mesh`` (None = automatic
            threshold); "hull" carves with ``rep.render``'s alpha over a white background.
        texture_size: bake ``rep.albedo`` into a UV texture of this many texels square
            (``texture_mesh``) for the GLB and OBJ; None colours the vertices instead.
    Returns:
        {format: path} for the mesh files (+ "mtl" and "texture" for a textured OBJ), plus
        "video" -> orbit.mp4 (white background).
    Raises:
        representations.marching_cubes.MeshError: the field has no surface to extract.
    """
    out_dir = Path(out_dir)
    device = _device_of(rep)
    white = torch.ones(3, device=device)
    mesh = extract_mesh(
        rep.density, rep.albedo, resolution=resolution, threshold=threshold, device=device, solid=solid,
        alpha_fn=lambda cameras: rep.render(_cameras_to(cameras, device), white).alpha[..., 0],
        hull_views=hull_views, hull_image_size=hull_image_size, hull_margin=hull_margin, hull_level=hull_level,
        max_faces=max_faces, min_component_fraction=1.0 if largest_only else 0.05,
    )
    if texture_size is not None and {"glb", "obj"} & set(formats):  # a PLY alone keeps the exact vertex colours
        mesh = texture_mesh(mesh, rep.albedo, texture_size, device=device)
    paths = export_mesh(mesh, out_dir, formats)
    if video:
        paths["video"] = write_orbit_video(
            rep.render, out_dir / "orbit.mp4", n_frames=video_frames, resolution=video_resolution, device=device
        )
    _remove_stale(out_dir, set(paths.values()))
    return paths


def _remove_stale(out_dir: Path, written: set[Path]) -> None:
    """Deletes the files an earlier export of other formats (or with or without a texture) left:
    export/ then holds this export only. Only regular files go: a link or a folder under one of
    those names is not a file an export wrote."""
    names = [f"model.{fmt}" for fmt in MESH_FORMATS] + list(_EXTRA_KINDS) + ["orbit.mp4"]
    for stale in [out_dir / name for name in names]:
        if stale not in written and stale.is_file() and not stale.is_symlink():
            stale.unlink()


__all__ = [
    "Exportable", "MESH_FORMATS", "Z_UP_TO_Y_UP", "export_mesh", "export_representation", "texture_image", "write_orbit_video",
]
