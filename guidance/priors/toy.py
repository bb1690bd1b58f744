"""The embedded prior ("toy", "toy-mv"): the exact optimal denoiser of the toy world.

Its "training set" is a dense grid of toy-world renders of every class; for a noisy
image it returns the posterior mean E[x0 | x_t, prompt] over that set under the DDPM
schedule, i.e. what a perfectly trained pixel-space diffusion model (DeepFloyd-IF-like,
x = 2 rgb - 1 at 64x64) would predict. The prompt restricts the set to the classes it
names. "toy-mv" also conditions on the query camera, like a camera-conditioned multi-view
model: it takes the posterior over the classes at each dataset view near the camera and mixes
those views by how close each is to the camera, so the camera alone decides which views count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dream3d.guidance.priors import toy_world
from dream3d.guidance.priors.base import Embeddings, Prior, PriorError, PriorSettings, ddpm_alphas_cumprod
from dream3d.guidance.priors.cache import cache_root, load_cached, save_cached
from dream3d.representations.cameras import Cameras, degrees_between, look_at_cameras

RESOLUTION = 64
SUPERSAMPLE = 2
DISTANCE = toy_world.CAMERA_DISTANCE
FOVY_DEG = toy_world.CAMERA_FOVY_DEG
# The world's camera range: elevation [-10, 45] in 11 degree steps, azimuth every 15 degrees (6 x 24 = 144 views).
ELEVATIONS: tuple[float, ...] = (-10.0, 1.0, 12.0, 23.0, 34.0, 45.0)
AZIMUTHS: tuple[float, ...] = tuple(15.0 * k for k in range(24))
# toy-mv's camera conditioning. A kernel weight alone conditions only at large t: at small t the image
# distances dwarf any finite log-weight, and the posterior snaps to whichever view of the class looks most
# like the render. A cone whose base hangs low then passes, from elevation 0, for the view from 12 degrees,
# and SDS keeps the skirt (docs/benchmarks-history.md, "The prior's camera window"). So only views within
# VIEW_WINDOW_DEG of the nearest dataset view count at all: a camera between grid views keeps the views
# around it (the grid spacing is 11 degrees in elevation, 15 in azimuth), not the next ring out. Between
# those the image must not choose either: a render from elevation 4 whose base hangs low came back as the
# view from 12 degrees, not 1 (docs/benchmarks-history.md, "Views mixed by the camera"), so the kernel weights
# mix the views' own posteriors.
VIEW_SIGMA_DEG = 6.0
VIEW_WINDOW_DEG = 10.0

_LOGIT_MARGIN = 40.0  # images this far below the best log-weight carry < e^-40 of it
_LOGIT_TOL = 1e-3  # float32 log-weights whose error bound exceeds this are recomputed in float64


def dataset_cameras() -> Cameras:
    """The V = 144 dataset views, elevation-major (view = elevation_index * 24 + azimuth_index)."""
    el = torch.tensor(ELEVATIONS).repeat_interleave(len(AZIMUTHS))
    az = torch.tensor(AZIMUTHS).repeat(len(ELEVATIONS))
    return look_at_cameras(el, az, torch.full_like(el, DISTANCE), FOVY_DEG, RESOLUTION, RESOLUTION)


def _dataset_key() -> str:
    spec = {"world": toy_world.WORLD_VERSION, "resolution": RESOLUTION, "supersample": SUPERSAMPLE,
            "distance": DISTANCE, "fovy": FOVY_DEG, "elevations": ELEVATIONS, "azimuths": AZIMUTHS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_shape_renders(root: Path | None = None) -> dict[str, Tensor]:
    """Per-shape renders of the dataset views, from the disk cache (rendered and cached on a miss).

    Returns dict ``mask``, ``shade``: [6, V, 64, 64, 1] float32 (see toy_world.render_shapes).
    """
    path = (root or cache_root()) / "toy-prior" / _dataset_key() / "shapes.pt"
    cached = load_cached(path)
    if cached is not None:
        return cached
    cams = dataset_cameras()
    passes = [toy_world.render_shapes(cams, [s] * len(cams), SUPERSAMPLE) for s in range(len(toy_world.SHAPES))]
    renders = {k: torch.stack([p[k] for p in passes]) for k in ("mask", "shade")}
    save_cached(renders, path)
    return renders


@dataclass(frozen=True)
class ToyDataset:
    """N = 36 * V images, class-major (image = class * V + view).

    images: [N, D] float32, x = 2 rgb - 1 flattened from [3, 64, 64], minus ``mean`` [D]
    (centring shrinks the dot products, hence their float32 rounding); image i is
    x_i = mean + images_i. sq_norms: [N] float64 ||x_i||^2; norms: [N] float64 ||images_i||.
    class_of, view_of: [N] long. elevation, azimuth: [V] float64 degrees of the views.
    """

    images: Tensor
    mean: Tensor
    sq_norms: Tensor
    norms: Tensor
    class_of: Tensor
    view_of: Tensor
    elevation: Tensor
    azimuth: Tensor

    def to(self, device: torch.device) -> "ToyDataset":
        return ToyDataset(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@functools.lru_cache(maxsize=1)
def _dataset_at(root: str) -> ToyDataset:
    renders = load_shape_renders(Path(root))
    V = len(ELEVATIONS) * len(AZIMUTHS)
    images = torch.empty(len(toy_world.CLASSES), V, 3, RESOLUTION, RESOLUTION)
    for c, shape in enumerate(toy_world.CLASS_SHAPE.tolist()):
        rgb = toy_world.composite(renders["mask"][shape], renders["shade"][shape], toy_world.ALBEDOS[c])
        images[c] = (2 * rgb - 1).permute(0, 3, 1, 2)
    images = images.view(-1, 3 * RESOLUTION * RESOLUTION)
    mean = images.mean(0)
    images -= mean
    # Of mean + images_i in float64, the dataset as stored (centring rounded it in float32).
    sq_norms = (images.double() + mean.double()).pow(2).sum(-1)
    cams = dataset_cameras()
    return ToyDataset(
        images=images, mean=mean, sq_norms=sq_norms, norms=images.double().norm(dim=-1),
        class_of=torch.arange(len(toy_world.CLASSES)).repeat_interleave(V),
        view_of=torch.arange(V).repeat(len(toy_world.CLASSES)),
        elevation=cams.elevation.double(), azimuth=cams.azimuth.double(),
    )


def toy_dataset() -> ToyDataset:
    """The prior's dataset (built once per process from the disk cache under ``cache_root()``)."""
    return _dataset_at(str(cache_root()))


