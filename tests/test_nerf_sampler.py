"""The NeRF's render paths (issue 15): ``nerf.sampler`` dense, occupancy (nerfacc's CUDA ray marching) or auto.

On a CPU-only machine the occupancy path cannot run (nerfacc's marcher and packed volume rendering are CUDA
kernels), so these tests check the choice and its errors, that the estimator reads the NeRF's own grid as
the dense path does (nerfacc's PyTorch grid lookup), and the occupancy path's code around nerfacc's two CUDA
calls against the dense path with those two calls replaced by PyTorch equivalents. The GPU check
(``dream3d bench-gpu``) compares the real thing with the dense path on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from nerfacc import OccGridEstimator, render_weight_from_density
from nerfacc.grid import _query

from dream3d.config import build_config
from dream3d.errors import user_errors
from dream3d.representations import nerf as nerf_module
from dream3d.representations.nerf import NeRF, NeRFConfig, SamplerError, resolve_sampler
from dream3d.run.camera_sampling import CameraConfig, sample_cameras
from tests.support import dream3d

CPU = torch.device("cpu")


def _cameras(count: int = 2, size: int = 16):
    return sample_cameras(CameraConfig(batch_size=count), size, torch.Generator().manual_seed(0))


def _shaped_nerf(**settings) -> NeRF:
    """A NeRF whose field is the blob plus a seeded bump pattern, so the occupancy grid has structure."""
    model = NeRF(NeRFConfig(grid_resolutions=[8, 16], occupancy_resolution=16, **settings))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for grid in model.grids:
            grid.copy_(2 * torch.randn(grid.shape, generator=generator))
    model.update_occupancy()
    return model


def test_an_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="nerf.sampler: Input should be 'auto', 'dense' or 'occupancy'"):
        build_config({"prompt": "a red cube", "nerf": {"sampler": "fast"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_occupancy_without_a_gpu_is_one_line_and_writes_nothing(device, monkeypatch, capsys, tmp_path):
    status, err = dream3d(monkeypatch, capsys, "run", "a red cube", "--device", device, "--steps", 2,
                          "nerf.sampler=occupancy", "--out", tmp_path / "runs")
    assert status == 1
    assert err == ("error: nerf.sampler occupancy marches rays with nerfacc's CUDA kernels, which do not run on "
                   "the CPU; use nerf.sampler=dense or auto")
    assert not (tmp_path / "runs").exists()


def test_the_occupancy_path_on_cpu_tensors_is_a_user_error():
    with pytest.raises(SamplerError, match="do not run on the CPU") as caught:
        NeRF(NeRFConfig(sampler="occupancy")).render(_cameras(1), torch.ones(3))
    assert isinstance(caught.value, user_errors())


def test_auto_is_the_dense_path_on_the_cpu():
    assert resolve_sampler("auto", CPU) == resolve_sampler("dense", CPU) == "dense"
    renders = []
    for sampler in ("auto", "dense"):
        model = _shaped_nerf(sampler=sampler)
        renders.append(model.render(_cameras(), torch.ones(3), generator=torch.Generator().manual_seed(3)).rgb)
    assert torch.equal(*renders)


def test_the_estimator_marches_the_cells_the_dense_path_evaluates():
    """The estimator takes the NeRF's grid as its own, and nerfacc reads a point's cell as the dense path does."""
    model = _shaped_nerf()
    estimator = model._estimator(CPU)
    assert estimator.binaries.data_ptr() == model.occupancy.data_ptr()
    assert 0.05 < model.occupancy.float().mean() < 0.95  # a grid with both kinds of cell
    points = (torch.rand(20_000, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.999
    occupied, inside = _query(points, estimator.binaries, estimator.aabbs[0])
    assert inside.all() and torch.equal(occupied, model._occupied(points))
    model.update_occupancy()
    assert model._estimator(CPU).binaries.data_ptr() == model.occupancy.data_ptr()  # follows a refresh


def _march(self: OccGridEstimator, rays_o, rays_d, sigma_fn=None, t_min=None, t_max=None, render_step_size=1e-3,
           **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nerfacc's grid traversal in PyTorch: steps from t_min while inside [t_min, t_max], kept where the midpoint's
    cell is occupied; packed ray-major (no early stop)."""
    step = render_step_size
    k = torch.arange(int(((t_max - t_min).max() / step).ceil()) + 1)
    starts = t_min[:, None] + step * k
    ends = starts + step
    mids = rays_o[:, None] + rays_d[:, None] * ((starts + ends) / 2)[..., None]
    occupied = _query(mids.reshape(-1, 3), self.binaries, self.aabbs[0])[0].view(starts.shape)
    ray, sample = (occupied & (ends <= t_max[:, None])).nonzero(as_tuple=True)
    return ray, starts[ray, sample], ends[ray, sample]


