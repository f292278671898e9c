"""Build hook: ships the repository's top-level ``cuda_src/`` as ``lightning_approx/_cuda_src``.

``pyproject.toml`` maps the package ``lightning_approx._cuda_src`` to the folder ``cuda_src``
(``[tool.setuptools.package-dir]``) and names its data files (``[tool.setuptools.package-data]``),
but ``packages.find`` only discovers folders under ``lightning_approx/``, so it never lists that
package. This ``build_py`` adds it; wheels then carry the ``.cu`` / ``.cuh`` files and sdists the
``cuda_src/`` folder. setuptools loads this file by path at build time (``[tool.setuptools.cmdclass]``),
so it imports nothing but setuptools.
"""

from __future__ import annotations

from setuptools.command.build_py import build_py

CUDA_PACKAGE = "lightning_approx._cuda_src"


class BuildPyWithCudaSources(build_py):
    """``build_py`` that also builds the ``lightning_approx._cuda_src`` data package."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if CUDA_PACKAGE not in self.packages:
            self.packages = [*self.packages, CUDA_PACKAGE]
