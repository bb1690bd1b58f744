"""Scalar schedules: any hyperparameter may change with the optimisation step.

A schedule is written as data (in YAML or on the command line):
- a number: constant;
- ``[start_step, v0, v1, end_step]``: v0 until start_step, linear to v1 at end_step, then v1
  (threestudio's form; ``[5000, 0.98, 0.5, 5001]`` is a step change at 5000);
- ``[v0, v1, end_step]``: the same with start_step = 0;
- ``[[step, value], [step, value], ...]``: piecewise linear through the points, constant outside.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import AfterValidator

Schedule = Union[float, list[float], list[list[float]]]


def check_schedule(value: Schedule) -> Schedule:
    """Validates the form of a schedule; raises ValueError naming what is wrong."""
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"a schedule is a number or a non-empty list, got {value!r}")
    if all(isinstance(v, list) for v in value):
        steps = [p[0] for p in value]
        if any(len(p) != 2 for p in value) or steps != sorted(steps):
            raise ValueError(f"a piecewise schedule is [[step, value], ...] with increasing steps, got {value!r}")
        return value
    if len(value) == 3:
        return value
    if len(value) == 4 and value[0] <= value[3]:
        return value
    raise ValueError(f"a schedule is [start_step, v0, v1, end_step] or [v0, v1, end_step], got {value!r}")


# The type of a schedule field in a typed config: validated when the config is built.
CheckedSchedule = Annotated[Schedule, AfterValidator(check_schedule)]


def evaluate(value: Schedule, step: int) -> float:
    """The value of a schedule at ``step``."""
    if isinstance(value, (int, float)):
        return float(value)
    if all(isinstance(v, list) for v in value):
        points = value
    elif len(value) == 3:
        points = [[0, value[0]], [value[2], value[1]]]
    else:
        points = [[value[0], value[1]], [value[3], value[2]]]
    if step <= points[0][0]:
        return float(points[0][1])
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if step < s1:
            return float(v0 + (v1 - v0) * (step - s0) / (s1 - s0))
    return float(points[-1][1])
