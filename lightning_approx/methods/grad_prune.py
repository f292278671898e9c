"""``grad_prune``: stochastic pruning of the activation gradient entering each conv's
backward (Ye et al., *Accelerating CNN Training by Pruning Activation Gradients*, ECCV 2020;
the same idea drives SparseTrain). The formula is in :mod:`lightning_approx.ops.prune`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.kernels import ops as kops
from lightning_approx.methods.base import Hyperparameter, Method
from lightning_approx.methods.registry import register
from lightning_approx.schedules import Schedule

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite

SPARSITY = Hyperparameter(low=0.0, high=1.0, low_open=False, high_open=True, exact_at=0.0,
                          fix="give a target fraction of zeros in [0, 1); 0.0 computes the exact gradients")


@register
class GradPrune(Method):
    """Prunes small entries of each conv's incoming gradient to a target sparsity, unbiasedly.

    The pruned gradient feeds the input gradient, the weight gradient and the bias gradient.
    Its zeros are counted as zero work (``approx/zero_work``); the dense kernels used here
    still multiply them, so on CPU this method saves no time (see its card).

    Args:
        sparsity: Target fraction of zeros in [0, 1); a float or a schedule. 0.0 is exact.
        apply_to_linear: Also prune the gradient entering ``nn.Linear`` layers.

    Metrics (logged as ``approx/grad_prune.<key>``): ``realized_sparsity``, the fraction of
    zeros actually produced in the last step, next to the target.
    """

    name = "grad_prune"
    stages = frozenset({"grad_output"})
    unbiased = True
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {"sparsity": SPARSITY}

    def __init__(self, sparsity: float | Schedule = 0.8, apply_to_linear: bool = False) -> None:
        super().__init__()
        self._set("sparsity", sparsity)
        if not isinstance(apply_to_linear, bool):
            raise ConfigError(f"{self.name}.apply_to_linear", apply_to_linear, "must be true or false",
                              "give true to prune the gradients of Linear layers too")
        self.apply_to_linear = apply_to_linear
        self.last_zero_fraction = 0.0  # of the last pruned gradient, for the work counter
        self.reset_metrics()

    def options(self) -> dict:
        return {"apply_to_linear": self.apply_to_linear}

    def _prune(self, site: LayerSite, dy: Tensor) -> Tensor:
        pruned, non_zeros = kops.stochastic_prune(dy, self.value("sparsity"), site.generator(dy.device))
        zeros = dy.numel() - non_zeros
        self._zeros += zeros
        self._entries += dy.numel()
        self.last_zero_fraction = zeros / dy.numel() if dy.numel() else 0.0
        return pruned

    def conv2d_grad_output(self, site: LayerSite, dy: Tensor) -> Tensor:
        return self._prune(site, dy)

    def linear_grad_output(self, site: LayerSite, dy: Tensor) -> Tensor:
        if not self.apply_to_linear:
            self.last_zero_fraction = 0.0
            return dy
        return self._prune(site, dy)

    def metrics(self) -> dict[str, float]:
        return {"realized_sparsity": self._zeros / self._entries} if self._entries else {}

    def reset_metrics(self) -> None:
        self._zeros = 0
        self._entries = 0
