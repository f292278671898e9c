"""examples/cifar10.py and examples/imagenet.py: their modes, tables, data folders and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_approx import KernelRescaling
from lightning_approx.errors import ConfigError
from lightning_approx.runs import approx_callbacks, write_json

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
LAYOUT = "expected <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/*.JPEG"


def test_cifar10_compare(cifar10, capsys):
    results = cifar10.main(["compare", "--epochs", "1", "--limit-train-batches", "2", "--batch-size", "32",
                             "--limit-eval-batches", "2", "--method", "crs:sample_ratio=0.5"])
    assert [r.name for r in results] == ["exact", "crs:sample_ratio=0.5"]
    assert results[0].backward_work == 1.0 and 0.2 < results[1].backward_work <= 0.5  # repeated draws run once
    assert all(r.test_acc is not None for r in results)
    out = capsys.readouterr().out
    assert "CIFAR-10 (cifar10-subset), resnet20, batch 32" in out and "step / exact" in out


def test_cifar10_defaults_are_the_quickstart(cifar10):
    args = cifar10.parse_args([])
    assert (args.mode, args.model, args.method, args.epochs, args.batch_size, args.lr) == \
        ("compare", "resnet20", str(cifar10.DEFAULT_RECIPE), 8, 128, 0.05)
    assert args.data_dir == cifar10.DEFAULT_DATA and args.limit_train_batches == 1.0
    assert cifar10.parse_args(["--limit-train-batches", "10"]).limit_train_batches == 10
    # The recipe's own settings are the example's, so the example runs the recipe as its config does.
    recipe = OmegaConf.load(cifar10.DEFAULT_RECIPE)
    assert (recipe.trainer.max_epochs, recipe.model.model, recipe.model.lr, recipe.data.init_args.batch_size) == \
        (args.epochs, args.model, args.lr, args.batch_size)


def test_cifar10_runs_a_recipe_config(cifar10, capsys):
    """The default: exact for the recipe's first 4 epochs, then crs on a 3x3 pixel grid (a
    5-epoch run with 2 steps per epoch shows both phases)."""
    exact, recipe = cifar10.main(["compare", "--epochs", "5", "--limit-train-batches", "2", "--batch-size", "32",
                                  "--limit-eval-batches", "2"])
    assert (exact.name, recipe.name) == ("exact", "crs_weight_grid_late")
    assert exact.backward_work == 1.0 and 0.8 < recipe.backward_work < 1.0  # one epoch of five sampled
    assert "crs_weight_grid_late" in capsys.readouterr().out


def test_recipe_callbacks_are_built_as_the_cli_builds_them(tmp_path):
    (approx,), label = approx_callbacks(str(CONFIGS / "cifar10_resnet20_crs_weight_grid_late.yaml"), seed=3)
    assert label == "crs_weight_grid_late" and approx.seed == 3
    crs = approx.pipeline.methods[0]
    assert (crs.weight_window, crs.schedule("sample_ratio").values) == ("pixel_grid", [1.0, 0.1111])
    (rescale,), _ = approx_callbacks(str(CONFIGS / "cifar10_resnet20_kernel_rescaling_24px_3epochs.yaml"), seed=0)
    assert isinstance(rescale, KernelRescaling)
    with pytest.raises(ConfigError, match="no such config file") as err:
        approx_callbacks(str(tmp_path / "missing.yaml"), seed=0)
    assert err.value.field == "--method"
    with pytest.raises(ConfigError, match="lists neither ApproxBackward nor KernelRescaling"):
        approx_callbacks(str(CONFIGS / "cifar10_resnet20_exact.yaml"), seed=0)
    not_a_config = tmp_path / "list.yaml"
    not_a_config.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="lists neither ApproxBackward nor KernelRescaling"):
        approx_callbacks(str(not_a_config), seed=0)
    # A full module path works as in LightningCLI, and other callbacks are left to the example.
    own = tmp_path / "cifar10_resnet20_mine.yaml"
    own.write_text("trainer:\n  callbacks:\n"
                   "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
                   "    - class_path: lightning_approx.callbacks.approx_backward.ApproxBackward\n"
                   "      init_args: {method: topk, seed: 5}\n")
    (approx,), label = approx_callbacks(str(own), seed=0)
    assert label == "mine" and approx.pipeline.methods[0].name == "topk" and approx.seed == 5
    own.write_text("trainer:\n  callbacks:\n    - class_path: no_such_package.Callback\n")
    with pytest.raises(ConfigError, match=r"'no_such_package\.Callback', whose module does not import"):
        approx_callbacks(str(own), seed=0)


def test_cifar10_bad_recipe_gives_one_clear_message(cifar10, capsys):
    with pytest.raises(SystemExit) as exit_:
        cifar10.main(["approx", "--method", "examples/configs/no_such_recipe.yaml"])
    assert exit_.value.code == 2
    assert "cifar10.py: error: --method='examples/configs/no_such_recipe.yaml': no such config file" in \
        capsys.readouterr().err


def test_imagenet_on_a_jpeg_folder(imagenet, jpeg_folder, capsys):
    results = imagenet.main(["compare", "--data-dir", str(jpeg_folder), "--image-size", "32", "--batch-size", "4",
                             "--num-workers", "1", "--model", "resnet18"])
    assert [r.name for r in results] == ["exact", "crs:sample_ratio=0.5"]
    assert all(r.test_acc is not None and r.images_per_s > 0 for r in results)
    out = capsys.readouterr().out
    assert f"ImageNet ({jpeg_folder}), resnet18, 32px, batch 4" in out and "precision 32-true, CPU" in out


def test_imagenet_synthetic_throughput(imagenet, capsys):
    (result,) = imagenet.main(["approx", "--synthetic", "--image-size", "32", "--batch-size", "4",
                               "--limit-train-batches", "2", "--synthetic-size", "16", "--num-workers", "0",
                               "--precision", "bf16-mixed", "--method", "relu_mask"])
    assert result.name == "relu_mask" and result.test_acc is None and result.images_per_s > 0
    out = capsys.readouterr().out
    assert "ImageNet (synthetic)" in out and "precision bf16-mixed" in out and "images/s" in out


@pytest.mark.parametrize("problem", ["missing", "no_val", "no_data_dir"])
def test_imagenet_bad_folder_gives_one_clear_message(imagenet, jpeg_folder, tmp_path, capsys, problem):
    if problem == "missing":
        args = ["--data-dir", str(tmp_path / "nowhere")]
    elif problem == "no_val":
        shutil.copytree(jpeg_folder / "train", tmp_path / "train")
        args = ["--data-dir", str(tmp_path)]
    else:
        args = []
    with pytest.raises(SystemExit) as exit_:
        imagenet.main(["exact", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imagenet.py: error: data_dir=") and "Fix:" in err
    if problem != "no_data_dir":
        assert LAYOUT in err
    if problem == "no_val":
        assert "has no val/ folder" in err


def test_write_json_makes_the_folder_and_skips_without_a_path(tmp_path):
    path = tmp_path / "new" / "out.json"
    write_json(path, {"path": Path("a"), "x": [1.5]})  # a Path is written as its text
    assert json.loads(path.read_text()) == {"path": "a", "x": [1.5]}
    write_json(None, {"x": 1})  # no --json: nothing written, no error
