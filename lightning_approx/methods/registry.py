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

    The short form of the example scripts (``"relu_mask+crs:sample_ratio=0.5"``, read by
    :func:`parse_spec`) is not accepted: its error spells out the list / mapping to write
    instead (``['relu_mask', {'name': 'crs', 'sample_ratio': 0.5}]``), so that a string is
    always exactly one method name.

    Raises:
        ConfigError: Unknown name (with the long form when it is the short one), a
            ``class_path`` that is not a registered method class, ``init_args`` that are not a
            mapping, unknown or invalid hyperparameter, or hyperparameters given next to a
            ready-made method object.
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
            init_args = _plain(spec.pop("init_args", None)) or {}
            if not isinstance(init_args, Mapping):
                raise ConfigError(f"{field}.init_args", init_args, "must be a mapping",
                                  "give the method's settings by name, e.g. {sample_ratio: 0.5}")
            kwargs = {**init_args, **hyperparameters}
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
        if cls is None and ("+" in spec or ":" in spec):
            # Not parsed here: one string would then mean a list in some places and a name in others.
            raise ConfigError(field, spec, "is the short form of the example scripts' --method ('+' joins "
                              "methods, ':' starts settings), not a method name", f"write it as {_long_form(spec)}")
        if cls is None:
            raise ConfigError(field, spec, "unknown method", f"use one of {sorted(METHODS)}")
        return _construct(cls, hyperparameters, field)
    raise ConfigError(field, spec, "must be a method name, a Method object or a mapping",
                      f"give e.g. 'crs' (methods: {sorted(METHODS)})")


def _long_form(text: str) -> str:
    """How to write a short spec (``"relu_mask+crs:sample_ratio=0.5"``) where a method is
    expected: one name or mapping per method, in a list when there are several."""
    try:
        configs = parse_spec(text)
    except ConfigError:
        return ("a list of methods, e.g. ['relu_mask', 'crs'], each a name or a mapping with its settings, "
                "e.g. {'name': 'crs', 'sample_ratio': 0.5}")
    forms = [cfg["name"] if len(cfg) == 1 else cfg for cfg in configs]
    return repr(forms if len(forms) > 1 else forms[0])


def _class_from_path(path: Any, field: str) -> type[Method]:
    registered = sorted(c.__name__ for c in METHODS.values())
    if not isinstance(path, str):
        raise ConfigError(f"{field}.class_path", path, "must be a class name or import path",
                          f"give e.g. lightning_approx.methods.CRS (classes: {registered})")
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
    # Only registered classes: the base class Method (or an unregistered subclass) has no
    # stages of its own and would build a method that silently does nothing.
    if not (isinstance(cls, type) and issubclass(cls, Method) and METHODS.get(getattr(cls, "name", None)) is cls):
        raise ConfigError(f"{field}.class_path", path, "is not a lightning_approx Method",
                          f"use one of {registered}, or add your subclass with "
                          "lightning_approx.methods.register")
    return cls


def _construct(cls: type[Method], kwargs: dict[str, Any], field: str) -> Method:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    known = {p for p in params if p != "self"}
    for key in kwargs:
        if key not in known:
            raise ConfigError(f"{cls.name}.{key}", kwargs[key], f"method {cls.name!r} has no such setting",
                              f"use one of {sorted(known)}" if known else f"{cls.name!r} takes no settings; "
                              "drop them")
    return cls(**kwargs)


def parse_spec(text: str) -> list[dict[str, Any]]:
    """Reads the short command-line form of one or more methods.

    ``"crs:sample_ratio=0.25"`` -> ``[{"name": "crs", "sample_ratio": 0.25}]``;
    methods that compose are joined by ``+``: ``"relu_mask+crs:sample_ratio=0.5"``.
    Values are numbers where they parse as numbers, ``true`` / ``false`` (any case) booleans,
    else strings.
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
            if value.strip().lower() in ("true", "false"):
                cfg[key.strip()] = value.strip().lower() == "true"
                continue
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
