"""Which implementation an op runs: the compiled CUDA kernels or the PyTorch reference.

The setting, one of :data:`BACKENDS`:

- ``"auto"`` (default): the kernels where they can run (CUDA tensors of a supported dtype,
  CuPy importable), the PyTorch reference everywhere else;
- ``"torch"``: always the PyTorch reference;
- ``"cuda"``: always the kernels; an op that cannot run them raises
  :class:`BackendUnavailableError` (never a silent fallback).

It is read from ``LIGHTNING_APPROX_BACKEND`` and changed with :func:`set_backend` or, for a
block of code, :func:`use_backend`. The setting is process-wide on purpose, not thread- or
context-local: autograd runs CUDA backwards on its own device threads, which would not see a
thread-local value set around ``loss.backward()``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.kernels import loader

__all__ = ["BACKENDS", "ENV_VAR", "SUPPORTED_DTYPES", "BackendUnavailableError", "get_backend", "kernel_blocker",
           "select", "set_backend", "use_backend"]

BACKENDS = ("auto", "torch", "cuda")
ENV_VAR = "LIGHTNING_APPROX_BACKEND"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_override: str | None = None  # set_backend / use_backend; None: the environment variable decides
_lock = threading.Lock()


class BackendUnavailableError(ConfigError):
    """The ``"cuda"`` backend was forced where the kernels cannot run."""


def _check(name: object, field: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ConfigError(field, name, "unknown backend", f"use one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def get_backend() -> str:
    """The backend in force: the last :func:`set_backend` / :func:`use_backend`, else
    ``$LIGHTNING_APPROX_BACKEND``, else ``"auto"``.

    Raises:
        ConfigError: The environment variable holds an unknown name.
    """
    if _override is not None:
        return _override
    value = os.environ.get(ENV_VAR)
    if value is None or value.strip() == "":
        return "auto"
    return _check(value, ENV_VAR)


def set_backend(name: str | None) -> None:
    """Sets the backend for the whole process; ``None`` returns to the environment variable.

    Raises:
        ConfigError: Unknown name.
    """
    global _override
    value = None if name is None else _check(name, "backend")
    with _lock:
        _override = value


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs a block with ``name`` as the backend, then restores the previous setting.

    Example::

        with use_backend("torch"):
            trainer.fit(model)  # reference implementations only
    """
    global _override
    value = _check(name, "backend")
    with _lock:
        previous = _override
        _override = value
    try:
        yield
    finally:
        with _lock:
            _override = previous


def kernel_blocker(tensors: tuple[Tensor, ...]) -> str | None:
    """Why the kernels cannot run on ``tensors`` (the first reason found), or ``None`` when they can."""
    for t in tensors:
        if not t.is_cuda:
            return f"got a tensor on {t.device}; the kernels run on CUDA tensors only"
    for t in tensors:
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            return f"got a {str(t.dtype).replace('torch.', '')} tensor; the kernels support {names}"
    if not loader.cupy_available():
        return f"CuPy does not import ({loader.cupy_import_error()})"
    return None


def select(op: str, *tensors: Tensor) -> str:
    """``"cuda"`` or ``"torch"``: the implementation ``op`` runs on ``tensors`` under the setting.

    Args:
        op: The op's name, for the error message.
        *tensors: The tensor arguments (floating ones must be float32/float16/bfloat16 for
            the kernels).

    Raises:
        BackendUnavailableError: The backend is ``"cuda"`` and the kernels cannot run here.
    """
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and not all(t.is_cuda for t in tensors)):
        return "torch"  # the common CPU case, decided before any message is built
    reason = kernel_blocker(tensors)
    if reason is None:
        return "cuda"
    if backend == "auto":
        return "torch"
    field = "backend" if _override is not None else ENV_VAR
    raise BackendUnavailableError(
        field, backend, f"{op} cannot run the CUDA kernels: {reason}",
        "move the tensors to a GPU (float32/float16/bfloat16) and install CuPy (pip install "
        f"'lightning-approx[cuda]'), or choose the backend 'auto' (kernels where they can run, else PyTorch) "
        f"or 'torch' with use_backend(...), set_backend(...) or {ENV_VAR}")
