"""One host sync per training step (issue 15): the logged scalars leave the device together, once; and no
synchronous host-to-device copy (issue 25).

On a GPU every ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``.numpy()`` or ``.cpu()`` of a
device tensor waits for the device's queue to drain. This test counts them on the CPU. A function mode tells
apart what a CUDA run would hold on the host from what it would hold on the device: the run's generator is
swapped for one whose ``device`` reads ``cpu:0`` (the host, where every draw is made) while the run's device
stays ``cpu``, so that

- host: a draw from a generator; a tensor made with no device or on the generator's; a tensor moved
  to the host; whatever is computed from host tensors alone (and optimizer step counts, which torch's Adam
  keeps on the host);
- device: everything that existed before the step (parameters, buffers, the prior's weights, gradients),
  a tensor made or moved onto the run's device, and whatever is computed from a device tensor.

Copies: a host tensor moved onto the device without ``non_blocking=True`` (``to``, ``copy_``), and Python data
made into a device tensor (``torch.tensor``/``torch.as_tensor`` with a device), each of which waits on CUDA.

Not counted: the data-dependent shapes (``nonzero``, boolean masks) that the NeRF's empty-space skipping,
the rasteriser and gsplat's densification use, which wait for the queue too; copies of tensors that existed
before the step (they are taken to be on the device already: a table kept on the host and copied each step is
not seen); whether the host side of a non-blocking copy is pinned (``to_device`` pins only on CUDA); and copies
inside gsplat's and nerfacc's own code, which the CPU run does not reach.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from dream3d import api
from dream3d.config import build_config
from tests.tiny_diffusers import build_tiny_sd

HOST = torch.device("cpu", 0)
# the PyTorch rasterizer: a CUDA run splats with gsplat (the PyTorch path runs there only where gsplat's kernels
# are missing), so its per-chunk row offsets, made from Python numbers, are not counted
CPU_ONLY = "representations/splat_raster.py"
Tensor = torch.Tensor
CONVERSIONS = {Tensor.item, Tensor.__float__, Tensor.__int__, Tensor.__bool__, Tensor.__index__, Tensor.tolist,
               Tensor.numpy, Tensor.__array__, Tensor.cpu}
TINY = {
    "steps": 4, "resolution": 8, "checkpoint_every": 100, "preview_every": 100, "device": "cpu",
    "nerf": {"grid_resolutions": [8], "num_samples": 8, "occupancy_resolution": 8, "occupancy_every": 2},
    "gaussians": {"num_points": 64},
}


class HostGenerator(torch.Generator):
    """A CPU generator that names its device ``cpu:0``, so that draws made on ``generator.device`` are told apart."""

    @property
    def device(self) -> torch.device:
        return HOST


class HostSyncCounter(TorchFunctionMode):
    """Records each conversion of a device tensor to a Python value or a host tensor (``syncs``), and each
    synchronous copy from the host to the device (``copies``): a host tensor moved (``to``, ``copy_``) onto the
    device without ``non_blocking=True``, or Python data made into a device tensor (``torch.tensor``,
    ``torch.as_tensor``). On CUDA a plain copy from pageable host memory waits for the device's queue."""

    def __init__(self, host: list[Tensor]) -> None:
        super().__init__()
        self.host = WeakTensorKeyDictionary()
        for t in host:
            self.host[t] = True
        self.syncs: list[str] = []
        self.copies: list[str] = []

    def on_host(self, t: Tensor) -> bool:
        return t in self.host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_flatten((args, kwargs))[0]
        inputs = [a for a in leaves if isinstance(a, Tensor)]
        if func in CONVERSIONS and not self.on_host(args[0]):
            self.syncs.append(f"{getattr(func, '__name__', func)} of a {tuple(args[0].shape)} tensor")
        self._count_copy(func, args, kwargs)
        out = func(*args, **kwargs)
        if func is Tensor.to or func is Tensor.cpu:
            target = HOST if func is Tensor.cpu else self._target(args[1:], kwargs)
            if target is not None:
                # on the CPU a move can return its input: copy, so that both ends keep their own side
                out = out.clone() if out is args[0] else out
                self._mark(out, target == HOST if isinstance(target, torch.device) else self.on_host(target))
                return out
        if any(isinstance(a, torch.Generator) for a in leaves):
            on_host = True
        elif inputs:
            on_host = all(self.on_host(t) for t in inputs)
        else:  # a factory: where its device says
            device = kwargs.get("device")
            on_host = device is None or torch.device(device) == HOST
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._mark(t, on_host)
        return out

    def _count_copy(self, func, args: tuple, kwargs: dict) -> None:
        """Appends to ``copies`` when ``func(*args, **kwargs)`` copies host data onto the device synchronously,
        unless the PyTorch rasterizer makes it (``CPU_ONLY``)."""
        copy = None
        if func in (torch.tensor, torch.as_tensor):
            device = kwargs.get("device")
            source_on_device = isinstance(args[0], Tensor) and not self.on_host(args[0])
            if device is not None and torch.device(device) != HOST and not source_on_device:
                copy = f"{func.__name__} of {type(args[0]).__name__} onto the device"
        elif func is Tensor.to and self.on_host(args[0]) and not kwargs.get("non_blocking"):
            target = self._target(args[1:], kwargs)
            if target is not None and not (target == HOST if isinstance(target, torch.device) else self.on_host(target)):
                copy = f"to of a {tuple(args[0].shape)} host tensor"
        elif func is Tensor.copy_ and not self.on_host(args[0]) and self.on_host(args[1]) \
                and not (args[2:] or [kwargs.get("non_blocking")])[0]:
            copy = f"copy_ of a {tuple(args[1].shape)} host tensor"
        if copy and not any(frame.filename.endswith(CPU_ONLY) for frame in traceback.extract_stack()):
            self.copies.append(copy)

    def _mark(self, t: Tensor, on_host: bool) -> None:
        if on_host:
            self.host[t] = True
        else:
            self.host.pop(t, None)

    @staticmethod
    def _target(args: tuple, kwargs: dict) -> torch.device | Tensor | None:
        """Where ``Tensor.to(*args, **kwargs)`` sends a tensor: a device, a tensor whose side it takes, or None."""
        if args and isinstance(args[0], Tensor):
            return args[0]
        device = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
        return None if device is None else torch.device(device)


