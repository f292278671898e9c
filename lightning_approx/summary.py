"""What a run did, in one table: wall-clock, accuracy, backward work, step time.

Every example prints its runs with :func:`format_table`, so exact and approximate runs
(and CPU and GPU figures) read the same way.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


@dataclass
class RunResult:
    """One training run's figures.

    Attributes:
        name: Label of the run (``"exact"``, ``"crs@0.5"``).
        epochs: Epochs trained.
        wall_clock_s: Seconds of ``fit`` (training and validation).
        step_time_s: Median seconds per training step (batch start to batch end).
        test_acc: Final test accuracy in [0, 1] (``None`` when not tested).
        backward_work: Backward MACs computed over exact, whole fit (1.0 for exact runs).
        curve: ``(training seconds, validation accuracy)`` after each validation, for
            time-to-accuracy plots (training seconds exclude the validation loops).
        images_per_s: Training throughput: the median images per step over the median step
            time, so warm-up steps do not count (``None`` when no step ran).
    """

    name: str
    epochs: int
    wall_clock_s: float
    step_time_s: float
    test_acc: float | None = None
    backward_work: float = 1.0
    curve: list[tuple[float, float]] = field(default_factory=list)
    images_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunSummary(Callback):
    """Times ``fit``, its training steps and its validations, and reads the backward work
    from an :class:`~lightning_approx.ApproxBackward` callback on the same Trainer, if any."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.step_images: list[int] = []
        self.fit_seconds = 0.0
        self.validation_seconds = 0.0
        self.curve: list[tuple[float, float]] = []
        self._fit_t0 = self._step_t0 = self._val_t0 = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step_times.clear()
        self.step_images.clear()
        self.curve.clear()
        self.validation_seconds = 0.0
        self._fit_t0 = time.perf_counter()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # From the first validation batch on, not from on_validation_start: what callbacks do
        # there for training's sake (ApproxBackward's batch-norm recalibration) is training time.
        self._val_t0 = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        self.validation_seconds += now - self._val_t0
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and not trainer.sanity_checking:
            self.curve.append((now - self._fit_t0 - self.validation_seconds, float(acc)))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._step_t0)
        self.step_images.append(_batch_size(batch))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_t0

    def result(self, name: str, trainer: pl.Trainer, test_acc: float | None = None) -> RunResult:
        from lightning_approx.callbacks import ApproxBackward

        work = [cb.totals.fraction for cb in trainer.callbacks if isinstance(cb, ApproxBackward)]
        step = statistics.median(self.step_times) if self.step_times else float("nan")
        return RunResult(name=name, epochs=trainer.current_epoch, wall_clock_s=self.fit_seconds, step_time_s=step,
                         test_acc=test_acc, backward_work=work[0] if work else 1.0, curve=list(self.curve),
                         images_per_s=statistics.median(self.step_images) / step if step > 0 else None)


def _batch_size(batch: Any) -> int:
    """Images in a batch: the length of its first tensor (``(x, y)`` tuples, dicts, tensors)."""
    while isinstance(batch, (list, tuple, dict)) and batch:
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    shape = getattr(batch, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    return len(batch) if hasattr(batch, "__len__") else 0


def format_table(results: list[RunResult], baseline: str | None = None) -> str:
    """A Markdown table of runs; with ``baseline``, step-time and wall-clock ratios to it."""
    base = next((r for r in results if r.name == baseline), None)
    header = ["run", "epochs", "wall-clock (s)", "step (ms)", "images/s", "test acc (%)", "backward work"]
    if base is not None:
        header += ["step / exact", "wall / exact"]
    rows = []
    for r in results:
        acc = "-" if r.test_acc is None else f"{100 * r.test_acc:.2f}"
        rate = "-" if r.images_per_s is None else f"{r.images_per_s:.1f}"
        row = [r.name, str(r.epochs), f"{r.wall_clock_s:.1f}", f"{1000 * r.step_time_s:.1f}", rate, acc,
               f"{100 * r.backward_work:.1f}%"]
        if base is not None:
            row += [f"{r.step_time_s / base.step_time_s:.3f}", f"{r.wall_clock_s / base.wall_clock_s:.3f}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)
