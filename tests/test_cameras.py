"""Camera conventions: OpenGL c2w, +z up world, OpenCV viewmats, intrinsics matching rays."""

import math

import torch

from dream3d.run.camera_sampling import CameraConfig, orbit_cameras, sample_cameras
from dream3d.representations.cameras import Cameras, look_at_cameras, ray_aabb


def project(cams: Cameras, points: torch.Tensor) -> torch.Tensor:
    """World points [N,3] -> pixel (u, v) [B,N,2] through viewmats and intrinsics (OpenCV)."""
    homo = torch.cat([points, torch.ones(len(points), 1)], -1)
    cam = torch.einsum("bij,nj->bni", cams.viewmats(), homo)[..., :3]
    pix = torch.einsum("bij,bnj->bni", cams.intrinsics(), cam)
    return pix[..., :2] / pix[..., 2:]


def test_known_points_project_where_expected():
    cams = look_at_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.5]), 45.0, 64, 64)
    # camera on +x looking at the origin: the origin is the image centre
    torch.testing.assert_close(cams.c2w[0, :3, 3], torch.tensor([2.5, 0.0, 0.0]))
    uv = project(cams, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]]))[0]
    torch.testing.assert_close(uv[0], torch.tensor([32.0, 32.0]))
    f = 32 / math.tan(math.radians(22.5))
    # world +z is up in the image (smaller row); world +y is to the right when looking from +x
    torch.testing.assert_close(uv[1], torch.tensor([32.0, 32.0 - f * 0.5 / 2.5]))
    torch.testing.assert_close(uv[2], torch.tensor([32.0 + f * 0.5 / 2.5, 32.0]))


def test_rays_agree_with_projection():
    cams = look_at_cameras(torch.tensor([30.0, -10.0]), torch.tensor([45.0, 200.0]), torch.tensor([2.5, 3.0]), 45.0, 16, 12)
    origins, dirs = cams.rays()
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(2, 12, 16))
    points = origins[:, 5, 7] + 1.7 * dirs[:, 5, 7]  # a point on the ray through pixel (row 5, col 7)
    for b in range(2):
        uv = project(cams[b], points[b : b + 1])[0, 0]
        torch.testing.assert_close(uv, torch.tensor([7.5, 5.5]), atol=1e-4, rtol=0)
    # camera looks down its -z axis (OpenGL)
    centre = -cams.c2w[:, :3, 2]
    torch.testing.assert_close(centre, -cams.c2w[:, :3, 3] / cams.distance.view(-1, 1))


def test_elevation_is_up():
    cams = look_at_cameras(torch.tensor([45.0]), torch.tensor([90.0]), torch.tensor([2.0]), 45.0, 8, 8)
    pos = cams.c2w[0, :3, 3]
    torch.testing.assert_close(pos, torch.tensor([0.0, 2 * math.cos(math.pi / 4), 2 * math.sin(math.pi / 4)]), atol=1e-6, rtol=0)


def test_sampler_ranges_and_determinism():
    cfg = CameraConfig(batch_size=64)
    a = sample_cameras(cfg, 32, torch.Generator().manual_seed(3))
    b = sample_cameras(cfg, 32, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.c2w, b.c2w)
    assert a.elevation.min() >= -10 and a.elevation.max() <= 45
    assert a.azimuth.min() >= 0 and a.azimuth.max() < 360
    assert (a.distance == 2.5).all() and torch.allclose(a.fovy, torch.tensor(math.radians(45.0)))
    assert a.width == a.height == 32


def test_orbit_and_aabb():
    cams = orbit_cameras(4, 8)
    assert cams.azimuth.tolist() == [0.0, 90.0, 180.0, 270.0]
    near, far, hit = ray_aabb(torch.tensor([[2.0, 0, 0], [2.0, 0, 0]]), torch.tensor([[-1.0, 0, 0], [0, 0, 1.0]]), 1.0)
    assert hit.tolist() == [True, False]
    assert near[0].item() == 1.0 and far[0].item() == 3.0
