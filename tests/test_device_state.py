"""A checkpoint loads onto the run's device whole (issue 25, items 2 and 4): the Gaussians' densification
state, the optimizers' moments and the noise buffers follow the parameters, and the global generators a
step draws from (the GPU's on CUDA) are saved and restored."""

import pytest
import torch

from dream3d import api
from dream3d.config import build_config
from dream3d.run.loop import Trainer

# densification every step from step 1 so that the strategy's statistics exist; consistent noise for the
# per-Gaussian noise buffers
SETTINGS = {
    "prompt": "a red cube", "representation": "gaussians", "steps": 3, "resolution": 16, "noise": "consistent",
    "gaussians": {"num_points": 64, "refine_start": 1, "refine_every": 1, "refine_stop": 10, "grow_grad2d": 1e-8},
}


@pytest.fixture
def trained(tmp_path):
    trainer = api.start(build_config({**SETTINGS, "out": str(tmp_path)}))
    for _ in range(2):
        trainer.train_step()
    return trainer


def tensors(value, path=""):
    """(path, tensor) for every tensor in nested dicts and lists."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from tensors(item, f"{path}.{i}")


# copying a checkpoint's values into meta tensors is a no-op, and torch says so for each parameter
@pytest.mark.filterwarnings("ignore:.*to a meta parameter")
def test_a_checkpoint_loads_every_state_onto_the_parameters_device(trained):
    state = trained.state_dict()
    assert any(t is not None for t in state["representation"]["_extra_state"]["strategy_state"].values())
    resumed = Trainer(trained.cfg, trained.run_dir)
    resumed.representation.to("meta")  # another device type than the checkpoint's (read onto the CPU)
    resumed.load_state_dict(state)

    held = dict(tensors(resumed.representation.state_dict(), "representation"))
    held.update(tensors(resumed.representation.strategy_state, "strategy_state"))
    for name, opt in resumed.optimizers.items():
        # Adam keeps its step count on the host by design (one per parameter, read by the host each step)
        held.update((f"optimizer.{name}{path}", t) for path, t in tensors(opt.state_dict()["state"])
                    if not path.endswith(".step"))
    assert any(path.startswith("strategy_state.") for path in held)
    assert any("noise_values" in path for path in held) and any("exp_avg" in path for path in held)
    elsewhere = [path for path, t in held.items() if t.device.type != "meta"]
    assert not elsewhere


def test_the_gpu_generator_is_checkpointed_and_restored(trained, monkeypatch):
    """On CUDA gsplat's split draws from the GPU's global generator: its state rides in the checkpoint."""
    gpu_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": restored.append(new_state))
    trained.device = torch.device("cuda")  # as a CUDA run's trainer (the tensors stay on the CPU here)
    state = trained.state_dict()
    assert torch.equal(state["cuda_rng"], gpu_state)

    resumed = Trainer(trained.cfg, trained.run_dir)
    resumed.device = torch.device("cuda")
    resumed.load_state_dict(state)
    assert len(restored) == 1 and torch.equal(restored[0], gpu_state)


def test_a_cpu_checkpoint_touches_no_gpu_generator(trained, monkeypatch):
    def no_gpu(*args, **kwargs):
        raise AssertionError("a CPU run reached the GPU's generator")

    monkeypatch.setattr(torch.cuda, "get_rng_state", no_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_gpu)
    state = trained.state_dict()
    assert "cuda_rng" not in state
    Trainer(trained.cfg, trained.run_dir).load_state_dict(state)
