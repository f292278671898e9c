"""The one registry of methods: name -> class, and building a method from a name, a Python
object, or a YAML/omegaconf mapping."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from lightning_approx.errors import ConfigError
from lightning_approx.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}: {METHODS[cls.name]} and {cls}")
    METHODS[cls.name] = cls
    return cls


def _plain(value: Any) -> Any:
    """omegaconf containers -> plain Python, anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_method(spec: str | Method | Mapping[str, Any], field: str = "method", **hyperparameters: Any) -> Method:
    """Turns a name, a method object, or a mapping into a :class:`Method`.

    Args:
        spec: ``"crs"``; a :class:`Method`; ``{"name": "crs", "sample_ratio": 0.25}``; or a
            LightningCLI mapping ``{"class_path": "lightning_approx.methods.CRS", "init_args": {...}}``.
        field: Name of the setting, for error messages.
        **hyperparameters: With a name: the method's arguments (``sample_ratio=0.5``).

    Raises:
        ConfigError: Unknown name, unknown or invalid hyperparameter, or hyperparameters
            given next to a ready-made method object.
    """
    spec = _plain(spec)
    if isinstance(spec, Method):
        if hyperparameters:
            raise ConfigError(field, spec, f"settings {sorted(hyperparameters)} were given next to a method object",
                              "set them on the method object itself, e.g. CRS(sample_ratio=0.25)")
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "class_path" in spec:
            cls = _class_from_path(spec.pop("class_path"), field)
            kwargs = {**dict(spec.pop("init_args", None) or {}), **hyperparameters}
            if spec:
                raise ConfigError(field, sorted(spec), "unexpected keys next to class_path",
                                  "put the method's settings under init_args")
            return _construct(cls, kwargs, field)
        if "name" not in spec:
            raise ConfigError(field, spec, "a method mapping needs a 'name'",
                              f"add name: one of {sorted(METHODS)}")
        name = spec.pop("name")
        return build_method(name, field, **{**spec, **hyperparameters})
    if isinstance(spec, str):
        cls = METHODS.get(spec.lower())
        if cls is None:
            raise ConfigError(field, spec, "unknown method", f"use one of {sorted(METHODS)}")
        return _construct(cls, hyperparameters, field)
    raise ConfigError(field, spec, "must be a method name, a Method object or a mapping",
                      f"give e.g. 'crs' (methods: {sorted(METHODS)})")


def _class_from_path(path: str, field: str) -> type[Method]:
    if "." not in path:
        for cls in METHODS.values():
            if cls.__name__ == path:
                return cls
        raise ConfigError(f"{field}.class_path", path, "unknown method class",
                          f"use one of {sorted(c.__name__ for c in METHODS.values())}")
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{field}.class_path", path, f"cannot be imported ({err})",
                          "give the full import path, e.g. lightning_approx.methods.CRS") from err
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"{field}.class_path", path, "is not a lightning_approx Method",
                          f"use one of {sorted(c.__name__ for c in METHODS.values())}")
    return cls


def _construct(cls: type[Method], kwargs: dict[str, Any], field: str) -> Method:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    known = {p for p in params if p != "self"}
    for key in kwargs:
        if key not in known:
            raise ConfigError(f"{cls.name}.{key}", kwargs[key], f"method {cls.name!r} has no such setting",
                              f"use one of {sorted(known)}")
    return cls(**kwargs)


def parse_spec(text: str) -> list[dict[str, Any]]:
    """Reads the short command-line form of one or more methods.

    ``"crs:sample_ratio=0.25"`` -> ``[{"name": "crs", "sample_ratio": 0.25}]``;
    methods that compose are joined by ``+``: ``"relu_mask+crs:sample_ratio=0.5"``.
    Values are numbers where they parse as numbers, else strings.
    """
    configs = []
    for part in text.split("+"):
        name, _, rest = part.strip().partition(":")
        cfg: dict[str, Any] = {"name": name.strip()}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError("method", text, f"setting {item!r} has no value",
                                  "write settings as key=value, e.g. crs:sample_ratio=0.5")
            try:
                cfg[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
            except ValueError:
                cfg[key.strip()] = value.strip()
        configs.append(cfg)
    return configs


def spec_label(configs: list[dict[str, Any]]) -> str:
    """The inverse of :func:`parse_spec`, for table rows."""
    parts = []
    for cfg in configs:
        settings = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items() if k != "name")
        parts.append(cfg["name"] + (f":{settings}" if settings else ""))
    return "+".join(parts)
