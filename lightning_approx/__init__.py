"""lightning-approx: approximate backward passes for CNN training, as one Lightning callback.

Functional API::

    names = lightning_approx.approximate(model, "crs", sample_ratio=0.5)
    ...
    lightning_approx.restore(model)

Lightning::

    trainer = Trainer(callbacks=[lightning_approx.ApproxBackward("crs", sample_ratio=0.5)])
"""

from lightning_approx.callbacks import ApproxBackward, KernelRescaling
from lightning_approx.errors import ConfigError
from lightning_approx.methods import CRS, METHODS, Method, Pipeline, build_method
from lightning_approx.strategies import ApproxDDPStrategy
from lightning_approx.surgery import approximate, restore

__all__ = ["CRS", "METHODS", "ApproxBackward", "ApproxDDPStrategy", "ConfigError", "KernelRescaling", "Method",
           "Pipeline", "approximate", "build_method", "restore"]
__version__ = "0.1.0"
