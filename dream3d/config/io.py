"""Config text in and out: YAML files and ``key=value`` overrides as nested dicts, their merge, the nesting bound,
and the one-line ``ConfigError`` every config mistake becomes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from dream3d.errors import UserError

if TYPE_CHECKING:
    from dream3d.config.schema import RunConfig

# no config nests deeper than a few levels; PyYAML and json build nested values by recursion, which a
# 20,000-deep list turns into a RecursionError
MAX_NESTING = 100
# an override's list index (``stages[1].steps=200``) is bounded: it makes the list that long
MAX_INDEX = 63
INDEXED = re.compile(r"(\w+)\[(\d+)\]")


class ConfigError(UserError, ValueError):
    """A configuration the user gave cannot be used; the message is one line."""


def one_line(error: ValidationError) -> str:
    """The first error of a pydantic validation as ``where: what``."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" if where else message


def check_options(model: type[BaseModel], **values: Any) -> Any:
    """``model`` validated from command-line values; raises ConfigError in one line."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["sds.weighting=uniform", "steps=300", "stages[1].steps=200"]`` -> nested dict; values are parsed as YAML.

    ``name[i]`` steps into entry i of a list of mappings: the override is a list whose other entries are empty
    mappings, which ``merge`` lays over the list below it entry by entry."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = _child(node, part, item)
        try:
            node[leaf] = safe_yaml(raw, f"override {key!r}")
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value does not parse") from None
    return tree


def _child(node: dict[str, Any], part: str, item: str) -> dict[str, Any]:
    """The mapping an override's ``part`` (``name`` or ``name[i]``) names under ``node``, made if missing."""
    indexed = INDEXED.fullmatch(part)
    if indexed is None:
        child = node.setdefault(part, {})
    else:
        name, index = indexed[1], int(indexed[2])
        if index > MAX_INDEX:
            raise ConfigError(f"override {item!r}: index {index} is above {MAX_INDEX}")
        entries = node.setdefault(name, [])
        if not isinstance(entries, list):
            raise ConfigError(f"override {item!r} indexes a key that is not a list")
        entries.extend({} for _ in range(index + 1 - len(entries)))
        child = entries[index]
    if not isinstance(child, dict):
        raise ConfigError(f"override {item!r} sets a key below a value")
    return child


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (update wins). A list of mappings laid over a list of mappings merges entry by entry
    (a recipe's stages under a config's, ``stages[1].steps=200``); entries beyond the base's are added."""
    out = dict(base)
    for key, value in update.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = merge(below, value)
        elif _mappings(value) and _mappings(below):
            out[key] = [merge(b, u) for b, u in zip(below, value)] + below[len(value):] + value[len(below):]
        else:
            out[key] = value
    return out


def _mappings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, refused in one ConfigError (naming ``what``) when it nests deeper than MAX_NESTING.

    The depth is counted on PyYAML's event stream, which its parser makes without recursion."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise ConfigError(f"{what} is nested more than {MAX_NESTING} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return yaml.safe_load(text)


def check_nesting(value: Any, what: str) -> Any:
    """``value`` (from json.loads) as it is, or one ConfigError when it nests deeper than MAX_NESTING."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > MAX_NESTING:
            raise ConfigError(f"{what} is nested more than {MAX_NESTING} levels deep")
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = safe_yaml(Path(path).read_text(encoding="utf-8"), f"config {path}")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path} does not parse as YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return data


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
