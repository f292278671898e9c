"""The ``lightning-approx`` command: LightningCLI over the package's classifier, data modules,
callbacks and strategies, so every setting comes from YAML and the command line.

    lightning-approx fit --config examples/configs/cifar10_resnet20_crs.yaml
    lightning-approx fit --config examples/configs/cifar10_resnet20_crs.yaml --trainer.max_epochs 2
    lightning-approx fit --config examples/configs/cifar10_resnet20_crs.yaml --compare true

After ``fit`` it tests the model (or validates it, when the data has no test set) and prints
one :func:`~lightning_approx.summary.format_table` row: wall-clock, step time, images/s, test
accuracy, backward work. With ``--compare true`` it first fits the same config exact (without
its :class:`~lightning_approx.ApproxBackward` and :class:`~lightning_approx.KernelRescaling`
callbacks, and with an ApproxDDPStrategy sending dense gradients; everything else is kept)
from the same seed, and the table adds the step-time and wall-clock ratios to that exact run;
``--exact true`` fits only that exact baseline.

The progress bar is Lightning's ``RichProgressBar`` (``rich`` is a dependency of this package);
``--trainer.enable_progress_bar false`` turns it off.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.imports import RequirementCache
from typing_extensions import override

from lightning_approx.classifier import ImageClassifier
from lightning_approx.errors import ConfigError
from lightning_approx.runs import fit_and_test, make_exact
from lightning_approx.summary import RunResult, RunSummary, format_table

_RICH = RequirementCache("rich>=10.2.2")  # what Lightning's RichProgressBar needs


class ApproxCLI(LightningCLI):
    """LightningCLI that tests after every fit, can compare with an exact run, and prints the run table.

    Attributes:
        results: The runs of the last ``fit``: the exact one first when comparing.
    """

    results: list[RunResult]

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--compare", type=bool, default=False,
                            help="fit: first fit the same config exact (no ApproxBackward / KernelRescaling "
                                 "callbacks) from the same seed, and print the step-time ratio to it")
        parser.add_argument("--exact", type=bool, default=False,
                            help="fit: the config's exact baseline alone (what --compare fits first)")
        parser.add_argument("--test", type=bool, default=True,
                            help="fit: test (or validate, without a test set) after fit, for the table's accuracy")

    @override
    def before_instantiate_classes(self) -> None:
        for flag in ("exact", "compare"):
            if self.subcommand != "fit" and self._get(self.config, flag):
                raise ConfigError(flag, True, f"only applies to fit, not {self.subcommand}",
                                  f"drop --{flag}, or run `lightning-approx fit ... --{flag} true`")
        if self.subcommand == "fit" and self._get(self.config, "compare") and self._get(self.config, "exact"):
            raise ConfigError("exact", True, "--compare already fits the exact baseline first",
                              "drop --exact, or --compare to fit the exact baseline alone")
        if self.subcommand == "fit" and self._get(self.config, "compare") \
                and self._get(self.config, "seed_everything") is False:
            raise ConfigError("seed_everything", False, "compare needs both runs to start from the same seed",
                              "set seed_everything to an integer, e.g. 0")
        if not _RICH and self._get(self.config, "trainer.enable_progress_bar") is not False:
            rank_zero_warn(f"lightning-approx: rich is not installed ({_RICH.message}), so the progress bar is "
                           "Lightning's plain TQDM one. Fix: `pip install rich`.")

    def fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
            **kwargs: Any) -> None:
        """Runs the ``fit`` subcommand (LightningCLI calls this method instead of ``trainer.fit``)."""
        test = self._get(self.config, "test")
        self.results = []
        if self._get(self.config, "compare"):
            seed = self._get(self.config, "seed_everything")
            for exact in (True, False):  # fresh model, data and trainer from the same config and seed each
                pl.seed_everything(seed, workers=True, verbose=False)
                self.instantiate_classes()
                if exact:
                    make_exact(self.trainer)
                self.results.append(fit_and_test(self.trainer, self.model, self.datamodule,
                                                 "exact" if exact else None, test, **kwargs))
        else:
            exact = self._get(self.config, "exact")
            if exact:
                make_exact(self.trainer)
            self.results.append(fit_and_test(self.trainer, model, datamodule, "exact" if exact else None, test,
                                             **kwargs))

    @override
    def after_fit(self) -> None:
        if self.trainer.global_rank == 0:
            baseline = "exact" if self._get(self.config, "compare") else None
            print(format_table(self.results, baseline=baseline))


def build(args: list[str] | None = None) -> ApproxCLI:
    """Parses ``args``, builds the model, data and trainer, and runs the subcommand.

    Args:
        args: Command-line arguments; default ``sys.argv[1:]``.

    Returns:
        The CLI, whose ``results`` hold the runs of a ``fit``.

    Raises:
        ConfigError: A setting of this package is wrong (the message names field, value and fix).
    """
    return ApproxCLI(ImageClassifier, pl.LightningDataModule, subclass_mode_data=True,
                     trainer_defaults={"callbacks": [RunSummary()]}, save_config_kwargs={"overwrite": True},
                     args=args)


def main(args: list[str] | None = None) -> int:
    """Entry point of the ``lightning-approx`` console script.

    Args:
        args: Command-line arguments; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 2 when a setting is wrong (its message, naming field, value and
        fix, goes to stderr as one line instead of a traceback).
    """
    try:
        build(args)
    except Exception as e:
        error = _config_error(e)
        if error is None:
            raise
        print(f"lightning-approx: error: {error}", file=sys.stderr)
        return 2
    return 0


def _config_error(error: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` that ``error`` is or was raised from, if any.

    jsonargparse re-raises an error from a callback's, data module's or strategy's constructor as
    a ``ValueError`` whose cause chain holds the original, so the chain is searched.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
