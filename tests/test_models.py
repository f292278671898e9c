"""The model zoo: parameter counts, output shapes, naming and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_approx.errors import ConfigError
from lightning_approx.models import MODELS, build_model, resnet18, resnet20, resnet50, vgg19_bn

CIFAR_MODELS = ["resnet20", "resnet32", "resnet56", "vgg19_bn"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "count"), [
    ("resnet20", 269_722),   # He et al. 2016, table 6: 0.27M
    ("resnet32", 464_154),   # 0.46M
    ("resnet56", 853_018),   # 0.85M
])
def test_cifar_resnet_parameter_counts(name, count):
    assert n_params(build_model(name, num_classes=10)) == count


@pytest.mark.parametrize(("ctor", "count", "state_keys"), [
    (resnet18, 11_689_512, 122),  # torchvision's counts, and its state-dict length
    (resnet50, 25_557_032, 320),
])
def test_imagenet_resnets_match_torchvision(ctor, count, state_keys):
    model = ctor()
    assert n_params(model) == count
    keys = model.state_dict().keys()
    assert len(keys) == state_keys
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"} <= set(keys)


def test_option_a_shortcuts_have_no_parameters():
    model = resnet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # 1 stem + 9 blocks x 2, no projection convs
    assert all(m.kernel_size == (3, 3) for m in convs)
    x = torch.randn(2, 16, 8, 8)
    out = model.layer2[0].shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_forward(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_vgg19_bn_structure():
    model = vgg19_bn()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert model.features.conv1 is convs[0] and convs[0].in_channels == 3
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


@pytest.mark.parametrize("ctor", [resnet18, resnet50])
def test_imagenet_resnets_forward_224(ctor):
    model = ctor(num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


@pytest.mark.parametrize("name", list(MODELS))
def test_stem_and_classifier_names(name):
    model = build_model(name)
    named = dict(model.named_modules())
    stem = named["features.conv1" if name.startswith("vgg") else "conv1"]
    head = named["classifier" if name.startswith("vgg") else "fc"]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 3
    assert isinstance(head, nn.Linear)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert named[convs[0]] is stem and named[linears[-1]] is head  # first conv, last linear


@pytest.mark.parametrize(("name", "relus"), [("resnet20", 19), ("vgg19_bn", 16)])
def test_every_relu_is_its_own_module_called_once(name, relus):
    model = build_model(name)
    calls: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            assert not m.inplace
            m.register_forward_hook(lambda mod, i, o: calls.__setitem__(mod, calls.get(mod, 0) + 1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == relus and set(calls.values()) == {1}


def test_kaiming_initialisation():
    model = build_model("resnet56")
    w = model.layer3[4].conv1.weight
    expected = math.sqrt(2.0 / (w.shape[1] * 9))
    assert abs(w.std().item() / expected - 1) < 0.05
    assert torch.all(model.layer3[4].bn1.weight == 1) and torch.all(model.layer3[4].bn1.bias == 0)


def test_resnet20_trains():
    model = build_model("resnet20")
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_build_model_rejects_unknown_names():
    with pytest.raises(ConfigError) as e:
        build_model("resnet21")
    for name in MODELS:
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet20", num_classes=0)


def test_build_model_default_classes():
    assert build_model("resnet20").fc.out_features == 10
    assert build_model("resnet18").fc.out_features == 1000
    assert build_model("resnet18", num_classes=10).fc.out_features == 10
