"""ImageClassifier: the LightningModule the examples train (any model of
:mod:`lightning_approx.models`, SGD with momentum, cosine or one-cycle learning rate)."""

from __future__ import annotations

import numbers
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_approx.errors import ConfigError

LR_SCHEDULES = ("cosine", "onecycle", "none")


class ImageClassifier(pl.LightningModule):
    """Trains an image classifier with cross-entropy and reports accuracy via torchmetrics.

    Args:
        model: Name of a model in :data:`lightning_approx.models.MODELS` (``"resnet20"``).
        num_classes: Number of classes.
        lr: Peak learning rate of SGD.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 weight decay.
        lr_schedule: ``"cosine"`` (per step, to zero), ``"onecycle"`` or ``"none"``.
        label_smoothing: Cross-entropy label smoothing.
        channels_last: Use channels-last memory format: faster on GPUs with tensor cores, and with
            oneDNN on a CPU (the ResNet-20 step on the 2-core CPU, docs/benchmarks.md).
    """

    def __init__(self, model: str = "resnet20", num_classes: int = 10, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, lr_schedule: str = "cosine", label_smoothing: float = 0.0,
                 channels_last: bool = False) -> None:
        super().__init__()
        from lightning_approx.models import build_model

        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", lr_schedule, "unknown learning-rate schedule",
                              f"use one of {list(LR_SCHEDULES)}")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
            raise ConfigError("lr", lr, "must be a positive number", "give e.g. 0.1")
        self.save_hyperparameters()
        self.net = build_model(model, num_classes=num_classes)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.named_parameters() if p.ndim <= 1]  # BN and biases
        optimizer = torch.optim.SGD([{"params": decay, "weight_decay": hp.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        if hp.lr_schedule == "none":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if hp.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total)))
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=max(1, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
