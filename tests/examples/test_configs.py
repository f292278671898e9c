"""Every YAML in examples/configs loads through the ``lightning-approx`` CLI and trains for two steps."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_approx import ApproxBackward, ApproxDDPStrategy, KernelRescaling
from lightning_approx.cli import build, main
from tests.examples.conftest import CONFIGS, tiny_args

# The run name the table gives each config (its approximations), and the backbone it trains.
EXPECTED = {
    "cifar10_resnet20_exact.yaml": ("exact", "resnet20"),
    "cifar10_resnet20_crs.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_late.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_uniform.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_uniform_late.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_uniform.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_uniform_cv.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_grid.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_grid_025.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_grid_early.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_grid_late.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_crs_weight_uniform_late.yaml": ("crs", "resnet20"),
    "cifar10_resnet20_bernoulli_crs.yaml": ("bernoulli_crs", "resnet20"),
    "cifar10_resnet20_bernoulli_crs_weight_late.yaml": ("bernoulli_crs", "resnet20"),
    "cifar10_resnet20_batch_crs.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_025.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_bn_scale.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_early.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_early_025.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_late.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_late_075.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_batch_crs_last2.yaml": ("batch_crs", "resnet20"),
    "cifar10_resnet20_topk.yaml": ("topk", "resnet20"),
    "cifar10_resnet20_topk_late.yaml": ("topk", "resnet20"),
    "cifar10_resnet20_topk_weight_late.yaml": ("topk", "resnet20"),
    "cifar10_resnet20_forward_sampling.yaml": ("forward_sampling", "resnet20"),
    "cifar10_resnet20_forward_sampling_exact_last.yaml": ("forward_sampling", "resnet20"),
    "cifar10_resnet20_forward_sampling_uniform.yaml": ("forward_sampling", "resnet20"),
    "cifar10_resnet20_forward_sampling_uniform_late.yaml": ("forward_sampling", "resnet20"),
    "cifar10_resnet20_grad_prune.yaml": ("grad_prune", "resnet20"),
    "cifar10_resnet20_patch_grad.yaml": ("patch_grad", "resnet20"),
    "cifar10_resnet20_patch_grad_random.yaml": ("patch_grad", "resnet20"),
    "cifar10_resnet20_patch_grad_late.yaml": ("patch_grad", "resnet20"),
    "cifar10_resnet20_relu_mask.yaml": ("relu_mask", "resnet20"),
    "cifar10_resnet20_kernel_rescaling.yaml": ("kernel_rescaling", "resnet20"),
    "cifar10_resnet20_kernel_rescaling_1epoch.yaml": ("kernel_rescaling", "resnet20"),
    "cifar10_resnet20_kernel_rescaling_24px.yaml": ("kernel_rescaling", "resnet20"),
    "cifar10_resnet20_kernel_rescaling_24px_2epochs.yaml": ("kernel_rescaling", "resnet20"),
    "cifar10_resnet20_kernel_rescaling_24px_3epochs.yaml": ("kernel_rescaling", "resnet20"),
    "cifar10_resnet20_kernel_rescaling_28px_4epochs.yaml": ("kernel_rescaling", "resnet20"),
    "cifar10_resnet20_kernel_rescaling_batch_crs_last2.yaml": ("kernel_rescaling+batch_crs", "resnet20"),
    "cifar10_vgg19_bn_crs.yaml": ("crs", "vgg19_bn"),
    "imagenet_resnet18_crs.yaml": ("crs", "resnet18"),
    "imagenet_resnet18_relu_mask.yaml": ("relu_mask", "resnet18"),
    "imagenet_resnet50_crs.yaml": ("crs", "resnet50"),
    "imagenet_resnet50_crs_ddp.yaml": ("crs", "resnet50"),
    "imagenet_resnet50_kernel_rescaling.yaml": ("kernel_rescaling", "resnet50"),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def test_every_method_has_a_cifar10_config():
    from lightning_approx import METHODS

    assert {f"cifar10_resnet20_{m}.yaml" for m in METHODS} <= set(EXPECTED)


@pytest.fixture
def _no_process_group_left():
    """A one-process DDP fit leaves its gloo process group initialized; later tests start without one."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.usefixtures("_no_process_group_left")
def test_config_fits_two_steps(name, tmp_path, capsys):
    cli = build(tiny_args(CONFIGS / name, tmp_path))
    run, backbone = EXPECTED[name]
    assert cli.model.hparams.model == backbone
    (result,) = cli.results
    assert result.name == run and cli.trainer.global_step == 2
    assert result.test_acc is not None and 0.0 <= result.test_acc <= 1.0
    assert 0.0 < result.backward_work <= 1.0 and result.images_per_s > 0
    assert f"| {run} " in capsys.readouterr().out  # the summary table
    callbacks = cli.trainer.callbacks
    approximations = [cb for cb in callbacks if isinstance(cb, (ApproxBackward, KernelRescaling))]
    assert (run == "exact") == (not approximations)
    if name.startswith("imagenet"):
        assert any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    if "ddp" in name:
        assert type(cli.trainer.strategy) is ApproxDDPStrategy


def test_main_returns_the_exit_status(tmp_path, capsys):
    assert main(tiny_args(CONFIGS / "cifar10_resnet20_exact.yaml", tmp_path)) == 0
    assert "| exact " in capsys.readouterr().out