def _packed_weights(t_starts, t_ends, sigmas, ray_indices=None, n_rays=None):
    """nerfacc's packed render_weight_from_density in PyTorch: per-ray exclusive sums of sigma * dt (the
    batched form, which the dense path calls, is nerfacc's own)."""
    if ray_indices is None:
        return render_weight_from_density(t_starts, t_ends, sigmas)
    optical = sigmas * (t_ends - t_starts)
    totals = torch.zeros(n_rays).index_add(0, ray_indices, optical)
    before = optical.cumsum(0) - optical - (totals.cumsum(0) - totals)[ray_indices]
    trans, alphas = torch.exp(-before), 1 - torch.exp(-optical)
    return trans * alphas, trans, alphas


def test_the_occupancy_path_renders_what_the_dense_path_does(monkeypatch):
    """With nerfacc's two CUDA calls in PyTorch: images, depth, the orientation penalty and the grid gradients
    agree with the dense path at 256 samples a ray (both integrate the same field; their samples differ)."""
    monkeypatch.setattr(OccGridEstimator, "sampling", _march)
    monkeypatch.setattr(nerf_module, "render_weight_from_density", _packed_weights)
    cameras, results = _cameras(), {}
    for sampler in ("dense", "occupancy"):
        monkeypatch.setattr(nerf_module, "resolve_sampler", lambda choice, device, sampler=sampler: sampler)
        model = _shaped_nerf(num_samples=256, ray_chunk=100)
        out = model.render(cameras, torch.ones(3), with_normals=True)
        (out.rgb.sum() + out.extras["orient"]).backward()
        results[sampler] = out, torch.cat([g.grad.flatten() for g in model.grids])
    (dense, dense_grad), (marched, marched_grad) = results["dense"], results["occupancy"]
    assert dense.alpha.mean() > 0.1
    for key in ("rgb", "alpha", "depth", "normal"):
        assert (getattr(dense, key) - getattr(marched, key)).abs().max() < 2e-3, key  # measured: 3e-4 to 1e-3
    assert float(marched.extras["orient"].detach()) == pytest.approx(float(dense.extras["orient"].detach()), rel=1e-3)
    assert torch.nn.functional.cosine_similarity(dense_grad, marched_grad, dim=0) > 0.999


def test_the_gpu_check_compares_the_two_paths(monkeypatch, tmp_path):
    """``bench-gpu``'s NeRF row on a short run's NeRF, the occupancy path's two CUDA calls in PyTorch as above:
    both timings, and parity figures that show the paths agree; on the CPU proper, the one-line reason."""
    from dream3d.eval import bench_gpu
    from dream3d.rundir import folder as rundir

    cfg = build_config({"prompt": "a red cube", "prior": "toy", "resolution": 16, "device": "cpu", "out": str(tmp_path),
                        "nerf": {"grid_resolutions": [8, 16], "occupancy_resolution": 16, "num_samples": 128}})
    run_dir = rundir.create_run_dir(cfg)
    rundir.save_checkpoint(run_dir, {"representation": _shaped_nerf(num_samples=128).state_dict()}, 1, 1)
    row = bench_gpu.nerf_samplers(run_dir, CPU, steps=1)
    assert row["occupancy"].startswith("nerf.sampler occupancy marches rays") and row["dense_ms_per_step"] > 0
    monkeypatch.setattr(OccGridEstimator, "sampling", _march)
    monkeypatch.setattr(nerf_module, "render_weight_from_density", _packed_weights)
    monkeypatch.setattr(bench_gpu, "resolve_sampler", lambda choice, device: choice)
    monkeypatch.setattr(nerf_module, "resolve_sampler", lambda choice, device: choice)
    row = bench_gpu.nerf_samplers(run_dir, CPU, steps=1)
    assert row["occupancy_ms_per_step"] > 0 and row["speedup"] > 0
    assert row["max_abs_rgb"] < 0.01 and row["max_abs_alpha"] < 0.01 and row["grad_cosine"] > 0.99
    assert "| grad_cosine |" in bench_gpu.markdown({"device": "cpu", "torch": "", "model": "", "stages": {},
                                                    "nerf_samplers": row})


def test_the_dense_path_does_not_probe_nerfacc(monkeypatch):
    """On a GPU the probe imports nerfacc's extension, whose first import builds it for minutes; the GPU check
    renders dense NeRFs while that build runs in another process, so choosing dense must not probe."""
    def probe():
        raise AssertionError("probed nerfacc")

    monkeypatch.setattr(nerf_module, "nerfacc_cuda", probe)
    assert resolve_sampler("dense", torch.device("cuda")) == "dense"
