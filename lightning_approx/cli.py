"""The ``lightning-approx`` command: LightningCLI over the package's classifier, data modules,
callbacks and strategies, so every setting comes from YAML and the command line.

    lightning-approx fit --config examples/configs/cifar10_resnet20_crs.yaml
    lightning-approx fit --config examples/configs/cifar10_resnet20_crs.yaml --trainer.max_epochs 2
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lightning_approx.classifier import ImageClassifier
from lightning_approx.summary import RunSummary, format_table


class ApproxCLI(LightningCLI):
    """LightningCLI that times every fit and prints the run summary table at its end."""

    @override
    def after_fit(self) -> None:
        summary = next((cb for cb in self.trainer.callbacks if isinstance(cb, RunSummary)), None)
        if summary is None or self.trainer.global_rank != 0:
            return
        acc = self.trainer.callback_metrics.get("val/acc")
        result = summary.result("run", self.trainer, test_acc=float(acc) if acc is not None else None)
        print(format_table([result]))


def main(args: list[str] | None = None) -> ApproxCLI:
    """Entry point of the ``lightning-approx`` console script."""
    return ApproxCLI(ImageClassifier, pl.LightningDataModule, subclass_mode_data=True,
                     trainer_defaults={"callbacks": [RunSummary()]}, save_config_kwargs={"overwrite": True},
                     args=args)


if __name__ == "__main__":
    main()