def host_tensors(trainer) -> list[Tensor]:
    """The optimizers' step counts that torch's (unfused) Adam keeps on the host and reads with ``.item()``."""
    optimizers = [*trainer.optimizers.values()]
    optimizers += [m.optimizer for m in trainer.guidance.modules() if isinstance(getattr(m, "optimizer", None),
                                                                                    torch.optim.Optimizer)]
    return [state["step"] for opt in optimizers if not opt.defaults.get("fused") for state in opt.state.values()]


def syncs_per_step(trainer, steps: int) -> list[HostSyncCounter]:
    """The counters (device-tensor conversions, synchronous host-to-device copies) of each of the next ``steps``
    training steps."""
    generator = HostGenerator()
    generator.set_state(trainer.generator.get_state())
    trainer.generator = generator
    if hasattr(trainer.prior, "use_generator"):
        trainer.prior.use_generator(generator)  # the VAE posterior sample draws from it
    found = []
    for _ in range(steps):
        with HostSyncCounter(host_tensors(trainer)) as counter:
            trainer.train_step()
        found.append(counter)
    return found


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


REGULARIZERS = {"loss": {"lambda_sparsity": 1.0, "lambda_opaque": 1.0}}
CASES = [
    pytest.param(representation, rule, layers, id=f"{representation}-{name or rule}")
    for representation in ("nerf", "gaussians")
    for rule, name, layers in [
        ("sds", "", {}), ("vsd", "", {}), ("csd", "", {}), ("ism", "", {}), ("nfsd", "", {}), ("cfd", "", {}),
        ("sds", "sds-regularizers", REGULARIZERS),
    ]
] + [
    pytest.param("nerf", "sds", {"loss": {**REGULARIZERS["loss"], "lambda_orient": 1.0}}, id="nerf-sds-orient"),
    pytest.param("gaussians", "sds", {"particles": 3, "repulsion": {"weight": 100.0}}, id="gaussians-sds-repulsion"),
]


@pytest.mark.parametrize("representation,rule,layers", CASES)
def test_a_step_waits_for_the_device_once(representation, rule, layers, tiny_sd, tmp_path):
    """Once per step; the NeRF once more after its occupancy grid is refreshed (here every 2 steps: the first
    counted step), to log the grid's occupied fraction. No synchronous host-to-device copy: the draws, the
    timesteps and the cameras go to the device non-blocking (``cameras.to_device``)."""
    trainer = api.start(build_config({**TINY, "prompt": "a corgi", "prior": "sd", "model": tiny_sd,
                                      "representation": representation, "guidance": rule,
                                      "out": str(tmp_path / "runs"), **layers}))
    trainer.train_step()  # optimizer state is made on the first step
    found = syncs_per_step(trainer, 2)
    syncs = [c.syncs for c in found]
    assert [len(s) for s in syncs] == ([2, 1] if representation == "nerf" else [1, 1]), syncs
    assert [c.copies for c in found] == [[], []]


def test_the_counter_sees_a_sync_and_not_a_host_draw():
    """The counter's own rules: a device scalar's ``float`` counts, a draw from the host generator does not,
    and a draw moved onto the device counts once read back."""
    weight = torch.ones(3)
    generator = HostGenerator().manual_seed(0)
    with HostSyncCounter([]) as counter:
        draw = torch.rand(3, generator=generator, device=generator.device)
        float(draw.sum())
        torch.tensor([2.0]).item()
        float((weight * draw.to(weight.device)).sum())
        float(weight.sum())
    assert len(counter.syncs) == 2, counter.syncs


def test_viewmats_are_the_inverse_of_c2w_with_opencv_axes():
    """The closed-form rigid inverse (no ``torch.linalg.inv``) equals the general inverse, y and z flipped."""
    from dream3d.representations.cameras import look_at_cameras

    gen = torch.Generator().manual_seed(0)
    cams = look_at_cameras(torch.rand(6, generator=gen) * 180 - 90, torch.rand(6, generator=gen) * 360,
                           1 + 3 * torch.rand(6, generator=gen), 45.0, 8, 8)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(cams.viewmats(), flip @ torch.linalg.inv(cams.c2w), atol=1e-6, rtol=0)
