"""The same seed gives the same Gaussians at 2 torch threads, and a SIGINT-then-resume run ends where an
uninterrupted one does, bit for bit (issue 31: the splat backward's gathers accumulated in thread order)."""

import os
import signal

import pytest
import torch

from dream3d import api
from dream3d.rundir import folder as rundir
from dream3d.config import build_config
from dream3d.run.loop import RunInterrupted, Trainer
from dream3d.run.stop import SignalStop
from tests.support import assert_same

# Small enough for the default run, large enough that a step's splat pairs span both threads' chunks;
# densification from step 2 so the strategy's statistics and gsplat's split draws are in the checkpoints.
SETTINGS = {
    "prompt": "a blue cone", "representation": "gaussians", "seed": 3, "steps": 4, "resolution": 16,
    "checkpoint_every": 2, "preview_every": 100,
    "gaussians": {"num_points": 256, "refine_start": 2, "refine_every": 2, "refine_stop": 4, "grow_grad2d": 1e-6},
}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def signal_handlers():
    """SignalStop installs SIGINT/SIGTERM handlers in this process: put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def final_state(run_dir):
    """The last checkpoint's state without its wall-clock field."""
    _, state = rundir.latest_state(run_dir)
    state.pop("elapsed")
    return state


def train(tmp_path, name):
    trainer = api.start(build_config({**SETTINGS, "out": str(tmp_path / name)}))
    trainer.run()
    return trainer.run_dir


def test_two_gaussian_runs_with_one_seed_give_identical_checkpoints(tmp_path, two_threads):
    first, second = train(tmp_path, "a"), train(tmp_path, "b")
    assert_same(final_state(first), final_state(second))


def test_sigint_then_resume_gives_the_uninterrupted_checkpoint(tmp_path, two_threads, signal_handlers):
    uninterrupted = train(tmp_path, "a")

    trainer = api.start(build_config({**SETTINGS, "out": str(tmp_path / "b")}))

    def interrupt(event):
        if event.kind == "step" and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted):
        trainer.run(interrupt, SignalStop())
    assert rundir.latest_state(trainer.run_dir)[1]["step"] == 2
    resumed = Trainer(rundir.load_run_config(trainer.run_dir), trainer.run_dir)
    resumed.load_state_dict(rundir.latest_state(trainer.run_dir)[1])
    resumed.run()
    assert_same(final_state(uninterrupted), final_state(trainer.run_dir))
