"""Alpha schedules: the steering strength as a function of the decoding step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Schedule = Callable[[int], float]
"""Maps a 0-based decoding step to an alpha."""

MAX_ABS_ALPHA = 100.0
"""The largest alpha a request or a context rule may give (either sign): larger ones overflow
nothing useful and can turn the scores into inf - inf = NaN."""


def check_alpha(value: Any, where: str = "alpha") -> float:
    """Return ``value`` as a finite float, or raise :class:`ConfigError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{where} must be a number, got {value!r} ({type(value).__name__})", param=where
        )
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}", param=where)
    return float(value)


def check_steps(value: Any, where: str = "steps") -> int:
    """A schedule's step count: an integer >= 1 (``3.0`` is 3; ``2.7`` and ``"3"`` are
    refused, not rounded)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be an integer >= 1, got {value!r}", param=where)
    return value


@dataclass(frozen=True)
class Constant:
    """The same alpha at every step."""

    alpha: float

    def __call__(self, step: int) -> float:
        return self.alpha


@dataclass(frozen=True)
class Linear:
    """Alpha moves linearly from ``start`` to ``end`` over ``steps`` steps, then stays at ``end``.

    ``Linear(0, 1, 20)`` is a warm-up; ``Linear(1, 0, 20)`` a decay.

    >>> Linear(0.0, 1.0, 4)(2)
    0.5
    """

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        check_alpha(self.start, "schedule start")
        check_alpha(self.end, "schedule end")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"schedule steps must be an integer >= 1, got {self.steps!r}")

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0), self.steps) / self.steps
        return self.start + (self.end - self.start) * frac


class Checked:
    """Wraps a user function of the step and checks that it returns a finite number."""

    def __init__(self, fn: Callable[[int], float], name: str = "alpha schedule") -> None:
        self.fn = fn
        self.name = name

    def __call__(self, step: int) -> float:
        return check_alpha(self.fn(step), f"{self.name} at step {step}")

    def __repr__(self) -> str:
        return f"Checked({self.fn!r})"


def alpha_range(schedule: Schedule) -> tuple[float, float] | None:
    """The lowest and highest alpha ``schedule`` takes over all steps; ``None`` for a user
    function (unknown until it runs).

    >>> alpha_range(Linear(1.0, 0.0, 8))
    (0.0, 1.0)
    """
    if isinstance(schedule, Constant):
        return (schedule.alpha, schedule.alpha)
    if isinstance(schedule, Linear):
        return (min(schedule.start, schedule.end), max(schedule.start, schedule.end))
    return None


def as_schedule(spec: float | int | Schedule | Mapping[str, Any], where: str = "alpha") -> Schedule:
    """Build a schedule from a number, a callable, or a recipe mapping.

    Mappings: ``{"schedule": "constant", "alpha": a}`` or
    ``{"schedule": "linear", "start": a, "end": b, "steps": n}``.
    """
    if isinstance(spec, (Constant, Linear, Checked)):
        return spec
    if isinstance(spec, Mapping):
        kind = spec.get("schedule", "constant")
        try:
            if kind == "constant":
                return Constant(check_alpha(spec["alpha"], where))
            if kind == "linear":
                return Linear(
                    check_alpha(spec["start"], f"{where}.start"),
                    check_alpha(spec["end"], f"{where}.end"),
                    check_steps(spec["steps"], f"{where}.steps"),
                )
        except KeyError as err:
            raise ConfigError(
                f"{where}: schedule {kind!r} needs the key {err.args[0]!r}", param=where
            ) from None
        raise ConfigError(
            f"{where}: unknown schedule {kind!r}; use 'constant' or 'linear'", param=where
        )
    if callable(spec):
        return Checked(spec, where)
    return Constant(check_alpha(spec, where))