class ToyPrior(Prior):
    """The Prior protocol (guidance/priors/base.py) over the toy world; no weights, no UNet.

    camera_conditioned: "toy-mv": E[x0 | x_t, prompt, view] at each dataset view within ``view_window_deg``
    of the view nearest the query camera, averaged with weights from a Gaussian kernel of width
    ``view_sigma_deg`` in the angle between the view's direction and the camera's. The image picks the
    class within each view, never the view.
    """

    resolution = RESOLUTION
    num_train_timesteps = 1000
    unet = None

    def __init__(self, camera_conditioned: bool = False, view_sigma_deg: float = VIEW_SIGMA_DEG,
                 view_window_deg: float = VIEW_WINDOW_DEG) -> None:
        self.camera_conditioned = camera_conditioned
        self.view_sigma_deg = view_sigma_deg
        self.view_window_deg = view_window_deg
        self.name = "toy-mv" if camera_conditioned else "toy"
        self.alphas_cumprod = ddpm_alphas_cumprod(self.num_train_timesteps)
        self._embeddings: dict[str, Embeddings] = {}
        self._data = {torch.device("cpu"): toy_dataset()}

    @classmethod
    def from_config(cls, settings: PriorSettings) -> ToyPrior:
        """"toy" or "toy-mv" (``build_toy_prior``); the toy world needs no model and runs on the CPU."""
        return build_toy_prior(settings.name)

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> x [B,3,64,64] in [-1,1] (differentiable)."""
        if rgb.shape[-2:] != (RESOLUTION, RESOLUTION):
            rgb = F.interpolate(rgb, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        return 2 * rgb - 1

    def decode(self, x: Tensor) -> Tensor:
        """x [B,3,64,64] -> rgb [B,3,64,64] in [0,1]."""
        return ((x + 1) / 2).clamp(0, 1)

    def embed(self, prompt: str) -> Embeddings:
        """cond: [36] float mask of the prompt's classes; uncond: all ones (the whole world)."""
        if prompt not in self._embeddings:
            cond = torch.zeros(len(toy_world.CLASSES))
            cond[toy_world.parse_prompt(prompt)] = 1
            self._embeddings[prompt] = Embeddings(prompt, cond, torch.ones(len(toy_world.CLASSES)))
        return self._embeddings[prompt]

    def predict_noise(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None = None) -> Tensor:
        """eps [B,3,64,64] = (x_t - a_t x0_hat) / s_t for x_t [B,3,64,64], t [B] long, embeddings [B,36]."""
        x0, a, s = self._posterior(x_t, t, embeddings, cameras)
        eps = (x_t.detach().flatten(1).double() - a[:, None] * x0.double()) / s[:, None]
        return eps.to(x_t.dtype).view_as(x_t)

    def posterior_mean(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None = None) -> Tensor:
        """x0_hat = E[x0 | x_t] [B,3,64,64] over the dataset images the embeddings (class masks [B,36]) allow."""
        return self._posterior(x_t, t, embeddings, cameras)[0].to(x_t.dtype).view_as(x_t)

    @torch.no_grad()
    def _posterior(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Cameras | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (x0_hat [B,D] float32, a_t [B] float64, s_t [B] float64)."""
        device = x_t.device
        if device not in self._data:
            self._data[device] = self._data[torch.device("cpu")].to(device)
        data = self._data[device]
        B = x_t.shape[0]
        q = x_t.detach().reshape(B, -1).float()
        abar = self.alphas_cumprod.to(device, torch.float64)[torch.as_tensor(t, device=device).long().expand(B)]
        a, s2 = abar.sqrt()[:, None], (1 - abar)[:, None]
        # log w_i = -||x_t - a x_i||^2 / (2 s^2) up to a per-query constant, with x_i = mean + images_i:
        # the terms ||x_t||^2 and <x_t, mean> are the same for every i.
        prior = embeddings.detach().to(device, torch.float64).expand(B, -1).log()[:, data.class_of]
        view_weights = self._view_weights(cameras, data, B) if self.camera_conditioned else None
        if view_weights is not None:
            prior = prior.masked_fill(view_weights[:, data.view_of] == 0, -math.inf)
        logits = (2 * a * (q @ data.images.T).double() - a * a * data.sq_norms) / (2 * s2) + prior
        # At small t the logits are huge and float32 rounding of the dot products (relative to
        # ||x_t|| ||images_i||) would mis-weight near-identical views: recompute in float64 those
        # that could matter (near the best of the images normalised together) and whose float32 error
        # could exceed _LOGIT_TOL.
        bound = _matmul_rel_error() * 2 * a * q.double().norm(dim=-1, keepdim=True) * data.norms / (2 * s2)
        floor = self._group_max(logits - bound, data) - _LOGIT_MARGIN
        redo = (logits + bound >= floor) & (bound > _LOGIT_TOL) & prior.isfinite()
        for b in redo.any(-1).nonzero().flatten().tolist():
            rows = redo[b].nonzero().flatten()
            dots = torch.cat([data.images[r].double() @ q[b].double() for r in rows.split(1024)])
            logits[b, rows] = (2 * a[b] * dots - a[b] ** 2 * data.sq_norms[rows]) / (2 * s2[b]) + prior[b, rows]
        if view_weights is None:
            w = torch.softmax(logits, dim=-1)
        else:
            # each view's posterior over the classes (a view outside the window: all -inf, NaN, weight 0)
            per_view = torch.softmax(logits.view(B, -1, len(data.elevation)), dim=1).nan_to_num(0.0)
            w = (per_view * view_weights[:, None, :]).view(B, -1)
        x0 = data.mean + w.float() @ data.images
        return x0, a.squeeze(-1), s2.sqrt().squeeze(-1)

    def _group_max(self, logits: Tensor, data: ToyDataset) -> Tensor:
        """[B, N] -> [B, N] (or [B, 1]): the largest logit among the images normalised with each one
        (toy: all of them; toy-mv: the classes at its view)."""
        if not self.camera_conditioned:
            return logits.amax(-1, keepdim=True)
        return logits.view(len(logits), -1, len(data.elevation)).amax(1)[:, data.view_of]

    def _view_weights(self, cameras: Cameras | None, data: ToyDataset, B: int) -> Tensor:
        """[B, V] float64, each row summing to 1: the kernel weight of each view in the camera's window, else 0."""
        if cameras is None or len(cameras) != B:
            raise ValueError(f"the {self.name} prior needs one camera per image (got "
                             f"{'none' if cameras is None else len(cameras)} for {B})")
        angle = degrees_between(
            cameras.elevation.to(data.elevation)[:, None], cameras.azimuth.to(data.azimuth)[:, None],
            data.elevation[None], data.azimuth[None],
        )  # [B, V]
        near = angle <= angle.amin(-1, keepdim=True) + self.view_window_deg
        log_kernel = (-angle.pow(2) / (2 * self.view_sigma_deg**2)).masked_fill(~near, -math.inf)
        return torch.softmax(log_kernel, dim=-1)


def _matmul_rel_error() -> float:
    """A bound on float32 matmul error relative to ||x|| ||y|| (measured <= 1e-7 here at full precision)."""
    return 5e-7 if torch.get_float32_matmul_precision() == "highest" else 1e-2


def build_toy_prior(name: str) -> ToyPrior:
    """"toy" or "toy-mv"."""
    if name not in ("toy", "toy-mv"):
        raise PriorError(f"unknown toy prior {name!r}; choose 'toy' or 'toy-mv'")
    return ToyPrior(camera_conditioned=name == "toy-mv")


__all__ = [
    "ToyPrior", "ToyDataset", "build_toy_prior", "toy_dataset", "load_shape_renders", "dataset_cameras",
    "cache_root", "RESOLUTION", "ELEVATIONS", "AZIMUTHS", "VIEW_SIGMA_DEG", "VIEW_WINDOW_DEG",
]
