"""Schedules: hyperparameter values as pure functions of training progress.

A schedule maps :class:`Progress` (fractional epoch and global step) to a float, and nothing
else, so a resumed fit needs only the counters Lightning already restores. Every schedule is
a small class with plain typed arguments, so it can be written in Python, in omegaconf YAML
(``{"type": "cosine", ...}``) or as a LightningCLI ``class_path`` / ``init_args`` mapping.

- :class:`Constant`: one value;
- :class:`Linear`, :class:`Cosine`, :class:`Cubic`: from ``start`` (before ``begin``) to
  ``end`` (after ``until``); :class:`Cubic` is the gradual-pruning curve of Zhu & Gupta
  (2017), fast at first and flat at the end;
- :class:`Step`: piecewise constant, ``values[i]`` from ``milestones[i-1]`` on;
- :class:`Piecewise`: linear interpolation through ``(time, value)`` points.

Example::

    from lightning_approx.schedules import Cosine, Progress, as_schedule

    ratio = Cosine(start=1.0, end=0.25, begin=0, until=10)
    ratio(Progress(epoch=5.0, step=500))            # 0.625
    as_schedule({"type": "cosine", "start": 1.0, "end": 0.25, "begin": 0, "until": 10},
                field="sample_ratio") == ratio      # True
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_approx.errors import ConfigError

UNITS = ("epoch", "step")


@dataclass(frozen=True)
class Progress:
    """Where training is.

    Attributes:
        epoch: Fractional epoch (2.5 = halfway through the third epoch).
        step: Global optimizer step.
    """

    epoch: float
    step: int


# --- argument checks ----------------------------------------------------------------------
def _number(field: str, value: Any) -> float:
    # bool is an int subclass, but ``True`` in a config is a typo, not the number 1
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(field, value, "must be a finite number", "give a float such as 0.5")
    return float(value)


def _unit(unit: Any) -> str:
    if not isinstance(unit, str) or unit not in UNITS:
        raise ConfigError("unit", unit, "unknown unit", f"use one of {list(UNITS)}")
    return unit


def _plain(value: Any) -> Any:
    """omegaconf containers -> plain Python, so every check below sees dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _sequence(field: str, value: Any) -> list[Any]:
    value = _plain(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(field, value, "must be a list", f"give a list for {field}")
    return list(value)


# --- schedules ----------------------------------------------------------------------------
class Schedule(ABC):
    """Base class: a value as a function of :class:`Progress`.

    Subclasses set ``type_name`` (the name in YAML) and implement :meth:`at` (the value at
    time ``t`` in their unit), :meth:`key_values` (the values at which the extremes occur)
    and :meth:`_args` (their constructor arguments, except ``unit``).

    Attributes:
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    type_name: ClassVar[str]
    unit: str = "epoch"

    def __call__(self, progress: Progress) -> float:
        """The value at ``progress`` (its ``epoch`` or its ``step``, after :attr:`unit`)."""
        return self.at(float(progress.step) if self.unit == "step" else float(progress.epoch))

    @abstractmethod
    def at(self, t: float) -> float:
        """The value at time ``t``, in epochs or steps after :attr:`unit`."""

    @abstractmethod
    def key_values(self) -> list[float]:
        """Values at the key points; the schedule is monotone between them."""

    @abstractmethod
    def _args(self) -> dict[str, Any]:
        """Constructor arguments except ``unit``, as plain Python values."""

    def value_range(self) -> tuple[float, float]:
        """Exact minimum and maximum over all times.

        Every schedule is monotone between its key points, so the extremes are among the
        values there; no sampling needed.
        """
        values = self.key_values()
        return min(values), max(values)

    def to_config(self) -> dict[str, Any]:
        """A plain mapping that :func:`as_schedule` turns back into an equal schedule.

        Example: ``{"type": "linear", "start": 1.0, "end": 0.5, "begin": 0.0, "until": 10.0,
        "unit": "epoch"}``.
        """
        return {"type": self.type_name, **self._args(), "unit": self.unit}

    @classmethod
    def from_config(cls, cfg: Any, *, field: str = "schedule") -> Schedule:
        """Builds a schedule from anything :func:`as_schedule` accepts.

        On a subclass (``Cosine.from_config({...})``) the ``type`` key may be left out, and
        a config of another type is an error.

        Args:
            cfg: A number, a schedule, or a mapping (plain or omegaconf).
            field: Name of the setting, for error messages.

        Raises:
            ConfigError: The config is not a valid schedule (of this class).
        """
        cfg = _plain(cfg)
        untyped = isinstance(cfg, Mapping) and "type" not in cfg and "class_path" not in cfg
        if untyped and not inspect.isabstract(cls):
            return _construct(cls, dict(cfg), field)
        schedule = as_schedule(cfg, field=field)
        if not isinstance(schedule, cls):
            raise ConfigError(field, cfg, f"is a {type(schedule).__name__}, not a {cls.__name__}",
                              f"give a {cls.__name__} config or use Schedule.from_config")
        return schedule

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()

    def __hash__(self) -> int:
        # equal schedules have equal configs, hence equal reprs
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        unit = "" if self.unit == "epoch" else f", unit={self.unit!r}"
        return f"{type(self).__name__}({args}{unit})"


class Constant(Schedule):
    """The same value throughout.

    Args:
        value: The value.
        unit: Makes no difference; taken so every schedule has it.
    """

    type_name = "constant"

    def __init__(self, value: float, unit: str = "epoch") -> None:
        self.value = _number("value", value)
        self.unit = _unit(unit)

    def at(self, t: float) -> float:
        return self.value

    def key_values(self) -> list[float]:
        return [self.value]

    def _args(self) -> dict[str, Any]:
        return {"value": self.value}


class _Ramp(Schedule):
    """``start`` until ``begin``, ``end`` from ``until`` on, a monotone curve in between.

    Args:
        start: Value up to ``begin``.
        end: Value from ``until`` on.
        begin: Time the ramp starts (epochs or steps, see ``unit``).
        until: Time the ramp ends; must be after ``begin``.
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    def __init__(self, start: float, end: float, begin: float = 0.0, until: float = 1.0,
                 unit: str = "epoch") -> None:
        self.start = _number("start", start)
        self.end = _number("end", end)
        self.begin = _number("begin", begin)
        self.until = _number("until", until)
        self.unit = _unit(unit)
        if self.until <= self.begin:
            raise ConfigError("until", until, f"a schedule that ends before it starts (begin={begin})",
                              f"give until > begin, e.g. until={self.begin + 10:g}")

    def at(self, t: float) -> float:
        if t <= self.begin:
            return self.start
        if t >= self.until:
            return self.end
        return self.curve((t - self.begin) / (self.until - self.begin))

    @abstractmethod
    def curve(self, fraction: float) -> float:
        """The value when ``fraction`` (in (0, 1)) of the window has passed; monotone."""

    def key_values(self) -> list[float]:
        return [self.start, self.end]

    def _args(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "begin": self.begin, "until": self.until}


class Linear(_Ramp):
    """Linear from ``start`` at ``begin`` to ``end`` at ``until``.

    Args:
        start: Value up to ``begin``.
        end: Value from ``until`` on.
        begin: Time the ramp starts (epochs or steps, see ``unit``).
        until: Time the ramp ends; must be after ``begin``.
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    type_name = "linear"

    def curve(self, fraction: float) -> float:
        return self.start + (self.end - self.start) * fraction


class Cosine(_Ramp):
    """Half a cosine from ``start`` at ``begin`` to ``end`` at ``until``; slow at both ends,
    passing the mean of ``start`` and ``end`` halfway.

    Args:
        start: Value up to ``begin``.
        end: Value from ``until`` on.
        begin: Time the ramp starts (epochs or steps, see ``unit``).
        until: Time the ramp ends; must be after ``begin``.
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    type_name = "cosine"

    def curve(self, fraction: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


class Cubic(_Ramp):
    """Gradual-pruning curve (Zhu & Gupta, 2017): ``end + (start - end) * (1 - f)**3`` with
    ``f`` the fraction of the window passed; moves fast first, then settles.

    Args:
        start: Value up to ``begin`` (e.g. initial sparsity 0.0).
        end: Value from ``until`` on (e.g. final sparsity 0.9).
        begin: Time the ramp starts (epochs or steps, see ``unit``).
        until: Time the ramp ends; must be after ``begin``.
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    type_name = "cubic"

    def curve(self, fraction: float) -> float:
        return self.end + (self.start - self.end) * (1.0 - fraction) ** 3


class Step(Schedule):
    """Piecewise constant: ``values[0]`` before ``milestones[0]``, ``values[i]`` on
    ``[milestones[i-1], milestones[i])``, ``values[-1]`` from ``milestones[-1]`` on.

    Args:
        values: One more value than milestones.
        milestones: Strictly increasing times (epochs or steps, see ``unit``).
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    type_name = "step"

    def __init__(self, values: list[float], milestones: list[float], unit: str = "epoch") -> None:
        self.values = [_number(f"values[{i}]", v) for i, v in enumerate(_sequence("values", values))]
        self.milestones = [_number(f"milestones[{i}]", m)
                           for i, m in enumerate(_sequence("milestones", milestones))]
        self.unit = _unit(unit)
        if len(self.values) != len(self.milestones) + 1:
            raise ConfigError("values", self.values,
                              f"needs one more entry than milestones ({len(self.milestones)} given)",
                              f"give {len(self.milestones) + 1} values, or drop milestones")
        for i in range(1, len(self.milestones)):
            if self.milestones[i] <= self.milestones[i - 1]:
                raise ConfigError(f"milestones[{i}]", self.milestones[i], "milestones must strictly increase",
                                  "sort the milestones and remove duplicates")

    def at(self, t: float) -> float:
        # a milestone belongs to the interval it opens
        index = sum(1 for m in self.milestones if t >= m)
        return self.values[index]

    def key_values(self) -> list[float]:
        return list(self.values)

    def _args(self) -> dict[str, Any]:
        return {"values": list(self.values), "milestones": list(self.milestones)}


class Piecewise(Schedule):
    """Linear interpolation through ``(time, value)`` points, constant outside them.

    Args:
        points: At least one ``[time, value]`` pair (tuples or lists), times strictly
            increasing.
        unit: ``"epoch"`` (fractional epochs) or ``"step"`` (global optimizer steps).
    """

    type_name = "piecewise"

    def __init__(self, points: list[tuple[float, float]], unit: str = "epoch") -> None:
        pts = _sequence("points", points)
        if not pts:
            raise ConfigError("points", points, "needs at least one point", "give e.g. [[0, 1.0], [10, 0.5]]")
        self.points: list[tuple[float, float]] = []
        for i, point in enumerate(pts):
            pair = _sequence(f"points[{i}]", point)
            if len(pair) != 2:
                raise ConfigError(f"points[{i}]", point, "must be a [time, value] pair", "give two numbers")
            self.points.append((_number(f"points[{i}]", pair[0]), _number(f"points[{i}]", pair[1])))
        for i in range(1, len(self.points)):
            if self.points[i][0] <= self.points[i - 1][0]:
                raise ConfigError(f"points[{i}]", list(self.points[i]), "times must strictly increase",
                                  "sort the points by time and remove duplicate times")
        self.unit = _unit(unit)

    def at(self, t: float) -> float:
        if t <= self.points[0][0]:
            return self.points[0][1]
        for (t0, v0), (t1, v1) in zip(self.points, self.points[1:], strict=False):
            if t <= t1:
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return self.points[-1][1]

    def key_values(self) -> list[float]:
        return [v for _, v in self.points]

    def _args(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points]}


SCHEDULES: dict[str, type[Schedule]] = {
    cls.type_name: cls for cls in (Constant, Linear, Cosine, Step, Cubic, Piecewise)
}


# --- building from configs ------------------------------------------------------------------
def as_schedule(value: Any, *, field: str) -> Schedule:
    """Turns a number, a schedule, or a mapping into a :class:`Schedule`.

    Args:
        value: ``0.5`` (a :class:`Constant`); a :class:`Schedule`; ``{"type": "cosine",
            "start": 1.0, ...}``; or ``{"class_path": "lightning_approx.schedules.Cosine",
            "init_args": {...}}`` (``class_path`` may be the bare class name). Mappings may
            be omegaconf ``DictConfig``.
        field: Name of the setting, for error messages (``"crs.sample_ratio"``).

    Returns:
        The schedule (``value`` itself when it already is one).

    Raises:
        ConfigError: Unknown type, missing or unknown keys, or bad values; the message
            names ``field`` and the key.
    """
    value = _plain(value)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Constant(_number(field, value))
    if not isinstance(value, Mapping):
        raise ConfigError(field, value, "must be a number or a schedule",
                          f"give a float or a mapping with 'type' (one of {sorted(SCHEDULES)})")
    spec = dict(value)
    if "class_path" in spec:
        cls = _class_from_path(field, spec.pop("class_path"))
        kwargs = _plain(spec.pop("init_args", None)) or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{field}.init_args", kwargs, "must be a mapping",
                              "give the constructor arguments by name, e.g. {start: 1.0, end: 0.5}")
        if spec:
            raise ConfigError(field, sorted(map(str, spec)), "unexpected keys next to class_path",
                              "put them under init_args")
        kwargs = dict(kwargs)
    else:
        kind = spec.pop("type", None)
        # ``in SCHEDULES`` on an unhashable value (a list) would raise TypeError, not ConfigError
        if not isinstance(kind, str) or kind.lower() not in SCHEDULES:
            raise ConfigError(f"{field}.type", kind, "unknown schedule type",
                              f"use one of {sorted(SCHEDULES)}")
        cls, kwargs = SCHEDULES[kind.lower()], spec
    return _construct(cls, kwargs, field)


