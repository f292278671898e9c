"""The ``lightning-approx`` CLI: compare with exact, test after fit, progress bar, clear errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

from lightning_approx import cli as cli_module
from lightning_approx.cli import build, main
from tests.conftest import CIFAR_SUBSET
from tests.examples.conftest import CONFIGS, tiny_args


def test_compare_runs_exact_then_approximate_and_prints_the_ratio(tmp_path, capsys):
    args = tiny_args(CONFIGS / "cifar10_resnet20_patch_grad.yaml", tmp_path)
    cli = build([*args, "--compare", "true"])
    exact, approx = cli.results
    assert (exact.name, approx.name) == ("exact", "patch_grad")
    assert exact.backward_work == 1.0 and approx.backward_work < 1.0  # the exact run had no ApproxBackward
    out = capsys.readouterr().out
    assert "step / exact" in out and "| exact " in out and "| patch_grad " in out


def test_compare_starts_both_runs_from_the_same_seed(tmp_path):
    # An exact config compared with itself: two identical, deterministic CPU runs.
    args = tiny_args(CONFIGS / "cifar10_resnet20_exact.yaml", tmp_path)
    cli = build([*args, "--compare", "true", "--trainer.max_steps", "1"])
    first, second = cli.results
    assert first.test_acc == second.test_acc and first.curve == second.curve
    assert torch.isfinite(torch.tensor(first.step_time_s))


def test_exact_fits_the_configs_baseline_alone(tmp_path):
    args = tiny_args(CONFIGS / "cifar10_resnet20_crs.yaml", tmp_path)
    exact_alone = build([*args, "--exact", "true"]).results
    compared = build([*args, "--compare", "true"]).results
    assert [r.name for r in exact_alone] == ["exact"] and exact_alone[0].backward_work == 1.0
    assert exact_alone[0].test_acc == compared[0].test_acc  # the same baseline --compare fits first


def test_exact_and_compare_together_are_refused(tmp_path, capsys):
    args = [*tiny_args(CONFIGS / "cifar10_resnet20_crs.yaml", tmp_path), "--compare", "true", "--exact", "true"]
    assert main(args) == 2
    assert "exact=True: --compare already fits the exact baseline first" in capsys.readouterr().err


def test_without_test_the_table_has_no_accuracy(tmp_path):
    cli = build([*tiny_args(CONFIGS / "cifar10_resnet20_exact.yaml", tmp_path), "--test", "false",
                 "--trainer.max_steps", "1"])
    assert cli.results[0].test_acc is None


def test_rich_progress_bar_by_default(tmp_path):
    args = tiny_args(CONFIGS / "cifar10_resnet20_exact.yaml", tmp_path)
    i = args.index("--trainer.enable_progress_bar")
    del args[i:i + 2]
    cli = build([*args, "--trainer.max_steps", "1", "--test", "false"])
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)


def test_without_rich_it_says_so(tmp_path, monkeypatch):
    class Missing:
        message = "No module named 'rich'"

        def __bool__(self) -> bool:
            return False

    monkeypatch.setattr(cli_module, "_RICH", Missing())
    args = ["validate", "--config", str(CONFIGS / "cifar10_resnet20_exact.yaml"), "--trainer.limit_val_batches",
            "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.data_dir", str(CIFAR_SUBSET)]
    with pytest.warns(UserWarning, match="rich is not installed.*pip install rich"):
        build(args)


def test_missing_imagenet_folder_gives_one_clear_message(tmp_path, capsys):
    args = tiny_args(CONFIGS / "imagenet_resnet18_crs.yaml", tmp_path)
    args = [*args, "--data.init_args.synthetic", "false", "--data.init_args.data_dir", str(tmp_path / "missing")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lightning-approx: error: data_dir=")
    assert "does not exist" in err and "<data_dir>/train/<class>/*.JPEG" in err and "Fix:" in err


@pytest.mark.parametrize(("override", "message"), [
    # jsonargparse re-raises a constructor's ConfigError as a ValueError: main still finds it.
    ("trainer:\n  callbacks:\n    - class_path: lightning_approx.ApproxBackward\n      init_args:\n"
     "        method: crs\n        sample_ratio: {class_path: lightning_approx.schedules.Cosine,"
     " init_args: {start: 1.0, end: 0.0, until: 2}}\n", "crs.sample_ratio=Cosine("),
    ("data:\n  init_args:\n    batch_size: 0\n", "batch_size=0: must be a positive integer"),
])
def test_a_bad_callback_or_data_setting_gives_one_clear_message(tmp_path, capsys, override, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    assert main([*tiny_args(CONFIGS / "cifar10_resnet20_exact.yaml", tmp_path), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-approx: error: ") and message in err[-1] and "Fix:" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_an_error_that_is_not_a_setting_still_raises(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("not a setting")

    monkeypatch.setattr(cli_module, "build", broken)
    with pytest.raises(RuntimeError, match="not a setting"):
        main([])


def test_compare_is_refused_outside_fit(tmp_path, capsys):
    args = ["validate", "--config", str(CONFIGS / "cifar10_resnet20_crs.yaml"), "--compare", "true"]
    assert main(args) == 2
    assert "compare=True: only applies to fit" in capsys.readouterr().err


def test_compare_needs_a_seed(tmp_path, capsys):
    args = [*tiny_args(CONFIGS / "cifar10_resnet20_crs.yaml", tmp_path), "--compare", "true",
            "--seed_everything", "false"]
    assert main(args) == 2
    assert "seed_everything=False" in capsys.readouterr().err


def test_the_exact_baseline_also_communicates_exactly():
    import lightning.pytorch as pl

    from lightning_approx import ApproxBackward, ApproxDDPStrategy
    from lightning_approx.runs import make_exact

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[ApproxBackward("crs")],
                         strategy=ApproxDDPStrategy(comm="sampled", comm_ratio=0.5))
    make_exact(trainer)
    assert not any(isinstance(cb, ApproxBackward) for cb in trainer.callbacks)
    assert (trainer.strategy.comm, trainer.strategy.comm_ratio, trainer.strategy.comm_mode) == ("dense", None, "dense")
