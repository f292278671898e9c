"""Errors raised for bad configuration and bad input.

Every message names the field, the value it got and how to fix it, so a user reading a
traceback from a YAML config knows which line to change.
"""

from __future__ import annotations

import numbers
from typing import Any


class ConfigError(ValueError):
    """A setting of this package has a value it cannot use.

    Args:
        field: Dotted name of the setting, as the user wrote it (``"sample_ratio"``,
            ``"schedule.end"``, ``"exclude[0]"``).
        value: The value that was given.
        problem: What is wrong with it.
        fix: What to do instead.
    """

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")


def check_fraction(field: str, value: float, *, low_open: bool = True, fix: str | None = None) -> float:
    """Checks that ``value`` lies in (0, 1] (or [0, 1] when ``low_open`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, value, "must be a number", fix or "give a float such as 0.5")
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(field, value, f"must lie in {interval}", fix or f"give a value in {interval}, e.g. 0.5")
    return float(value)


SEED_RANGE = (-(2**63), 2**63)  # torch.Generator takes [-2**63, 2**64); seeds derived as seed + 1 stay inside


def check_seed(field: str, value: Any) -> int:
    """Checks that ``value`` is a whole number usable as a random seed and returns it as an int.

    numpy integers pass (they are ``numbers.Integral``); ``bool`` does not, nor does a float,
    which would otherwise be truncated silently, nor a number outside ``[-2**63, 2**63)``: all
    of them would fail deep inside ``torch.Generator``, at the first use.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(field, value, "must be a whole number", "give e.g. 0")
    low, high = SEED_RANGE
    if not low <= value < high:
        raise ConfigError(field, value, "is outside the seeds torch.Generator takes, [-2**63, 2**63)",
                          "give a smaller whole number, e.g. 0")
    return int(value)
