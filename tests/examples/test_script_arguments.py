"""The example scripts refuse bad flags and bad --method recipes before any training, each with
one line naming the flag, the value and the fix, and exit status 2."""

from __future__ import annotations

import argparse

import pytest

from lightning_approx import ApproxBackward
from lightning_approx.data.imagenet import ImageNetDataModule
from lightning_approx.errors import ConfigError
from lightning_approx.runs import recipe_callbacks
from lightning_approx.script_args import count_or_fraction, positive_count_or_fraction, seed_value
from tests.examples.conftest import CONFIGS


@pytest.fixture
def no_training(monkeypatch):
    """Any fit is a failure of the test: the error must come before the first one."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run started before the error was found")
    monkeypatch.setattr("lightning_approx.runs.fit_and_test", refuse)


def error_line(capsys) -> str:
    """The last line on stderr (argparse prints its usage above it), checked to be the only error."""
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return err[-1]


def exits_2(main, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


# --- item 9: numeric flags ---------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--epochs", "0", "argument --epochs: 0 is not a positive whole number"),
    ("--epochs", "-1", "argument --epochs: -1 is not a positive whole number"),
    ("--batch-size", "0", "argument --batch-size: 0 is not a positive whole number"),
    ("--limit-train-batches", "0", "argument --limit-train-batches: 0 would train on no batches"),
    ("--limit-train-batches", "-1", "argument --limit-train-batches: -1 is negative"),
    ("--limit-train-batches", "1.5", "argument --limit-train-batches: 1.5 is a fraction above 1"),
    ("--limit-eval-batches", "-1", "argument --limit-eval-batches: -1 is negative"),
    ("--seed", "-1", "argument --seed: -1 is outside [0, 4294967295]"),
    ("--seed", "99999999999", "argument --seed: 99999999999 is outside [0, 4294967295]"),
    ("--val-every", "-1", "argument --val-every: -1 is negative"),
])
def test_cifar10_numeric_flags_are_checked(cifar10, capsys, no_training, flag, value, message):
    exits_2(cifar10.main, ["exact", flag, value])
    line = error_line(capsys)
    assert line.startswith("cifar10.py: error: ") and message in line and "give" in line


def test_count_or_fraction():
    assert count_or_fraction("10") == 10 and isinstance(count_or_fraction("10"), int)
    assert count_or_fraction("0.25") == 0.25 and count_or_fraction("1.0") == 1.0
    assert isinstance(count_or_fraction("1.0"), float) and count_or_fraction("1") == 1  # all vs one batch
    assert count_or_fraction("0") == 0  # no evaluation
    for bad, message in (("2.0", "for 2 batches write 2"), ("-0.5", "negative"), ("nan", "not a finite number"),
                         ("ten", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            count_or_fraction(bad)
    for zero in ("0", "0.0"):
        with pytest.raises(argparse.ArgumentTypeError, match="would train on no batches"):
            positive_count_or_fraction(zero)
    assert seed_value("4294967295") == 2**32 - 1
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
        seed_value("1.5")


def test_no_eval_batches_reports_no_accuracy(cifar10, capsys):
    """``--limit-eval-batches 0`` is handled as a run without testing: no accuracy, not an IndexError."""
    (result,) = cifar10.main(["exact", "--epochs", "1", "--limit-train-batches", "1", "--batch-size", "8",
                              "--limit-eval-batches", "0"])
    assert result.test_acc is None
    captured = capsys.readouterr()
    assert "finished exact\n" in captured.err and "nan" not in captured.out


# --- item 7: compare mode builds the approximation before the exact run -------------------------


@pytest.mark.parametrize(("method", "message"), [
    ("crs:sample_ratio=3", "--method='crs:sample_ratio=3': crs.sample_ratio=3.0: must stay in (0.0, 1.0]"),
    ("crs:bogus=1", "--method='crs:bogus=1': crs.bogus=1: method 'crs' has no such setting"),
    ("nosuch", "--method='nosuch': method[0]='nosuch': unknown method"),
])
def test_compare_checks_the_method_before_the_exact_run(cifar10, capsys, no_training, method, message):
    exits_2(cifar10.main, ["compare", "--method", method])
    line = error_line(capsys)
    assert line.startswith(f"cifar10.py: error: {message}") and "Fix:" in line


def test_compare_checks_a_recipe_before_the_exact_run(cifar10, tmp_path, capsys, no_training):
    recipe = tmp_path / "cifar10_resnet20_mine.yaml"
    recipe.write_text((CONFIGS / "cifar10_resnet20_crs.yaml").read_text().replace("end: 0.5", "end: 3.0"))
    exits_2(cifar10.main, ["compare", "--method", str(recipe)])
    line = error_line(capsys)
    assert line.startswith(f"cifar10.py: error: --method='{recipe}': trainer.callbacks[0] (ApproxBackward): "
                           "crs.sample_ratio=Cosine(")


# --- item 10: ImageNet sizes and precision --------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--image-size", "0"], "argument --image-size: 0 is not a positive whole number"),
    (["--image-size", "-4"], "argument --image-size: -4 is not a positive whole number"),
    (["--synthetic-size", "0"], "argument --synthetic-size: 0 is not a positive whole number"),
    (["--resize-size", "0"], "argument --resize-size: 0 is not a positive whole number"),
    (["--image-size", "32", "--resize-size", "16"], "argument --resize-size: 16 is smaller than --image-size 32"),
    (["--num-workers", "-1"], "argument --num-workers: -1 is negative"),
    (["--precision", "bogus"], "argument --precision: invalid choice: 'bogus'"),
])
def test_imagenet_flags_are_checked(imagenet, capsys, no_training, args, message):
    exits_2(imagenet.main, ["exact", "--synthetic", *args])
    line = error_line(capsys)
    assert line.startswith("imagenet.py: error: ") and message in line


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"image_size": 0}, "image_size"), ({"image_size": -4}, "image_size"), ({"resize_size": 0}, "resize_size"),
    ({"image_size": 64, "resize_size": 32}, "resize_size"), ({"synthetic_train_size": 0}, "synthetic_train_size"),
    ({"synthetic_val_size": 2.5}, "synthetic_val_size"), ({"num_classes": 0}, "num_classes"),
    ({"image_size": True}, "image_size"),
])
def test_imagenet_datamodule_checks_its_sizes(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ImageNetDataModule(synthetic=True, **kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)


# --- item 11: recipe files ---------------------------------------------------------------------


def _recipe(tmp_path, text: str):
    path = tmp_path / "cifar10_resnet20_mine.yaml"
    path.write_text(text)
    return path


def test_malformed_recipe_yaml_names_the_file_and_line(tmp_path):
    path = _recipe(tmp_path, "trainer: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML \(.*line \d") as err:
        recipe_callbacks(path, seed=0)
    assert (err.value.field, err.value.value) == ("--method", str(path))


def test_recipe_init_args_with_an_unknown_key_names_the_entry(tmp_path):
    path = _recipe(tmp_path, "trainer:\n  callbacks:\n    - class_path: lightning_approx.ApproxBackward\n"
                             "      init_args: {method: crs, bogus: 3}\n")
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\]\.init_args cannot build ApproxBackward "
                                          r"\(.*'bogus'\)\. Fix: use only the arguments ApproxBackward takes"):
        recipe_callbacks(path, seed=0)


def test_recipe_entry_may_be_a_bare_class_path(tmp_path):
    path = _recipe(tmp_path, "trainer:\n  callbacks:\n    - lightning_approx.ApproxBackward\n")
    (callback,) = recipe_callbacks(path, seed=4)
    assert isinstance(callback, ApproxBackward) and callback.seed == 4
    path = _recipe(tmp_path, "trainer:\n  callbacks:\n    - 5\n")
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\] is 5, not a callback"):
        recipe_callbacks(path, seed=0)
    path = _recipe(tmp_path, "trainer:\n  callbacks:\n    - class_path: lightning_approx.ApproxBackward\n"
                             "      init_args: [crs]\n")
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\]\.init_args of .* is \['crs'\], not a mapping"):
        recipe_callbacks(path, seed=0)


def test_bad_recipe_through_the_script_is_one_line(cifar10, tmp_path, capsys, no_training):
    path = _recipe(tmp_path, "trainer: [unclosed\n")
    exits_2(cifar10.main, ["approx", "--method", str(path)])
    line = error_line(capsys)
    assert line.startswith(f"cifar10.py: error: --method='{path}': is not valid YAML")
