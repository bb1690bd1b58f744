"""The registries are the one table of names: the config, the builders, the CLI, the web form and the
benchmarks read them, and an unknown name fails loudly everywhere."""

import re

import pytest

from dream3d import registry
from dream3d.config import ConfigError, RunConfig, build_config


def test_every_rule_and_representation_has_its_config_section():
    for spec in (*registry.RULES, *registry.REPRESENTATIONS):
        section = RunConfig.model_fields[spec.name]
        assert section.annotation is registry.resolve(spec.config)
        assert isinstance(getattr(build_config({"prompt": "a cube"}), spec.name), section.annotation)


def test_every_reference_resolves():
    for spec in (*registry.RULES, *registry.PRIORS, *registry.REPRESENTATIONS):
        assert callable(registry.resolve(spec.builds))


@pytest.mark.parametrize("kind", ["prior", "guidance", "representation"])
def test_unknown_names_fail_in_one_line_listing_the_valid_ones(kind):
    table = {"prior": registry.PRIORS, "guidance": registry.RULES, "representation": registry.REPRESENTATIONS}[kind]
    valid = ", ".join(table.names) + (", auto (the default: picked for the prompt)" if kind == "prior" else "")
    with pytest.raises(ConfigError, match=f"^{kind}: unknown {kind} 'nope'; valid: {re.escape(valid)}$"):
        build_config({"prompt": "a cube", kind: "nope"})
    with pytest.raises(registry.UnknownName):
        table["nope"]


def test_capabilities_drive_the_refusals():
    unet_rules = [r.name for r in registry.RULES if r.needs_unet]
    closed = [p.name for p in registry.PRIORS if p.closed_form]
    assert unet_rules and closed
    with pytest.raises(ConfigError, match="closed-form"):
        build_config({"prompt": "a cube", "guidance": unet_rules[0], "prior": closed[0]})
    no_noise = [r.name for r in registry.RULES if not r.takes_noise]
    with pytest.raises(ConfigError, match="--noise consistent works with the guidance rules"):
        build_config({"prompt": "a cube", "guidance": no_noise[0], "noise": "consistent"})
    assert build_config({"prompt": "a cube", "guidance": "cfd"}).consistent_noise


def test_a_name_registers_once():
    rules = registry.Registry("guidance")
    spec = registry.RuleSpec("x", "dream3d.guidance.sds:SDSConfig", "dream3d.guidance.sds:SDSGuidance", "x")
    rules.add(spec)
    with pytest.raises(ValueError, match="registered twice"):
        rules.add(spec)


def test_unknown_weighting_is_an_error_not_fantasia3d():
    import torch

    from dream3d.guidance.diffusion import sds_weight

    with pytest.raises(ValueError, match="unknown weighting 'sdss'"):
        sds_weight(torch.tensor([0.5]), "sdss")
