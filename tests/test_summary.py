"""RunSummary's accounting through a real Trainer: what counts as training time."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_approx.summary import RunSummary
from tests.test_batch_norm import BNClassifier, data

PAUSE_S = 0.3


class PauseBeforeValidation(Callback):
    """Stands in for work a callback does for training's sake before a validation (such as
    ApproxBackward's batch-norm recalibration)."""

    def on_validation_start(self, trainer, pl_module):
        time.sleep(PAUSE_S)


class LogAccuracy(BNClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.5)


def test_work_before_a_validation_counts_as_training_time(tmp_path):
    summary = RunSummary()
    # The pause runs before the summary's hooks: a window opened at on_validation_start would
    # count it as validation.
    callbacks = [summary, PauseBeforeValidation()]
    pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               callbacks=callbacks).fit(LogAccuracy(), data(), data())
    assert len(summary.curve) == 2
    assert summary.curve[0][0] >= PAUSE_S and summary.curve[1][0] >= 2 * PAUSE_S
    assert summary.validation_seconds < 2 * PAUSE_S  # both pauses would make it at least that
