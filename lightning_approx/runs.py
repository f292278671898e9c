"""Runs: one fit followed by a test, summarised as a :class:`~lightning_approx.summary.RunResult`,
and the exact-then-approximate comparison that the CLI and every example script print.

The pieces the example scripts share live here too (their common flags and their
``compare`` / ``exact`` / ``approx`` loop), so ``examples/cifar10.py`` and
``examples/imagenet.py`` only say how to build their model and data.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_approx.callbacks import ApproxBackward, KernelRescaling
from lightning_approx.errors import ConfigError
from lightning_approx.methods import parse_spec, spec_label
from lightning_approx.script_args import (
    MAX_SEED,
    count_or_fraction,
    load_yaml,
    non_negative_int,
    positive_count_or_fraction,
    positive_int,
    seed_value,
)
from lightning_approx.strategies import ApproxDDPStrategy
from lightning_approx.summary import RunResult, RunSummary, format_table

__all__ = ["APPROXIMATIONS", "MODES", "add_run_arguments", "approx_callbacks", "check_spec", "config_label",
           "example_trainer", "fit_and_test", "make_exact", "recipe_callbacks", "run_modes", "run_name",
           "without_approximations", "write_json"]

# The callbacks that make a run approximate; an exact run is the same run without them.
APPROXIMATIONS = (ApproxBackward, KernelRescaling)
MODES = ("compare", "exact", "approx")


def run_name(callbacks: Iterable[pl.Callback]) -> str:
    """A table label for a run: its approximations' names joined by ``+``, or ``"exact"``."""
    names = []
    for cb in callbacks:
        if isinstance(cb, ApproxBackward):
            names.append("+".join(m.name for m in cb.pipeline.methods))
        elif isinstance(cb, KernelRescaling):
            names.append("kernel_rescaling")
    return "+".join(names) or "exact"


def make_exact(trainer: pl.Trainer) -> None:
    """Makes ``trainer`` the exact baseline of a comparison: drops its :data:`APPROXIMATIONS`
    callbacks and, with an :class:`~lightning_approx.ApproxDDPStrategy`, sends dense gradients."""
    trainer.callbacks = without_approximations(trainer.callbacks)
    if isinstance(trainer.strategy, ApproxDDPStrategy):
        trainer.strategy.use_dense()


def without_approximations(callbacks: Iterable[pl.Callback]) -> list[pl.Callback]:
    """``callbacks`` less every :data:`APPROXIMATIONS` instance (what the exact baseline keeps)."""
    return [cb for cb in callbacks if not isinstance(cb, APPROXIMATIONS)]


def fit_and_test(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                 name: str | None = None, test: bool = True, **fit_kwargs: Any) -> RunResult:
    """Fits, then measures accuracy on the test set (the validation set when the data has no test set).

    Args:
        trainer: A Trainer with a :class:`~lightning_approx.summary.RunSummary` among its callbacks.
        model: The module to fit (logs ``test/acc`` / ``val/acc``, as
            :class:`~lightning_approx.classifier.ImageClassifier` does).
        datamodule: The data.
        name: Label of the run; default :func:`run_name` of the trainer's callbacks.
        test: Evaluate after fit; ``False`` leaves ``test_acc`` at ``None`` (throughput runs).
        **fit_kwargs: Passed to ``trainer.fit`` (``ckpt_path``).

    Returns:
        The run's figures.

    Raises:
        ConfigError: The trainer has no RunSummary callback.
    """
    summary = next((cb for cb in trainer.callbacks if isinstance(cb, RunSummary)), None)
    if summary is None:
        raise ConfigError("trainer.callbacks", [type(cb).__name__ for cb in trainer.callbacks],
                          "has no RunSummary, which times the run", "add lightning_approx.summary.RunSummary()")
    trainer.fit(model, datamodule=datamodule, **fit_kwargs)
    acc = None
    if test and datamodule is not None and not trainer.interrupted:
        if is_overridden("test_dataloader", datamodule):
            metrics = trainer.test(model, datamodule=datamodule, verbose=False)
            acc = metrics[0].get("test/acc") if metrics else None  # no metrics: limit_test_batches=0
        else:
            metrics = trainer.validate(model, datamodule=datamodule, verbose=False)
            acc = metrics[0].get("val/acc") if metrics else None
    return summary.result(name or run_name(trainer.callbacks), trainer,
                          test_acc=None if acc is None else float(acc))


