"""dream3d: text to 3D by score distillation. ``dream3d.generate(prompt, **options)`` makes one asset."""

from typing import Any


def __getattr__(name: str) -> Any:
    # lazy: `import dream3d.rundir.atomic` (or the CLI's --help) should not pay for importing torch
    if name == "generate":
        from dream3d import api

        return api.generate
    if name == "Result":
        from dream3d.rundir.result import Result

        return Result
    raise AttributeError(f"module 'dream3d' has no attribute {name!r}")
