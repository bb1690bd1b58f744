"""The plug-in points are honest: the app never names a rule, prior or representation outside the registry and the
presets, so adding one is its module plus a registry line (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

from dream3d import registry
from tests.support import REPO

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
