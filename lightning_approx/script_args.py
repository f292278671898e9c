"""What the example and benchmark scripts share to check their flags before the first run:
argparse types for counts, fractions and seeds, checked input files and devices, and
:func:`script_main`, which reports a :class:`~lightning_approx.errors.ConfigError` as one line
and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from lightning_approx.errors import ConfigError

__all__ = ["MAX_SEED", "check_device", "count_or_fraction", "load_json", "load_yaml", "non_negative_int",
           "positive_count_or_fraction", "positive_int", "script_main", "seed_value"]

T = TypeVar("T")

MAX_SEED = 2**32 - 1  # numpy's limit, which Lightning's seed_everything keeps to


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give {what}")
    return value


def count_or_fraction(text: str) -> int | float:
    """``"10"`` -> 10 batches, ``"0.25"`` -> a quarter of them, ``"1.0"`` -> all, ``"0"`` -> none
    (Lightning's ``limit_*_batches``). An argparse type: a negative value, or a fraction above 1
    (``"1.5"``, ``"2.0"``), is refused with a message saying what to give instead."""
    what = "a count of batches (10) or a fraction of them in [0, 1] (0.25; 1.0 is all)"
    value = _number(text, what)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give {what}")
    if value.is_integer() and "." not in text:
        return int(value)
    if value > 1:
        fix = f"for {value:g} batches write {value:.0f}" if value.is_integer() else f"give {what}"
        raise argparse.ArgumentTypeError(f"{text} is a fraction above 1; {fix}")
    return value


def positive_count_or_fraction(text: str) -> int | float:
    """:func:`count_or_fraction` without zero: a limit on the training batches, where 0 would
    train on nothing (and report an untrained model)."""
    value = count_or_fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} would train on no batches; give a count (10) or a fraction in "
                                         "(0, 1] (0.25; 1.0 is all)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give e.g. 1") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (epochs, steps, batch size, threads)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number; give 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (warm-up steps, worker processes)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def seed_value(text: str) -> int:
    """An argparse type: a random seed, a whole number in [0, 2**32 - 1] (what ``seed_everything`` takes)."""
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, {MAX_SEED}], the seeds numpy and Lightning "
                                         "take; give e.g. 0")
    return value


def check_device(field: str, text: str) -> torch.device:
    """A torch device of this machine, named by the flag ``field`` (``--device cuda`` on a CPU-only
    torch is refused here, not by an assertion deep in the first CUDA call).

    Raises:
        ConfigError: ``text`` is not a CPU or CUDA device, or CUDA is not available.
    """
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ConfigError(field, text, f"is not a torch device ({e})", "give cpu or cuda") from e
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(field, text, "is neither a CPU nor a CUDA device", "give cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(field, text, f"needs CUDA, which this machine or torch build (torch {torch.__version__}) "
                          "does not have", "give cpu, or run on a machine with a GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(field, text, f"is past the {torch.cuda.device_count()} CUDA device(s) of this machine",
                          "give cuda or cuda:0")
    return device


def load_yaml(field: str, path: Path) -> Any:
    """The contents of the YAML file ``path`` (plain dicts and lists), for the flag ``field``.

    Raises:
        ConfigError: The file is missing or is not valid YAML (the message gives the parser's line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file" if not path.exists() else "is not a file",
                          "give the path of a LightningCLI YAML config, such as "
                          "examples/configs/cifar10_resnet20_crs.yaml")
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())  # the parser's message spans lines
        raise ConfigError(field, str(path), f"is not valid YAML ({problem})",
                          "fix the file at the line named, e.g. close its brackets and quotes") from e


def load_json(field: str, path: Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object in ``path`` (a file a script wrote with ``--json``), for the flag ``field``.

    Args:
        field: The flag that named the file (``"--compare"``).
        path: The file.
        keys: Keys the object must have (what the script reads from it).

    Raises:
        ConfigError: The file is missing, is not JSON, is not a JSON object, or lacks one of ``keys``.
    """
    path = Path(path)
    fix = "give a file this script wrote with --json"
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file" if not path.exists() else "is not a file", fix)
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(field, str(path), f"is not JSON ({e})", fix) from e
    if not isinstance(record, dict):
        raise ConfigError(field, str(path), f"holds a JSON {type(record).__name__}, not an object", fix)
    missing = [key for key in keys if key not in record]
    if missing:
        raise ConfigError(field, str(path), f"has no {missing} (its keys: {sorted(record)[:10]})", fix)
    return record


def script_main(main: Callable[[list[str] | None], T], argv: list[str] | None = None,
                script: str | None = None) -> T:
    """Runs a script's ``main(argv)``, turning a :class:`ConfigError` into one line on stderr,
    ``<script>: error: <message>``, and exit status 2, as argparse reports a bad flag (instead
    of a traceback above the message).

    Args:
        main: The script's entry point.
        argv: Its arguments; ``None``: ``sys.argv[1:]``.
        script: The name in the message; default: the file ``main`` is defined in.
    """
    try:
        return main(argv)
    except ConfigError as e:
        name = script or Path(inspect.getfile(main)).name
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
