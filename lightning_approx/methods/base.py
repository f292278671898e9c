"""What a method is: a small object holding hyperparameters (floats or schedules) and the
parts of the backward pass it replaces.

The backward of a Conv2d / Linear splits into stages, and a method claims the ones it
replaces:

- ``"forward"``: the training forward itself (forward sampling shrinks both passes);
- ``"grad_output"``: a transform of the gradient entering the layer (gradient pruning);
- ``"grad_input"`` / ``"grad_weight"``: the two products of the backward.

Stages nobody claims run exactly. Methods whose stages do not overlap compose (see
:class:`~lightning_approx.methods.pipeline.Pipeline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_approx.schedules import Progress, Schedule, as_schedule, check_range

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite

STAGES = ("forward", "grad_output", "input_mask", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Hyperparameter:
    """A schedulable hyperparameter: its valid interval and the value at which it is exact."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    exact_at: float | None
    fix: str

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


class Method:
    """Base class of every approximation.

    Subclasses set ``name``, ``stages``, ``unbiased`` and ``hyperparameters`` and call
    :meth:`_set` for each schedulable argument in ``__init__``. The current value of a
    hyperparameter is ``self.value(field)``; :meth:`update` moves every schedule to the
    current training progress.
    """

    name: ClassVar[str]
    stages: ClassVar[frozenset[str]]
    unbiased: ClassVar[bool]
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {}

    def __init__(self) -> None:
        self._schedules: dict[str, Schedule] = {}
        self._values: dict[str, float] = {}
        # Set by ApproxBackward outside its ``active_epochs``: the method then computes the exact
        # gradients (every layer runs its plain op), whatever its hyperparameters say.
        self.suspended = False

    # --- hyperparameters -------------------------------------------------------------
    def _set(self, field: str, value: float | Schedule | Any) -> None:
        spec = self.hyperparameters[field]
        qualified = f"{self.name}.{field}"
        schedule = as_schedule(value, field=qualified)
        check_range(schedule, field=qualified, low=spec.low, high=spec.high, low_open=spec.low_open,
                    high_open=spec.high_open, fix=spec.fix)
        self._schedules[field] = schedule
        self._values[field] = schedule(Progress(epoch=0.0, step=0))

    def update(self, progress: Progress) -> None:
        """Evaluates every schedule at ``progress``."""
        for field, schedule in self._schedules.items():
            self._values[field] = schedule(progress)

    def value(self, field: str) -> float:
        return self._values[field]

    def values(self) -> dict[str, float]:
        """Current value of every schedulable hyperparameter."""
        return dict(self._values)

    def schedule(self, field: str) -> Schedule:
        return self._schedules[field]

    @property
    def is_exact(self) -> bool:
        """Whether the current values make this method compute the exact gradients (always, while
        :attr:`suspended`)."""
        if self.suspended:
            return True
        checks = [(f, s.exact_at) for f, s in self.hyperparameters.items() if s.exact_at is not None]
        return bool(checks) and all(math.isclose(self._values[f], v) for f, v in checks)

    def metrics(self) -> dict[str, float]:
        """What the method measured since :meth:`reset_metrics` (e.g. realized sparsity),
        logged by the callback as ``approx/<name>.<key>``. Override to report something."""
        return {}

    def reset_metrics(self) -> None:
        """Starts a new measurement window (called at every training batch start)."""

    def options(self) -> dict[str, Any]:
        """Non-schedulable settings, for :meth:`to_config` (override when there are any)."""
        return {}

    def to_config(self) -> dict[str, Any]:
        """A plain mapping that :func:`~lightning_approx.methods.build_method` turns back into
        an equal method."""
        cfg: dict[str, Any] = {"name": self.name}
        for field, schedule in self._schedules.items():
            cfg[field] = schedule.to_config()
        cfg.update(self.options())
        return cfg

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        shown = {f: (s(Progress(0.0, 0)) if s.value_range()[0] == s.value_range()[1] else s)
                 for f, s in self._schedules.items()}
        args = ", ".join(f"{k}={v!r}" for k, v in {**shown, **self.options()}.items())
        return f"{type(self).__name__}({args})"

    def attach(self, model: nn.Module, sites: list[LayerSite]) -> list[RemovableHandle]:
        """Hooks the method needs on the model beyond its patched layers (``batch_crs`` masks
        the output layer's gradient); called once by :func:`~lightning_approx.approximate`,
        and the handles are removed by :func:`~lightning_approx.restore`."""
        return []

    def replaces(self, site: LayerSite, weight: Tensor) -> bool:
        """Whether this method computes its ``grad_input`` / ``grad_weight`` stages at this
        layer; ``False`` lets the pipeline run them exactly, fused with the other product.
        Override when a method approximates only some layers (``patch_grad``)."""
        return True

    # --- the stages (override those in ``stages``) -------------------------------------
    def conv2d_grad_output(self, site: LayerSite, dy: Tensor) -> Tensor:
        raise NotImplementedError  # abstract: only called for methods claiming "grad_output"

    def conv2d_grad_input(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        """Returns dL/dx and the MACs computed."""
        raise NotImplementedError  # abstract: only called for methods claiming "grad_input"

    def conv2d_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        """Returns dL/dW and the MACs computed."""
        raise NotImplementedError  # abstract: only called for methods claiming "grad_weight"

    def linear_grad_output(self, site: LayerSite, dy: Tensor) -> Tensor:
        raise NotImplementedError  # abstract: only called for methods claiming "grad_output"

    def linear_grad_input(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        """``x``: (N, in), ``dy``: (N, out). Returns dL/dx (N, in) and the MACs computed."""
        raise NotImplementedError  # abstract: only called for methods claiming "grad_input"

    def linear_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        """``x``: (N, in), ``dy``: (N, out). Returns dL/dW (out, in) and the MACs computed."""
        raise NotImplementedError  # abstract: only called for methods claiming "grad_weight"