# --- the example scripts' shared flags and loop ------------------------------------------------


def write_json(path: str | Path | None, record: Any) -> None:
    """Writes ``record`` to ``path`` as indented JSON, making its folder; does nothing when ``path``
    is ``None`` (the scripts' optional ``--json``). Values JSON cannot hold are written as text."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def add_run_arguments(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float = 0.1,
                      method: str = "crs:sample_ratio=0.5") -> None:
    """Adds the flags every example script has: mode, method, schedule of the fit, seed, output."""
    parser.add_argument("mode", nargs="?", default="compare", choices=MODES,
                        help="compare: exact then approximate with the same seed (default)")
    parser.add_argument("--method", default=method,
                        help="method[:key=value,...], several joined by '+' (see lightning_approx.METHODS), or a "
                             "config of examples/configs/ (.yaml): its ApproxBackward / KernelRescaling callbacks")
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=seed_value, default=0, help=f"in [0, {MAX_SEED}]")
    parser.add_argument("--limit-train-batches", type=positive_count_or_fraction, default=1.0,
                        help="batches per epoch: a count (10) or a fraction (0.25)")
    parser.add_argument("--limit-eval-batches", type=count_or_fraction, default=1.0,
                        help="validation and test batches: a count or a fraction; 0: no evaluation, and no "
                             "accuracy in the table")
    parser.add_argument("--val-every", type=non_negative_int, default=0,
                        help="validate every N epochs (0: only at the end)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def approx_callbacks(method: str | None, seed: int) -> tuple[list[pl.Callback], str]:
    """The callbacks of one run and its label: none and ``"exact"`` for ``None``; a recipe's
    (:func:`recipe_callbacks`) for a path ending in ``.yaml`` / ``.yml``; else an
    :class:`~lightning_approx.ApproxBackward` built from the short spec (``"crs:sample_ratio=0.5"``)."""
    if method is None:
        return [], "exact"
    if method.endswith((".yaml", ".yml")):
        return recipe_callbacks(Path(method), seed), config_label(Path(method))
    configs = check_spec("--method", method)
    return [ApproxBackward(configs, seed=seed)], spec_label(configs)


def check_spec(field: str, spec: str) -> list[dict[str, Any]]:
    """The method configs of the short spec ``spec`` (``"crs:sample_ratio=0.5"``), every setting
    checked by building the methods once, for a script to call before its first long run.

    Raises:
        ConfigError: For the flag ``field``, naming the spec and the setting that is wrong.
    """
    try:
        configs = parse_spec(spec)
        ApproxBackward(configs)  # builds (and so checks) every method of the pipeline
    except ConfigError as e:
        raise ConfigError(field, spec, f"{e.field}={e.value!r}: {e.problem}", e.fix) from e
    return configs


def config_label(path: Path) -> str:
    """``examples/configs/cifar10_resnet20_crs.yaml`` -> ``crs`` (what the config's model and data share)."""
    parts = path.stem.split("_")
    return "_".join(parts[2:]) if len(parts) > 2 else path.stem


def recipe_callbacks(path: Path, seed: int, required: bool = True) -> list[pl.Callback]:
    """The :data:`APPROXIMATIONS` callbacks of a LightningCLI config (``trainer.callbacks``),
    built as the CLI builds them. An ``ApproxBackward`` without a ``seed`` of its own gets ``seed``.
    The rest of the config (model, data, trainer) is not read: the example's flags set those.
    An entry may be a ``{class_path, init_args}`` mapping or a bare class path.

    Args:
        path: The config.
        seed: The seed of an ``ApproxBackward`` that sets none.
        required: Refuse a config without approximation callbacks.

    Raises:
        ConfigError: The file is missing or not YAML, an entry cannot be built (the message names
            the entry, ``trainer.callbacks[i]``), or ``required`` and it lists no approximation callback.
    """
    if not Path(path).is_file():
        raise ConfigError("--method", str(path), "no such config file",
                          "give a LightningCLI config such as examples/configs/cifar10_resnet20_crs.yaml, "
                          "or a short spec such as crs:sample_ratio=0.5")
    config = load_yaml("--method", path)
    trainer = config.get("trainer") if isinstance(config, dict) else None
    entries = (trainer.get("callbacks") if isinstance(trainer, dict) else None) or []
    callbacks = []
    for i, entry in enumerate([entries] if isinstance(entries, dict) else entries):
        key = f"trainer.callbacks[{i}]"
        if isinstance(entry, str):  # LightningCLI takes a bare class path too
            entry = {"class_path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str):
            raise ConfigError("--method", str(path), f"{key} is {entry!r}, not a callback",
                              "give each callback as {class_path: ..., init_args: {...}} or as a class path")
        class_path = entry["class_path"]
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name, None) if module else None
        except ImportError as e:
            raise ConfigError("--method", str(path), f"names callback {class_path!r}, whose module does not import "
                              f"({e})", "fix the class_path, or install what it needs") from e
        if isinstance(cls, type) and issubclass(cls, APPROXIMATIONS):  # other callbacks are the example's
            init = entry.get("init_args") or {}
            if not isinstance(init, dict):
                raise ConfigError("--method", str(path), f"{key}.init_args of {class_path} is {init!r}, not a "
                                  "mapping", "give init_args as {name: value, ...}")
            init = dict(init)
            if issubclass(cls, ApproxBackward):
                init.setdefault("seed", seed)
            try:
                callbacks.append(instantiate_class((), {"class_path": class_path, "init_args": init}))
            except TypeError as e:  # an init_args key the class does not take
                known = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
                raise ConfigError("--method", str(path), f"{key}.init_args cannot build {name} ({e})",
                                  f"use only the arguments {name} takes: {known}") from e
            except ConfigError as e:
                raise ConfigError("--method", str(path), f"{key} ({name}): {e.field}={e.value!r}: {e.problem}",
                                  e.fix) from e
    if required and not callbacks:
        raise ConfigError("--method", str(path), "lists neither ApproxBackward nor KernelRescaling under "
                          "trainer.callbacks", "give a config of examples/configs/ other than the exact one, "
                          "or a short spec such as crs:sample_ratio=0.5")
    return callbacks


def example_trainer(args: argparse.Namespace, callbacks: Sequence[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """The Trainer of an example run: one device, no logger or checkpoints, a RunSummary, and
    validation only at the end unless ``--val-every`` asks for more."""
    defaults: dict[str, Any] = {
        "max_epochs": args.epochs, "accelerator": "auto", "devices": 1, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": args.progress, "enable_model_summary": False,
        "limit_train_batches": args.limit_train_batches, "limit_val_batches": args.limit_eval_batches,
        "limit_test_batches": args.limit_eval_batches, "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": args.val_every or max(1, args.epochs),
    }
    return pl.Trainer(callbacks=[RunSummary(), *callbacks], **{**defaults, **kwargs})


def run_modes(args: argparse.Namespace, build: Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]],
              title: str, test: bool = True, **trainer_kwargs: Any) -> list[RunResult]:
    """Runs ``args.mode`` (exact, approx, or both with the same seed) and prints one table.

    Every run's approximation callbacks are built before the first fit, so a bad ``--method``
    stops the comparison at once instead of after the exact run; each run gets its own
    callbacks (none is reused across fits).

    Args:
        args: Parsed flags of :func:`add_run_arguments`.
        build: Returns a fresh ``(model, datamodule)``; called once per run, after seeding.
        title: First line printed above the table.
        test: Measure accuracy after each fit (``--limit-eval-batches 0`` turns it off too).
        **trainer_kwargs: Overrides of :func:`example_trainer`'s settings (``precision``).

    Returns:
        The results, exact first in ``compare`` mode.

    Raises:
        ConfigError: ``--method`` cannot be built.
    """
    methods = {"compare": [None, args.method], "exact": [None], "approx": [args.method]}[args.mode]
    runs = [approx_callbacks(method, args.seed) for method in methods]  # building draws no random numbers
    test = test and args.limit_eval_batches != 0
    results = []
    for callbacks, name in runs:
        pl.seed_everything(args.seed, workers=True, verbose=False)
        model, data = build()
        results.append(fit_and_test(example_trainer(args, callbacks, **trainer_kwargs), model, data, name, test))
        acc = results[-1].test_acc
        print(f"finished {name}" + ("" if acc is None else f": test acc {100 * acc:.2f}%"), file=sys.stderr)
    print(f"\n{title}")
    print(format_table(results, baseline="exact" if args.mode == "compare" else None))
    write_json(args.json, [r.to_dict() for r in results])
    return results


