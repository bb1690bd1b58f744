"""Every guidance rule runs end to end on CPU, on the shipped toy-unet and on a tiny random SD,
with the NeRF and with Gaussians, and exports (issue 6's acceptance matrix)."""

import pytest

from dream3d.config import GUIDANCES
from tests.support import run_cli

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("embedding_cache")


# each rule's run options; "rsd" is SDS with kernel repulsion between 3 particles
RULES = {**{rule: ["--guidance", rule] for rule in GUIDANCES}, "rsd": ["--particles", "3", "--repulsion", "100"]}


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("prior", ["toy-unet-mv", "sd"])
def test_every_rule_runs_and_exports(prior, rule, representation, tiny_sd, monkeypatch, capsys, tmp_path,
                                    rule_mechanism):
    model = ["--model", tiny_sd] if prior == "sd" else []
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", *RULES[rule], "--prior", prior, *model,
                      "--representation", representation, check_export=rule != "rsd")
    if rule == "rsd":
        assert all((run_dir / "export" / f"p{i}" / "model.glb").is_file() for i in range(3))
    rule_mechanism(rule, run_dir)


def test_vsd_particles_share_one_lora(monkeypatch, capsys, tmp_path, rule_mechanism):
    run_dir = run_cli(monkeypatch, capsys, tmp_path / "runs", "--guidance", "vsd", "--prior", "toy-unet-mv",
                      "--particles", "2", check_export=False)
    assert (run_dir / "export" / "p1" / "model.glb").is_file()
    rule_mechanism("vsd", run_dir)
