"""The plug-in points are honest: the app never names a rule, prior or representation outside the registry and the
presets, so adding one is its module plus a registry line (docs/architecture.md)."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from dream3d import api, registry
from dream3d.config import build_config, schema
from dream3d.guidance.base import DistillationRule, TimestepConfig
from dream3d.guidance.diffusion import add_noise, alpha_bar, forward_noise, sample_timesteps
from dream3d.guidance.priors.base import Embeddings, Prior, ddpm_alphas_cumprod
from dream3d.registry import PriorSpec, RepresentationSpec, RuleSpec
from dream3d.representations.nerf import NeRF, NeRFConfig
from tests.support import REPO, TINY

NAMES = {*registry.RULES.names, *registry.PRIORS.names, *registry.REPRESENTATIONS.names}
# Where the app may name components: whole files, or only inside the named functions.
ALLOWED: dict[str, set[str] | None] = {
    "dream3d/registry.py": None,  # the registry: the names are its entries
    "dream3d/config/presets.py": None,  # the presets: every place the config names a component
    # the toy priors' own trainers and evaluation (they train and score those priors, and nothing else)
    "dream3d/toy/": None,
    # the commands for the toy priors: their defaults and the architectures they train
    "dream3d/cli.py": {"train_prior", "sample", "eval_prior"},
    # the benchmarks' recipes: fixed experiments whose figures docs/benchmarks.md quotes
    "dream3d/eval/bench.py": None,
    "dream3d/eval/bench_gpu.py": None,
    # the doctor reports each representation's backend on this machine (nerfacc's, gsplat's kernels)
    "dream3d/eval/doctor.py": {"representation_rows"},
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions (prose, not code)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def leaks(path: str, source: str) -> list[str]:
    """``path:line: name (in function)`` for every registered name ``source`` uses as code outside the allowed
    places. It counts a string constant equal to a name (a comparison, a default, a dict key or subscript: a
    section key named as a component is the registry's business too) and an attribute so named (``cfg.nerf``);
    docstrings, help text and messages that merely contain a name, and variables so named, do not count."""
    allowed = next((where for prefix, where in ALLOWED.items() if path.startswith(prefix)), set())
    if allowed is None:
        return []
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and function == "":
            function = node.name
        name = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings else node.attr if isinstance(node, ast.Attribute) else None)
        if name in NAMES and function not in allowed:
            found.append(f"{path}:{node.lineno}: {name!r}" + (f" (in {function})" if function else ""))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def app_sources() -> list[Path]:
    return sorted(p for folder in ("dream3d", "web") for p in (REPO / folder).rglob("*.py"))


def test_no_component_is_named_outside_its_module_the_registry_and_the_presets():
    found = [leak for p in app_sources() for leak in leaks(p.relative_to(REPO).as_posix(), p.read_text())]
    assert not found, "name a capability on the registry spec or a hook of the section instead:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    'if cfg.representation == "gaussians":\n    pass\n',
    'light = cfg.nerf.light\n',
    'defaults = {"vsd": {"lora_lr": 1e-3}}\n',
    'def pick(prior="toy-mv"):\n    return prior\n',
])
def test_the_scan_catches_a_name_in_the_run_loop(source):
    assert leaks("dream3d/run/loop.py", source)


@pytest.mark.parametrize("source", [
    '"""Runs sds on a nerf."""\n',
    'message = f"the {name} representation"\nhelp_text = "nerf | gaussians"\n',
    'nerf = build()\n',
])
def test_prose_and_variables_are_not_names(source):
    assert not leaks("dream3d/run/loop.py", source)


def test_the_allowed_places_are_allowed_only_where_listed():
    assert not leaks("dream3d/config/presets.py", 'x = "mvdream"\n')
    assert not leaks("dream3d/cli.py", 'def sample(prior="toy-unet-mv"):\n    pass\n')
    assert leaks("dream3d/cli.py", 'def run(representation="gaussians"):\n    pass\n')


# -- adding one of each: the few lines docs/architecture.md shows -------------------------------------------

class HalfSDSConfig(TimestepConfig):
    scale: float = 0.5


class HalfSDS(DistillationRule):
    """SDS without CFG, its gradient scaled: (eps_hat - eps) * scale."""

    def __init__(self, prior, cfg, context):
        super().__init__(prior, cfg)

    def gradient(self, x, embeddings, cameras, step, generator):
        t = sample_timesteps(self.cfg.min_step_percent, self.cfg.max_step_percent, self.prior.num_train_timesteps,
                             x.shape[0], step, generator)
        eps = forward_noise(x, generator)
        x_t = add_noise(x, eps, alpha_bar(self.prior, t, x.device))
        eps_hat = self.prior.predict_noise(x_t, t, embeddings.conditional(cameras), cameras)
        return (eps_hat - eps) * self.cfg.scale, {"t": t.float().mean()}


class GreyPrior(Prior):
    """The denoiser of a world whose every image is mid-grey (x0 = 0): eps = x_t / sqrt(1 - abar)."""

    name, resolution, num_train_timesteps, unet = "grey", 16, 1000, None

    def __init__(self):
        self.alphas_cumprod = ddpm_alphas_cumprod()

    @classmethod
    def from_config(cls, settings):
        return cls()

    def encode(self, rgb):
        return 2 * torch.nn.functional.interpolate(rgb, size=(16, 16), mode="bilinear") - 1

    def decode(self, x):
        return ((x + 1) / 2).clamp(0, 1)

    def embed(self, prompt):
        return Embeddings(prompt, torch.zeros(1), torch.zeros(1))

    def predict_noise(self, x_t, t, embeddings, cameras=None):
        return x_t / (1 - self.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)


class SmallNeRFConfig(NeRFConfig):
    grid_resolutions: list[int] = [8, 16]
    num_samples: int = 16


class SmallNeRF(NeRF):
    """A NeRF at toy size under its own name and defaults."""


THROWAWAY = [
    (registry.RULES, RuleSpec("half-sds", f"{__name__}:HalfSDSConfig", f"{__name__}:HalfSDS", "SDS, halved")),
    (registry.PRIORS, PriorSpec("grey", f"{__name__}:GreyPrior", "every image mid-grey", 1.0, closed_form=True)),
    (registry.REPRESENTATIONS, RepresentationSpec("small-nerf", f"{__name__}:SmallNeRFConfig", f"{__name__}:SmallNeRF",
                                                  "a NeRF at toy size")),
]


@pytest.fixture
def one_of_each(monkeypatch):
    for table, spec in THROWAWAY:
        table.add(spec)
    monkeypatch.setattr(schema, "RunConfig", schema.run_config_model())  # the new sections
    yield
    for table, spec in THROWAWAY:
        table.remove(spec.name)


@pytest.mark.parametrize("choice", [{"guidance": "half-sds"}, {"prior": "grey"}, {"representation": "small-nerf"}])
def test_a_registered_rule_prior_and_representation_each_run(one_of_each, choice, tmp_path):
    cfg = build_config({"prompt": "a red cube", "prior": "toy-mv", "out": str(tmp_path), **TINY,
                        "steps": 4, "checkpoint_every": 4, "preview_every": 4,
                        "export": {**TINY["export"], "formats": ["ply"], "video": False}, **choice})
    result = api.run(cfg)
    assert (cfg.guidance, cfg.prior, cfg.representation) == (
        choice.get("guidance", "sds"), choice.get("prior", "toy-mv"), choice.get("representation", "nerf"))
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(math.isfinite(s["loss"]) for s in steps)
