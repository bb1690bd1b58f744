"""A batch file read into jobs: one prompt a line (``#`` comments), or JSONL with per-job settings.

    a red cube                                  prompts.txt
    {"prompt": "a red cube", "seed": 3}          prompts.jsonl: any RunConfig field, nested or
    {"prompt": "a cone", "sds.weighting": "uniform"}          dotted, overrides the batch defaults
    {"prompt": "a red cube", "recipe": "magic3d"}             a recipe (``dream3d recipes``): its stages

Each line becomes a ``dream3d.rundir.job.Job`` (settings: the config layer of its line, prompt included).
A job's id is its prompt's slug and a hash of its line's content, so re-running the same
file (even reordered or extended) finds each job's record in the manifest again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dream3d.batch import BatchError
from dream3d.config import MAX_NESTING, ConfigError, check_nesting, merge
from dream3d.rundir.job import Job
from dream3d.rundir.folder import slugify


class BatchFileError(BatchError):
    """The batch file cannot be read; the message is one line naming the file and line."""


def read_jobs(path: Path) -> list[Job]:
    """Jobs in file order; a ``.jsonl`` file is JSONL, anything else one prompt a line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchFileError(f"cannot read batch file {path}: {getattr(e, 'strerror', None) or e}") from None
    parse = _jsonl_settings if Path(path).suffix == ".jsonl" else _text_settings
    numbered = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            numbered.append((number, parse(line, f"{path}:{number}")))
    if not numbered:
        raise BatchFileError(f"batch file {path} has no prompts")
    return _with_ids(numbered)


def _text_settings(line: str, where: str) -> dict[str, Any]:
    return {"prompt": line}


def _jsonl_settings(line: str, where: str) -> dict[str, Any]:
    """A JSONL line -> its config layer; dotted keys ("sds.weighting") become nested."""
    try:
        data = check_nesting(json.loads(line), where)
    except json.JSONDecodeError as e:
        raise BatchFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # json's decoder recurses once per level: 100,000 brackets exhaust the stack
        raise BatchFileError(f"{where} is nested more than {MAX_NESTING} levels deep") from None
    except ConfigError as e:
        raise BatchFileError(str(e)) from None
    if not isinstance(data, dict):
        raise BatchFileError(f"{where}: a line must be a JSON object with a \"prompt\"")
    if not isinstance(data.get("prompt"), str):
        raise BatchFileError(f"{where}: the object has no \"prompt\" string")
    if "recipe" in data and not isinstance(data["recipe"], str):
        raise BatchFileError(f"{where}: \"recipe\" must be a recipe's name (`dream3d recipes`)")
    settings: dict[str, Any] = {}
    for key, value in data.items():
        settings = merge(settings, _nest(key, value))
    return settings


def _nest(key: str, value: Any) -> dict[str, Any]:
    """"sds.weighting", "uniform" -> {"sds": {"weighting": "uniform"}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _with_ids(numbered: list[tuple[int, dict[str, Any]]]) -> list[Job]:
    jobs, seen = [], {}
    for number, settings in numbered:
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        base = f"{slugify(str(settings['prompt']))}-{digest}"
        seen[base] = seen.get(base, 0) + 1
        job_id = base if seen[base] == 1 else f"{base}-{seen[base]}"  # the same line twice: two jobs
        jobs.append(Job(job_id, str(settings["prompt"]), settings, line=number))
    return jobs
