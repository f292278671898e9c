"""Bad inputs fail at once with a ConfigError naming the field, the value and the fix, not a bare
TypeError / ValueError from deep inside torch or at fit time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_approx import ApproxBackward, ApproxDDPStrategy, ConfigError, approximate
from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.data.imagenet import ImageFolderDataset, ImageNetDataModule
from lightning_approx.errors import check_seed
from lightning_approx.layers import LayerSite, layer_seed
from lightning_approx.methods import CRS, BatchCRS, GradPrune, Pipeline, ReluMask, build_method, parse_spec
from lightning_approx.models import build_model
from lightning_approx.surgery import check_exclude, make_pipeline, patched_sites


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))


def config_error(field: str, value: Any, build: Callable[[], Any], match: str | None = None) -> ConfigError:
    """Asserts that ``build()`` raises a ConfigError whose message starts with ``field=value``."""
    with pytest.raises(ConfigError, match=match) as info:
        build()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}={value!r}: "), str(info.value)
    return info.value


BAD_SEEDS = ["a", None, 1.7, True]


# --- 1. seeds -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_approximate_checks_seed_before_patching(seed):
    model = Net()
    config_error("seed", seed, lambda: approximate(model, "crs", seed=seed), match="whole number")
    assert not patched_sites(model)


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_layer_site_checks_seed(seed):
    config_error("seed", seed, lambda: LayerSite("fc", 0, make_pipeline("crs"), None, seed))


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_callback_checks_seed(seed):
    config_error("seed", seed, lambda: ApproxBackward("crs", seed=seed), match="give e.g. 0")


def test_numpy_integer_seeds_are_ints():
    assert ApproxBackward("crs", seed=np.int64(3)).seed == 3 and type(check_seed("seed", np.int32(2))) is int
    model = Net()
    approximate(model, "crs", seed=np.int64(5))
    assert {site.seed for site in patched_sites(model)} == {5}


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_seeds_outside_the_generators_range_are_refused_where_given(seed):
    # Before the check, 2**62 passed here and failed at the first backward, inside manual_seed.
    for make in (lambda: ApproxBackward("crs", seed=seed), lambda: approximate(Net(), "crs", seed=seed),
                 lambda: CIFAR10DataModule("data", seed=seed), lambda: ApproxDDPStrategy(seed=seed)):
        config_error("seed", seed, make, match=r"outside the seeds torch.Generator takes")


@pytest.mark.parametrize("seed", [2**63 - 1, 2**62, -(2**63), -1])
def test_extreme_seeds_draw_in_every_layer(seed):
    model = Net()
    approximate(model, "crs", sample_ratio=0.5, seed=seed)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_layer_seeds_in_range_keep_their_value():
    # Seeds that always worked keep their streams; only values past torch's range are reduced.
    assert layer_seed(7, 3) == 7 * 1_000_003 + 3 and layer_seed(-1, 0) == -1_000_003
    assert layer_seed(2**62, 1) == (2**62 * 1_000_003 + 1) % 2**64


@pytest.mark.parametrize("seed", ["a", None, 1.5])
def test_strategy_seed_uses_the_shared_check(seed):
    config_error("seed", seed, lambda: ApproxDDPStrategy(seed=seed), match="whole number")


# --- 2. exclude ---------------------------------------------------------------------------
@pytest.mark.parametrize("exclude", [5, {"fc": 1}, b"fc", 1.5])
def test_exclude_type_is_checked_by_approximate_and_at_callback_construction(exclude):
    model = Net()
    config_error("exclude", exclude, lambda: approximate(model, "crs", exclude=exclude), match="layer name pattern")
    assert not patched_sites(model)
    config_error("exclude", exclude, lambda: ApproxBackward("crs", exclude=exclude))


def test_exclude_entries_must_be_patterns():
    config_error("exclude[1]", 3, lambda: ApproxBackward("crs", exclude=["auto", 3]), match="name pattern")
    config_error("exclude[0]", None, lambda: approximate(Net(), "crs", exclude=[None]))


def test_good_exclude_values_pass():
    assert check_exclude(None) is None and check_exclude("auto") == "auto"
    assert check_exclude(("stem", "fc")) == ["stem", "fc"] and check_exclude(iter(["fc"])) == ["fc"]
    assert ApproxBackward("crs", exclude=("stem", "fc")).exclude == ["stem", "fc"]
    assert approximate(Net(), "crs", exclude=("stem",)) == ["body", "fc"]


# --- 3. class_path / init_args ------------------------------------------------------------
@pytest.mark.parametrize("path", ["lightning_approx.methods.base.Method", "lightning_approx.methods.Method",
                                  "collections.OrderedDict"])
def test_class_path_must_be_a_registered_method(path):
    config_error("method.class_path", path, lambda: build_method({"class_path": path}),
                 match="is not a lightning_approx Method.*CRS")


def test_unregistered_subclass_is_refused():
    config_error("method.class_path", f"{__name__}.Unregistered",
                 lambda: build_method({"class_path": f"{__name__}.Unregistered"}), match="register")


class Unregistered(CRS):
    name = "unregistered"


def test_class_path_must_be_a_string():
    config_error("method.class_path", 3, lambda: build_method({"class_path": 3}), match="class name or import path")
    config_error("method.class_path", ["CRS"], lambda: build_method({"class_path": ["CRS"]}))


def test_init_args_must_be_a_mapping():
    config_error("method.init_args", [1], lambda: build_method({"class_path": "CRS", "init_args": [1]}),
                 match="must be a mapping")


def test_good_class_paths_still_build():
    assert build_method({"class_path": "lightning_approx.methods.CRS", "init_args": {"sample_ratio": 0.25}}) \
        == CRS(sample_ratio=0.25)
    assert isinstance(build_method({"class_path": "BatchCRS"}), BatchCRS)


# --- 4. booleans in the short spec --------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [("true", True), ("TRUE", True), ("False", False), ("false", False)])
def test_short_spec_reads_booleans(text, value):
    (cfg,) = parse_spec(f"grad_prune:apply_to_linear={text}")
    assert cfg == {"name": "grad_prune", "apply_to_linear": value}
    assert build_method(cfg).apply_to_linear is value


def test_short_spec_numbers_and_strings_unchanged():
    assert parse_spec("crs:sample_ratio=0.5,grads=weight") == [{"name": "crs", "sample_ratio": 0.5,
                                                                 "grads": "weight"}]
    assert isinstance(build_method(parse_spec("grad_prune:apply_to_linear=true")[0]), GradPrune)


# --- 5. a method without settings ---------------------------------------------------------
def test_method_without_settings_says_so():
    err = config_error("relu_mask.sample_ratio", 0.5, lambda: build_method("relu_mask", sample_ratio=0.5))
    assert err.fix == "'relu_mask' takes no settings; drop them" and "[]" not in str(err)
    config_error("relu_mask.sample_ratio", 0.5, lambda: ApproxBackward("relu_mask", sample_ratio=0.5))


# --- 6. the short form where one method is expected ---------------------------------------
@pytest.mark.parametrize(("text", "fix"), [
    ("relu_mask+crs", "['relu_mask', 'crs']"),
    ("crs:sample_ratio=0.5", "{'name': 'crs', 'sample_ratio': 0.5}"),
    ("relu_mask+crs:sample_ratio=0.25", "['relu_mask', {'name': 'crs', 'sample_ratio': 0.25}]"),
    ("crs:sample_ratio", "a list of methods"),
])
def test_short_form_gets_the_long_form_as_fix(text, fix):
    err = config_error("method", text, lambda: build_method(text), match="short form")
    assert fix in err.fix
    config_error("method", text, lambda: ApproxBackward(text), match="short form")


def test_unknown_plain_name_still_lists_methods():
    config_error("method", "nope", lambda: build_method("nope"), match=r"unknown method.*'crs'")


# --- 7. Pipeline --------------------------------------------------------------------------
def test_pipeline_takes_method_objects():
    config_error("method[0]", "crs", lambda: Pipeline(["crs"]), match="build_method")
    config_error("method[1]", {"name": "crs"}, lambda: Pipeline([ReluMask(), {"name": "crs"}]))


@pytest.mark.parametrize("methods", [CRS(), "crs", None, 3])
def test_pipeline_refuses_a_non_list(methods):
    config_error("method", methods, lambda: Pipeline(methods), match="make_pipeline")


def test_pipeline_refuses_empty():
    config_error("method", [], lambda: Pipeline([]), match="no method given")


def test_batch_crs_with_relu_mask_is_refused_at_construction():
    config_error("method", ["relu_mask", "batch_crs"], lambda: ApproxBackward(["relu_mask", "batch_crs"]),
                 match="removes dead samples")
    config_error("method", ["batch_crs", "relu_mask"], lambda: Pipeline([BatchCRS(), ReluMask()]))
    assert Pipeline([ReluMask(), CRS()]).methods[0].name == "relu_mask"  # a mask with crs composes


# --- 8. unhashable choices ----------------------------------------------------------------
def test_unhashable_choices():
    config_error("crs.grads", ["both"], lambda: CRS(grads=["both"]), match="use one of")
    config_error("model", ["x"], lambda: build_model(["x"]), match="unknown model")
    config_error("model", ["x"], lambda: ImageClassifier(model=["x"]))


# --- 9. classifier learning rate, choices printed as lists --------------------------------
@pytest.mark.parametrize("lr", ["a", None, True, 0.0, -1, float("nan")])
def test_classifier_lr(lr):
    config_error("lr", lr, lambda: ImageClassifier(lr=lr), match="positive number")


def test_choices_are_printed_as_lists():
    config_error("lr_schedule", "step", lambda: ImageClassifier(lr_schedule="step"),
                 match=r"use one of \['cosine', 'onecycle', 'none'\]")
    config_error("split", "test", lambda: ImageFolderDataset("/nonexistent", split="test"),
                 match=r"use one of \['train', 'val'\]")


# --- 10. data modules ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_data_module_seeds(seed):
    config_error("seed", seed, lambda: CIFAR10DataModule("data", seed=seed))
    config_error("seed", seed, lambda: ImageNetDataModule(synthetic=True, seed=seed))


@pytest.mark.parametrize("data_dir", [None, 3, ["data"]])
def test_data_dirs(data_dir):
    config_error("data_dir", data_dir, lambda: CIFAR10DataModule(data_dir), match="folder path")
    config_error("data_dir", data_dir, lambda: ImageNetDataModule(data_dir=data_dir, synthetic=data_dir is not None))


# --- 11. mappings for method and sample_ratio in LightningCLI / jsonargparse --------------
def test_jsonargparse_accepts_mappings_and_class_paths():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ApproxBackward, "cb")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    for init, expected in [
        ({"method": {"name": "crs", "sample_ratio": 0.25}}, [CRS(sample_ratio=0.25)]),
        ({"method": ["relu_mask", {"name": "crs", "sample_ratio": 0.25}]}, [ReluMask(), CRS(sample_ratio=0.25)]),
        ({"method": "crs", "sample_ratio": {"type": "constant", "value": 0.3}}, [CRS(sample_ratio=0.3)]),
        ({"method": {"class_path": "lightning_approx.methods.CRS", "init_args": {"sample_ratio": 0.4}}},
         [CRS(sample_ratio=0.4)]),
        ({"method": "crs", "sample_ratio": {"class_path": "lightning_approx.schedules.Constant",
                                            "init_args": {"value": 0.6}}}, [CRS(sample_ratio=0.6)]),
    ]:
        cfg = parser.parse_object({"cb": init})
        callback = instantiate(cfg).cb
        assert callback.pipeline.methods == expected, init


# --- 12. DDP keyword arguments ------------------------------------------------------------
def test_strategy_refuses_unknown_ddp_kwargs():
    config_error("bogus_kw", 1, lambda: ApproxDDPStrategy(bogus_kw=1), match="find_unused_parameters")
    config_error("device_ids", [0], lambda: ApproxDDPStrategy(device_ids=[0]))  # Lightning sets it


def test_strategy_passes_ddp_kwargs_on():
    strategy = ApproxDDPStrategy(output_device=None, check_reduction=False, ddp_comm_hook=None)
    assert strategy._ddp_kwargs["check_reduction"] is False