def _class_from_path(field: str, path: Any) -> type[Schedule]:
    by_name = {cls.__name__: cls for cls in SCHEDULES.values()}
    if isinstance(path, str) and path in by_name:
        return by_name[path]
    if isinstance(path, str) and "." in path:
        module, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        # abstract bases (Schedule, _Ramp) cannot be built; say so here rather than with a TypeError
        if isinstance(cls, type) and issubclass(cls, Schedule) and not inspect.isabstract(cls):
            return cls
    raise ConfigError(f"{field}.class_path", path, "is not a schedule class",
                      f"use lightning_approx.schedules.<one of {sorted(by_name)}>")


def _construct(cls: type[Schedule], kwargs: dict[str, Any], field: str) -> Schedule:
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    for key in kwargs:
        if key not in params:
            raise ConfigError(f"{field}.{key}", kwargs[key], f"{cls.__name__} has no such argument",
                              f"use only {list(params)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"{field}.{missing[0]}", None, f"{cls.__name__} needs it", f"give {missing}")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # name the setting the schedule belongs to
        raise ConfigError(f"{field}.{err.field}", err.value, err.problem, err.fix) from None


def check_range(schedule: Schedule, *, field: str, low: float, high: float, low_open: bool, high_open: bool,
                fix: str) -> None:
    """Raises :class:`ConfigError` if the schedule ever leaves an interval.

    Args:
        schedule: The schedule to check (over all times, via :meth:`Schedule.value_range`).
        field: Name of the setting, for the message.
        low: Lower end of the interval.
        high: Upper end of the interval.
        low_open: Whether ``low`` itself is excluded.
        high_open: Whether ``high`` itself is excluded.
        fix: What the user should do instead, for the message.

    Raises:
        ConfigError: Some value of the schedule lies outside the interval.
    """
    lo, hi = schedule.value_range()
    too_low = lo <= low if low_open else lo < low
    too_high = hi >= high if high_open else hi > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        # a plain float is what the user wrote; show it, not Constant(value=...)
        shown = schedule.value if isinstance(schedule, Constant) else schedule
        raise ConfigError(field, shown, f"must stay in {interval} (takes values from {lo} to {hi})", fix)
