"""Patch and restore: switch a model's Conv2d / Linear layers to their approximate classes
and back, in place."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_approx.errors import ConfigError, check_seed
from lightning_approx.layers import EXACT_CLASS, PATCHED_CLASS, LayerSite
from lightning_approx.methods import Method, Pipeline, build_method
from lightning_approx.ops.conv import ConvGeometry

AUTO = "auto"


def make_pipeline(method: str | Method | Mapping | Sequence | Pipeline, **hyperparameters: Any) -> Pipeline:
    """Builds the pipeline for one method or a list of methods that compose."""
    if isinstance(method, Pipeline):
        if hyperparameters:
            raise ConfigError("method", method, f"settings {sorted(hyperparameters)} were given next to a Pipeline",
                              "set them on the methods inside it")
        return method
    if (isinstance(method, Sequence) and not isinstance(method, str)) or _is_list_config(method):
        if hyperparameters:
            raise ConfigError("method", method, f"settings {sorted(hyperparameters)} are ambiguous with several "
                              "methods", "set them inside each method's entry")
        return Pipeline([build_method(m, field=f"method[{i}]") for i, m in enumerate(method)])
    return Pipeline([build_method(method, **hyperparameters)])


def _is_list_config(value: Any) -> bool:
    try:
        from omegaconf import ListConfig
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, ListConfig)


def auto_excluded(candidates: list[tuple[str, nn.Module]]) -> set[str]:
    """The layers kept exact by default: the stem conv (it sees the raw image, its input
    gradient is never needed and its weight gradient is cheap relative to its effect), and the
    final classifier (its few, large-fan-in weights turn sampling noise directly into logit
    noise)."""
    names: set[str] = set()
    convs = [(n, m) for n, m in candidates if isinstance(m, nn.Conv2d)]
    if convs and convs[0][1].in_channels <= 3:
        names.add(convs[0][0])
    linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
    if linears:
        names.add(linears[-1])
    return names


def check_exclude(exclude: Any) -> str | list[str] | None:
    """Checks an ``exclude`` setting before any model is seen (the callback calls it at
    construction, :func:`select_layers` at patching), so a bad type fails at its config line.

    Returns:
        ``None``, the pattern string, or the patterns as a list (any iterable is read once).

    Raises:
        ConfigError: ``exclude`` is neither ``None``, a string nor an iterable of strings.
    """
    if exclude is None or isinstance(exclude, str):
        return exclude
    # a mapping iterates over its keys, which would pass for patterns by accident
    if isinstance(exclude, (Mapping, bytes)) or not isinstance(exclude, Iterable):
        raise ConfigError("exclude", exclude, "must be 'auto', None, a layer name pattern or a list of them",
                          "give e.g. 'auto', None or ['auto', 'layer1.*']")
    patterns = list(exclude)
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ConfigError(f"exclude[{i}]", pattern, "must be a name pattern", "give a string such as 'layer1.*'")
    return patterns


def select_layers(model: nn.Module, exclude: str | Iterable[str] | None = AUTO) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs to patch: every plain ``nn.Conv2d`` / ``nn.Linear`` (or an
    already patched one) whose qualified name matches no ``exclude`` pattern.

    Args:
        model: The model.
        exclude: ``"auto"`` (see :func:`auto_excluded`), ``None`` / ``[]`` (nothing), or
            fnmatch patterns over qualified names (``"layer1.*"``); ``"auto"`` may be one of them.

    Raises:
        ConfigError: ``exclude`` is not a pattern or a list of them (:func:`check_exclude`), a
            pattern matches no layer, or nothing is left to patch.
    """
    candidates, foreign = [], []
    for name, module in model.named_modules():
        if type(module) in PATCHED_CLASS or type(module) in EXACT_CLASS:
            candidates.append((name, module))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            foreign.append(name)
    if foreign:
        warnings.warn(f"layers {foreign} subclass nn.Conv2d/nn.Linear with their own forward; they stay exact",
                      stacklevel=3)
    exclude = check_exclude(exclude)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    excluded: set[str] = set()
    for i, pattern in enumerate(patterns):
        if pattern == AUTO:
            excluded |= auto_excluded(candidates)
            continue
        hits = {n for n, _ in candidates if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(f"exclude[{i}]", pattern, "matches no Conv2d/Linear layer of the model",
                              f"use a pattern over these names: {[n for n, _ in candidates][:12]}")
        excluded |= hits
    chosen = [(n, m) for n, m in candidates if n not in excluded]
    if not chosen:
        raise ConfigError("exclude", exclude, "leaves no Conv2d/Linear layer to approximate",
                          "exclude fewer layers (the default 'auto' keeps only the stem conv and classifier exact)")
    return chosen


def approximate(model: nn.Module, method: str | Method | Mapping | Sequence | Pipeline = "crs", *,
                exclude: str | Iterable[str] | None = AUTO, seed: int = 0, **hyperparameters: Any) -> list[str]:
    """Switches the model's Conv2d / Linear layers to approximate backward passes, in place.

    The layers keep their ``Parameter`` objects, ``state_dict`` keys, device, dtype and
    ``isinstance`` checks, so optimizers, DDP and checkpoints are untouched. Evaluation
    (``model.eval()`` or ``torch.no_grad()``) is always exact. Calling it on a patched model
    replaces the method and the selection: it never wraps twice, and layers patched before
    but not selected now go back to exact.

    Args:
        model: The model to patch.
        method: A method name (``"crs"``), a :class:`~lightning_approx.methods.Method`, a
            mapping from YAML, or a list of methods that compose.
        exclude: Layers to keep exact (see :func:`select_layers`).
        seed: Seed of the layers' random streams (layer i uses its own stream).
        **hyperparameters: The method's settings when ``method`` is a name, e.g.
            ``sample_ratio=0.5``.

    Returns:
        The qualified names of the patched layers.

    Raises:
        ConfigError: A bad ``method``, ``exclude`` or ``seed``, or a method that cannot attach
            to this model (``batch_crs``'s ``output``). The model is then left as it was before
            the call, patched or not.

    Example:
        >>> names = approximate(model, "crs", sample_ratio=0.5)
        >>> restore(model)
    """
    pipeline = make_pipeline(method, **hyperparameters)
    seed = check_seed("seed", seed)  # before anything is patched
    layers = select_layers(model, exclude)
    sites = [LayerSite(name, index, pipeline, ConvGeometry.of(module) if isinstance(module, nn.Conv2d) else None, seed)
             for index, (name, module) in enumerate(layers)]
    previous = patched_sites(model)
    had_hooks = bool(model.__dict__.get(_HOOKS))
    _remove_hooks(model)
    try:
        # Before any layer changes class, so a method refusing this model leaves the layers as they were.
        model.__dict__[_HOOKS] = _attach(model, pipeline, sites)
    except BaseException:
        if had_hooks and previous:  # the previous method's own hooks, as before the call
            model.__dict__[_HOOKS] = _attach(model, previous[0].pipeline, previous)
        raise
    chosen = {id(module) for _, module in layers}
    for module in model.modules():
        if type(module) in EXACT_CLASS and id(module) not in chosen:  # patched before, not selected now
            _unpatch(module)
    for (_, module), site in zip(layers, sites, strict=True):
        module.__class__ = PATCHED_CLASS[EXACT_CLASS.get(type(module), type(module))]
        module.approx_site = site
    return [name for name, _ in layers]


def _attach(model: nn.Module, pipeline: Pipeline, sites: list[LayerSite]) -> list:
    """The handles of every method's own hooks; none are left behind if one method fails."""
    handles: list = []
    try:
        for method in pipeline.methods:
            handles += method.attach(model, sites)
    except BaseException:
        for handle in reversed(handles):
            handle.remove()
        raise
    return handles


def _unpatch(module: nn.Module) -> None:
    module.__class__ = EXACT_CLASS[type(module)]
    module.__dict__.pop("approx_site", None)


_HOOKS = "_approx_hooks"  # model attribute: the handles of the methods' own hooks (Method.attach)


def _remove_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS, []):
        handle.remove()


def restore(model: nn.Module) -> list[str]:
    """Puts the exact layer classes back, in place; returns the names restored.

    Safe on a model that was never patched (returns ``[]``).
    """
    _remove_hooks(model)
    restored = []
    for name, module in model.named_modules():
        if type(module) in EXACT_CLASS:
            _unpatch(module)
            restored.append(name)
    return restored


def patched_sites(model: nn.Module) -> list[LayerSite]:
    """The sites of the patched layers, in module order."""
    return [m.approx_site for m in model.modules() if type(m) in EXACT_CLASS]
