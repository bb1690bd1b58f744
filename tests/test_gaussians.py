"""Gaussian splats: projection parity with gsplat's PyTorch reference, the rasterizer against a
brute-force compositor (values and gradients), PLY round trips, and the density field."""

import math
import sys

import numpy as np
import pytest
import torch
import trimesh

from dream3d.representations.cameras import look_at_cameras
from dream3d.representations.gaussians import Gaussians, GaussiansConfig
from dream3d.representations.splat_ply import read_splat_ply, rgb_to_sh_dc, write_splat_ply
from dream3d.representations.splat_raster import ALPHA_MAX, ALPHA_THRESHOLD, T_MIN, project, rasterize


def _scene(n: int, seed: int, spread: float = 0.6, scale: tuple[float, float] = (0.05, 0.25)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * spread
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * (scale[1] - scale[0]) + scale[0]
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def _cameras(width: int, height: int):
    return look_at_cameras(
        torch.tensor([0.0, 30.0, -10.0]), torch.tensor([0.0, 135.0, 250.0]), torch.tensor([2.5, 2.0, 3.0]),
        45.0, width, height,
    )


def test_projection_matches_gsplat_reference():
    torch_impl = pytest.importorskip("gsplat.cuda._torch_impl", reason="gsplat is not installed")
    means, quats, scales, _, _ = _scene(300, seed=1, spread=1.5)
    cams = _cameras(40, 30)
    ours = project(means, quats, scales, cams.viewmats(), cams.intrinsics(), 40, 30, eps2d=0.3)
    covars, _ = torch_impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(
        means, covars, cams.viewmats(), cams.intrinsics(), 40, 30, eps2d=0.3, near_plane=0.01
    )
    assert (ours["radii"] > 0).any() and (ours["radii"] == 0).any()  # some culled, some kept
    assert torch.equal(ours["radii"], radii)
    torch.testing.assert_close(ours["means2d"], means2d, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours["depths"], depths, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["conics"], conics, rtol=1e-4, atol=1e-6)


def _brute_force(means, quats, scales, opacities, colors, viewmat, K, width, height, background):
    """gsplat's per-pixel loop, written out: every Gaussian in front of the near plane, near to far."""
    proj = project(means, quats, scales, viewmat[None], K[None], width, height, eps2d=0.3)
    m2d, depths, conics = proj["means2d"][0], proj["depths"][0], proj["conics"][0]
    order = [i for i in torch.argsort(depths).tolist() if depths[i] > 0.01 and opacities[i] >= ALPHA_THRESHOLD]
    rgb, alpha, depth = [], [], []
    for y in range(height):
        for x in range(width):
            T, c, z = torch.tensor(1.0, dtype=means.dtype), torch.zeros(3, dtype=means.dtype), torch.tensor(0.0, dtype=means.dtype)
            for i in order:
                dx, dy = m2d[i, 0] - (x + 0.5), m2d[i, 1] - (y + 0.5)
                a, b, cc = conics[i]
                sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
                al = torch.clamp(opacities[i] * torch.exp(-sigma), max=ALPHA_MAX)
                if sigma < 0 or al < ALPHA_THRESHOLD:
                    continue
                if T * (1 - al) <= T_MIN:
                    break
                c = c + al * T * colors[i]
                z = z + al * T * depths[i]
                T = T * (1 - al)
            rgb.append(c + T * background)
            alpha.append(1 - T)
            depth.append(z / torch.clamp(1 - T, min=1e-10))
    return (torch.stack(rgb).view(height, width, 3), torch.stack(alpha).view(height, width, 1),
            torch.stack(depth).view(height, width, 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_rasterizer_matches_brute_force_values_and_gradients(seed):
    W, H = 8, 7
    # float64 on both sides: the comparison then tests the maths, not float32 summation order
    params = [p.double().requires_grad_() for p in _scene(7, seed=seed, spread=0.4, scale=(0.1, 0.35))]
    params[3].data[:3] = 0.999  # nearly opaque Gaussians exercise the T <= 1e-4 early stop
    cams = _cameras(W, H)[seed]
    viewmat, K = cams.viewmats()[0].double(), cams.intrinsics()[0].double()
    background = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    rgb, alpha, depth, meta = rasterize(*params, viewmat[None], K[None], W, H, background[None], chunk=16)
    ref = _brute_force(*params, viewmat, K, W, H, background)
    assert 0.05 < alpha.mean() < 0.95
    for ours, theirs in zip((rgb[0], alpha[0], depth[0]), ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(seed + 10)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
    ours = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (rgb[0], alpha[0], depth[0]))), params)
    theirs = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_means2d_receives_gradient():
    means, quats, scales, opacities, colors = _scene(20, seed=3, spread=0.3)
    means.requires_grad_()
    cams = _cameras(16, 16)
    rgb, _, _, meta = rasterize(means, quats, scales, opacities, colors, cams.viewmats(), cams.intrinsics(), 16, 16)
    meta["means2d"].retain_grad()
    rgb.square().sum().backward()
    assert meta["means2d"].grad.shape == (3, 20, 2)
    assert meta["means2d"].grad.abs().sum() > 0 and means.grad.abs().sum() > 0


def test_single_gaussian_is_centred_and_symmetric():
    W = H = 33
    cams = look_at_cameras(torch.tensor([20.0]), torch.tensor([40.0]), torch.tensor([2.5]), 45.0, W, H)
    means = torch.tensor([[0.0, 0.0, 0.0]])
    rgb, alpha, depth, meta = rasterize(
        means, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.15), torch.tensor([0.9]),
        torch.tensor([[1.0, 0.0, 0.0]]), cams.viewmats(), cams.intrinsics(), W, H,
    )
    a = alpha[0, :, :, 0]
    assert a.argmax().item() == (H // 2) * W + W // 2  # the origin projects to the centre pixel
    torch.testing.assert_close(meta["means2d"][0, 0], torch.tensor([W / 2, H / 2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(a, a.flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(a, a.flip(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(a, a.t(), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.max(), torch.tensor(0.9) * (1 - 1e-7), atol=2e-3, rtol=0)
    torch.testing.assert_close(depth[0, H // 2, W // 2, 0], torch.tensor(2.5), atol=1e-4, rtol=0)


def test_chunking_does_not_change_the_render():
    params = [p.requires_grad_() for p in _scene(200, seed=4, scale=(0.02, 0.1))]
    cams = _cameras(24, 20)
    args = (cams.viewmats(), cams.intrinsics(), 24, 20, torch.rand(3, 3))
    small = rasterize(*params, *args, chunk=24)
    big = rasterize(*params, *args, chunk=10_000)
    for a, b in zip(small[:3], big[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ga = torch.autograd.grad(sum(t.sum() for t in small[:3]), params)
    gb = torch.autograd.grad(sum(t.sum() for t in big[:3]), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ply_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    n = 50
    tensors = dict(
        means=torch.randn(n, 3, generator=g), scales_log=torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g), opacity_logits=torch.randn(n, generator=g),
    )
    colors = torch.rand(n, 3, generator=g)
    sh_rest = torch.randn(n, 3, 3, generator=g)
    path = tmp_path / "splats.ply"
    write_splat_ply(path, **tensors, sh_dc=rgb_to_sh_dc(colors), sh_rest=sh_rest)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    back = read_splat_ply(path)
    for k, v in tensors.items():
        torch.testing.assert_close(back[k], v)
    torch.testing.assert_close(back["colors"], colors)
    torch.testing.assert_close(back["sh_rest"], sh_rest)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def test_xyz_only_ply_initialises_gaussians(tmp_path):
    points = np.random.default_rng(0).uniform(-0.5, 0.5, (64, 3)).astype("<f4")
    path = tmp_path / "points.ply"
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 64\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    path.write_bytes(header.encode() + points.tobytes())
    assert set(read_splat_ply(path)) == {"means"}
    model = Gaussians(GaussiansConfig(init_points=str(path)))
    assert len(model) == 64
    torch.testing.assert_close(model.params["means"].detach(), torch.from_numpy(points))
    torch.testing.assert_close(model.opacities.detach(), torch.full((64,), 0.1))
    assert (model.scales > 0).all() and (model.scales < 0.5).all()


def test_coloured_ascii_ply_loads(tmp_path):
    path = tmp_path / "points.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n0 0 0 255 0 0\n1 2 3 0 51 255\n"
    )
    back = read_splat_ply(path)
    torch.testing.assert_close(back["means"], torch.tensor([[0.0, 0, 0], [1, 2, 3]]))
    torch.testing.assert_close(back["colors"], torch.tensor([[1.0, 0, 0], [0, 0.2, 1]]))


def test_density_albedo_and_param_groups():
    model = Gaussians(GaussiansConfig(num_points=300, init_radius=0.4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.params["opacities"][0] = 10.0
        model.params["colors"][0] = torch.tensor([5.0, -5.0, -5.0])
    centre = model.params["means"][:1].detach()
    sigma = model.density(torch.cat([centre, torch.tensor([[3.0, 3.0, 3.0]])]))
    assert sigma[0] > 1.0 and sigma[1] == 0
    # a thin ray through an opaque Gaussian accumulates about -ln(1 - 0.95) of optical depth
    solo = Gaussians(GaussiansConfig(num_points=1))
    with torch.no_grad():
        solo.params["opacities"][:] = 10.0
    t = torch.linspace(-1, 1, 2001)
    line = torch.stack([t, torch.zeros_like(t), torch.zeros_like(t)], -1) + solo.params["means"].detach()
    tau = solo.density(line).sum() * (t[1] - t[0])
    assert abs(tau.item() - (-math.log(0.05))) < 0.05
    colour = model.albedo(centre)[0]
    assert colour[0] > colour[1] and colour[0] > colour[2]
    groups = model.param_groups()
    assert [g["name"] for g in groups] == list(model.params) and len(groups) == 5
    assert {g["name"] for g in groups} == {"means", "scales", "quats", "opacities", "colors"}
    assert all(len(g["params"]) == 1 for g in groups)


def test_render_seam():
    model = Gaussians(GaussiansConfig(num_points=500))
    cams = _cameras(16, 12)
    out = model.render(cams, torch.ones(3))
    assert out.rgb.shape == (3, 12, 16, 3) and out.alpha.shape == out.depth.shape == (3, 12, 16, 1)
    assert (out.rgb >= 0).all() and (out.rgb <= 1).all()
    hit = out.alpha[..., 0] > 0.5
    assert hit.any() and ((out.depth[..., 0][hit] > 1.4) & (out.depth[..., 0][hit] < 3.6)).all()
    out.rgb.mean().backward()
    assert all(p.grad is not None for p in model.params.values())
    assert "meta" in out.extras


def test_opacity_reset_fires_on_our_schedule_and_not_on_gsplats(tmp_path):
    from gsplat.strategy import DefaultStrategy

    from dream3d.config import build_config
    from dream3d.run.loop import Trainer
    from tests.support import TINY

    gaussians = {"num_points": 128, "refine_start": 100, "reset_every": 4, "refine_stop": 10}
    cfg = build_config(TINY, {"prompt": "a red cube", "representation": "gaussians", "gaussians": gaussians})
    trainer = Trainer(cfg, tmp_path)
    for _ in range(3):
        trainer.train_step()
    assert trainer.representation.opacities.max() > 0.05
    trainer.train_step()  # step 4: reset to 2 * prune_opa
    assert trainer.representation.opacities.max() <= 2 * 0.005 + 1e-6

    # gsplat 1.5.3's own reset (`step % reset_every == 0 & step > 0`) never fires, hence ours
    rep = trainer.representation
    out = rep.render(trainer_cameras(), torch.ones(3))
    before = rep.params["opacities"].detach().clone().fill_(2.0)
    rep.params["opacities"].data.copy_(before)
    strategy = DefaultStrategy(refine_start_iter=100, reset_every=4)
    strategy.step_pre_backward(rep.params, {}, rep.strategy_state, 4, out.extras["meta"])
    out.rgb.sum().backward()
    strategy.step_post_backward(rep.params, trainer.optimizers, strategy.initialize_state(), 4, out.extras["meta"])
    assert torch.equal(rep.params["opacities"].detach(), before)


def trainer_cameras():
    return look_at_cameras(torch.tensor([10.0]), torch.tensor([20.0]), torch.tensor([2.5]), 45.0, 16, 16)


def _noise_scene(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.05
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    return means, quats, scales, opacities


def test_consistent_noise_is_unit_variance_per_pixel():
    from dream3d.representations.splat_raster import rasterize_noise

    means, quats, scales, opacities = _noise_scene()
    cams = look_at_cameras(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 120.0]), torch.full((2,), 2.5), 45.0, 16, 16)
    n = len(means)
    # channel k carries the coefficient of Gaussian k's value (k = n: the background's)
    noise = torch.eye(n, n + 1, dtype=torch.float64)
    background = torch.zeros(2, 16, 16, n + 1, dtype=torch.float64)
    background[..., n] = 1
    coeffs = rasterize_noise(means.double(), quats.double(), scales.double(), opacities.double(), noise, background,
                             cams.viewmats().double(), cams.intrinsics().double(), 16, 16)
    torch.testing.assert_close(coeffs.pow(2).sum(-1), torch.ones(2, 16, 16, dtype=torch.float64))
    assert (coeffs[..., :n].abs().sum(-1) > 0.5).any()  # the splats do contribute


def test_consistent_noise_agrees_across_views():
    cfg = GaussiansConfig(num_points=1)
    rep = Gaussians(cfg)
    with torch.no_grad():
        rep.params["means"].zero_()
        rep.params["scales"].fill_(math.log(1.0))
        rep.params["opacities"].fill_(20.0)  # opaque: the splat's value fills its centre
    cams = look_at_cameras(torch.tensor([0.0, 40.0]), torch.tensor([0.0, 200.0]), torch.full((2,), 2.5), 45.0, 16, 16)
    value = torch.tensor([[1.7, -0.4, 0.3]])
    out = rep.render_noise(cams, value, torch.zeros(2, 16, 16, 3))
    torch.testing.assert_close(out[:, 8, 8], value.expand(2, 3), atol=5e-3, rtol=0)


def test_splats_ply_has_the_standard_layout_and_round_trips(tmp_path):
    from plyfile import PlyData

    from dream3d.representations.cameras import look_at_cameras as cams_at

    rep = Gaussians(GaussiansConfig(num_points=200), generator=torch.Generator().manual_seed(3))
    path = tmp_path / "splats.ply"
    rep.save_ply(path)
    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert vertex.count == 200
    back = Gaussians(GaussiansConfig(num_points=200, init_points=str(path)))
    cameras = cams_at(torch.tensor([20.0]), torch.tensor([40.0]), torch.tensor([2.5]), 45.0, 24, 24)
    a, b = rep.render(cameras, torch.ones(3)), back.render(cameras, torch.ones(3))
    torch.testing.assert_close(a.rgb, b.rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.alpha, b.alpha, atol=1e-5, rtol=0)


def _solid_cube_splats(edge: float = 0.6, per_axis: int = 14) -> Gaussians:
    """Opaque red Gaussians filling a cube, spaced at about one scale: a converged splat object."""
    axis = torch.linspace(-edge / 2, edge / 2, per_axis)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    model = Gaussians(GaussiansConfig(num_points=len(points), init_radius=0.1))
    with torch.no_grad():
        model.params["means"].copy_(points)
        model.params["scales"].fill_(math.log(edge / per_axis))
        model.params["opacities"].fill_(4.0)
        model.params["colors"].copy_(torch.tensor([3.0, -3.0, -3.0]))
    return model


def test_mesh_from_splats_matches_their_renders(tmp_path):
    """The exported mesh of a splat object passes the glTF validator and covers what the splats render."""
    from dream3d.eval.scores import mesh_iou
    from dream3d.export.files import export_representation
    from tests.support import validate_glb

    model = _solid_cube_splats()
    files = export_representation(model, tmp_path, formats=["glb", "ply"], resolution=64, video=False)
    validate_glb(files["glb"])
    mesh = trimesh.load(files["ply"], force="mesh")
    assert mesh_iou(mesh, model, torch.ones(3)) >= 0.8
    colours = mesh.visual.vertex_colors[:, :3].astype(float) / 255
    assert (colours[:, 0] > 0.8).all() and (colours[:, 1:] < 0.2).all()


def test_density_does_not_depend_on_the_order_of_points():
    """Morton chunking changes which Gaussians a chunk gathers, not the values at each point."""
    model = Gaussians(GaussiansConfig(num_points=400, init_radius=0.4, field_chunk=64), generator=torch.Generator().manual_seed(1))
    points = torch.rand(1000, 3) - 0.5
    perm = torch.randperm(len(points), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(model.density(points)[perm], model.density(points[perm]), rtol=1e-4, atol=1e-6)
    assert torch.allclose(model.albedo(points)[perm], model.albedo(points[perm]), atol=1e-4)


def test_field_filter_keeps_the_mesh_of_thin_splats_at_the_rendered_surface(tmp_path):
    """Splats thinner than the mesh grid's spacing (a converged shell) still mesh to what they render."""
    from dream3d.eval.scores import mesh_iou
    from dream3d.representations.mesh_extraction import extract_mesh

    n = 3000
    k = torch.arange(n) + 0.5
    z, phi = 1 - 2 * k / n, math.pi * (1 + 5**0.5) * k  # a Fibonacci sphere of radius 0.45
    shell = 0.45 * torch.stack([(1 - z**2).sqrt() * phi.cos(), (1 - z**2).sqrt() * phi.sin(), z], -1)
    model = Gaussians(GaussiansConfig(num_points=n, init_radius=0.1))
    with torch.no_grad():
        model.params["means"].copy_(shell)
        model.params["scales"].fill_(math.log(0.008))  # the 64^3 grid below has spacing 0.032
        model.params["opacities"].fill_(4.0)
    scores = {}
    for field_filter in (0.0, 0.02):
        model.cfg.field_filter = field_filter
        scores[field_filter] = mesh_iou(extract_mesh(model.density, model.albedo, resolution=64), model, torch.ones(3))
    assert scores[0.02] >= 0.9 and scores[0.02] > scores[0.0], scores


@pytest.fixture
def gsplat_extension(monkeypatch):
    """A GPU machine as far as the probe sees: set(extension) makes gsplat's extension module hold it (None:
    gsplat disabled itself) or fail to import (ImportError: its build failed). The probe and its warning are
    once per process, so they are forgotten before and after."""
    import types

    from dream3d.representations import splat_raster

    def simulate(extension):
        backend = types.ModuleType("gsplat.cuda._backend")
        backend._C = extension
        monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", None if extension is ImportError else backend)

    def forget():
        for cached in (splat_raster.gsplat_cuda, splat_raster._warn_fallback):
            cached.cache_clear()

    forget()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    yield simulate
    forget()


@pytest.mark.parametrize("extension", [None, ImportError])
def test_a_gpu_without_gsplats_kernels_splats_with_pytorch_and_warns_once(gsplat_extension, extension, caplog):
    """gsplat's pure-Python wheel leaves its extension None where it cannot compile it; rendering then took
    gsplat's path on CUDA tensors and failed on that None."""
    from dream3d.representations.splat_raster import splat_backend

    gsplat_extension(extension)
    with caplog.at_level("WARNING", logger="dream3d.representations.splat_raster"):
        assert splat_backend(torch.device("cuda")) == "torch"
        assert splat_backend(torch.device("cuda", 0)) == "torch"
    (record,) = caplog.records  # one line, once
    assert "\n" not in record.getMessage()
    assert all(word in record.getMessage() for word in ("nvcc", "ninja", "10x", "PyTorch rasterizer"))


def test_gsplats_kernels_splat_where_they_load_and_never_on_the_cpu(gsplat_extension, caplog):
    from dream3d.representations.splat_raster import splat_backend

    gsplat_extension(object())
    assert splat_backend(torch.device("cuda")) == "gsplat"
    assert splat_backend(torch.device("cpu")) == "torch"
    assert not caplog.records
