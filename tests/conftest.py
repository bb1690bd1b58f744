import os
from pathlib import Path

import pytest

from tests.support import TINY

# No test may download: the Hugging Face hub is offline for every test (set before any import of it).
os.environ["HF_HUB_OFFLINE"] = "1"
# One prior dataset cache for the whole test session (built on first use, reused by later runs).
os.environ.setdefault("DREAM3D_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "dream3d-test"))

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random-weight Stable Diffusion folder, one per test module."""
    from tests.tiny_diffusers import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random-weight diffusers folders by kind: sd, sd-v (v-prediction) and if, one set per test module."""
    from tests.tiny_diffusers import build_tiny_if, build_tiny_sd

    root = tmp_path_factory.mktemp("models")
    return {"sd": build_tiny_sd(root / "sd"), "sd-v": build_tiny_sd(root / "sd-v", prediction_type="v_prediction"),
            "if": build_tiny_if(root / "if")}


@pytest.fixture
def embedding_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the session's is shared): random models built per module must not meet
    embeddings cached for another. Returns the text-embedding folder in it."""
    monkeypatch.setenv("DREAM3D_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "text-embeddings"


@pytest.fixture
def tiny(tmp_path):
    """Config layers for a tiny run writing under tmp_path."""
    return {**TINY, "out": str(tmp_path / "runs")}


def check_rule_mechanism(rule: str, run_dir: Path) -> None:
    """Asserts, from a finished run's log and checkpoint, that the rule's own mechanism worked (not
    merely that its name reached config.yaml): CSD's beta and ISM's interval follow their schedules
    at the logged steps, VSD/ESD's LoRA moved off its init, CFD's noise is a field on the
    representation, repulsion was applied. Defaults of each rule are assumed (step k logs k + 1)."""
    import json

    import torch

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(r["skipped"] for r in records)
    steps = [r["step"] - 1 for r in records]
    if rule == "csd":  # negative_weight [0, 1, 5000]: beta = step / 5000
        assert [r["beta"] for r in records] == pytest.approx([s / 5000 for s in steps])
    elif rule == "ism":  # delta_T from 100 to 80 over 1500 warm-up steps; s = max(t - delta_T, 0)
        for s, r in zip(steps, records):
            delta = int(80 + (1 - s / 1500) * 20)
            assert r["t"] - r["s"] == delta or r["s"] == 0
    elif rule in ("vsd", "esd"):
        assert all(r["loss_lora"] > 0 and r["lora_skipped_steps"] == 0 for r in records)
        checkpoint = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
        lora = [v for k, v in torch.load(checkpoint, weights_only=True)["guidance"].items() if k.startswith("lora.")]
        assert lora and all(torch.count_nonzero(v) > 0 for v in lora)  # every B left zero
    elif rule == "cfd":
        state = torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
        assert any(k.endswith(("noise_values", "noise_grid")) for k in state["representation"])
    elif rule == "rsd":
        assert all(r["loss_repulsion"] != 0 for r in records)
    else:
        assert rule in ("sds", "nfsd"), rule
        assert all(20 <= r["t"] <= 980 for r in records)  # t ~ U[0.02 T, 0.98 T]


@pytest.fixture
def rule_mechanism():
    """check_rule_mechanism(rule, run_dir), for the end-to-end tests of the guidance rules."""
    return check_rule_mechanism
