"""Compiled CUDA kernels for the approximate backward, loaded through CuPy (NVRTC).

- :mod:`~lightning_approx.kernels.ops`: the public ops, each running its kernel or its PyTorch
  reference as the backend setting decides;
- :mod:`~lightning_approx.kernels.dispatch`: the backend setting (``"auto"`` | ``"torch"`` |
  ``"cuda"``, ``$LIGHTNING_APPROX_BACKEND``);
- :mod:`~lightning_approx.kernels.cuda`: the kernel launches alone;
- :mod:`~lightning_approx.kernels.loader`: finding, compiling and launching ``cuda_src/*.cu``.

Importing this package imports neither CuPy nor anything CUDA; that happens on the first
kernel launch. See ``docs/kernels.md``.
"""

from lightning_approx.kernels.dispatch import (
    BACKENDS,
    ENV_VAR,
    BackendUnavailableError,
    get_backend,
    set_backend,
    use_backend,
)

__all__ = ["BACKENDS", "ENV_VAR", "BackendUnavailableError", "get_backend", "set_backend", "use_backend"]
