"""approximate / restore keep the model's identity: parameters, keys, optimizer, isinstance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_approx import ConfigError, approximate, restore
from lightning_approx.layers import ApproxConv2d, ApproxLinear
from lightning_approx.surgery import patched_sites


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
        self.hidden = nn.Linear(16, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x))).mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


def test_default_excludes_stem_and_classifier():
    model = Net()
    names = approximate(model, "crs", sample_ratio=0.5)
    assert names == ["body.0", "body.2", "hidden"]
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.body[0], ApproxConv2d) and isinstance(model.hidden, ApproxLinear)


def test_patch_keeps_parameters_keys_and_isinstance():
    model = Net()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    approximate(model, "crs", sample_ratio=0.5, exclude=None)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, nn.Conv2d) for m in (model.stem, model.body[0], model.body[2]))
    assert isinstance(model.fc, nn.Linear)
    # the optimizer steps the same tensors
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    before = model.body[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.body[0].weight)
    assert restore(model) == ["stem", "body.0", "body.2", "hidden", "fc"]
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(hasattr(m, "approx_site") for m in model.modules())


def test_patch_keeps_device_dtype_and_hooks():
    model = Net().double()
    calls = []
    model.body[0].register_forward_hook(lambda *a: calls.append(1))
    approximate(model, "crs", sample_ratio=0.5)
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64 and model.body[0].weight.dtype == torch.float64 and calls == [1]


def test_patching_twice_replaces_the_method_without_wrapping():
    model = Net()
    approximate(model, "crs", sample_ratio=0.5)
    first = patched_sites(model)
    names = approximate(model, "crs", sample_ratio=0.25)
    assert names == ["body.0", "body.2", "hidden"]
    assert type(model.body[0]) is ApproxConv2d
    assert [s.pipeline.values()["crs.sample_ratio"] for s in patched_sites(model)] == [0.25] * 3
    assert len(first) == 3
    restore(model)
    assert type(model.body[0]) is nn.Conv2d



def test_repatching_with_a_narrower_selection_restores_the_layers_left_out():
    model = Net()
    approximate(model, "crs", exclude=None)
    assert approximate(model, "grad_prune") == ["body.0", "body.2", "hidden"]
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear
    assert not hasattr(model.stem, "approx_site") and not hasattr(model.fc, "approx_site")
    assert {s.name: [m.name for m in s.pipeline.methods] for s in patched_sites(model)} == {
        "body.0": ["grad_prune"], "body.2": ["grad_prune"], "hidden": ["grad_prune"]}


class BNNet(Net):
    def __init__(self):
        super().__init__()
        self.body.insert(1, nn.BatchNorm2d(8))


@pytest.mark.parametrize("first", ["crs", "batch_crs", None])
def test_a_failed_repatch_leaves_the_model_as_it_was(first):
    from lightning_approx.methods import BatchCRS

    model = BNNet()
    if first is not None:
        approximate(model, first if first == "crs" else BatchCRS(batch_norm="scale"), exclude="stem")
    classes = {n: type(m) for n, m in model.named_modules()}
    sites = {n: m.__dict__.get("approx_site") for n, m in model.named_modules()}
    hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    with pytest.raises(ConfigError, match=r"batch_crs\.output='nope'"):
        approximate(model, BatchCRS(output="nope"), exclude=None)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(m.__dict__.get("approx_site") is sites[n] for n, m in model.named_modules())
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks
    model(torch.randn(4, 3, 8, 8)).sum().backward()  # still trains as before
    restore(model)
    assert patched_sites(model) == [] and type(model.body[1]) is nn.BatchNorm2d

def test_restore_unpatched_model_is_a_no_op():
    model = Net()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    assert restore(model) == []
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_exclude_patterns_and_auto_combine():
    model = Net()
    assert approximate(model, "crs", exclude=["auto", "body.*"]) == ["hidden"]
    restore(model)
    assert approximate(model, "crs", exclude="hidden") == ["stem", "body.0", "body.2", "fc"]


def test_state_dict_round_trips_between_patched_and_exact():
    model, other = Net(), Net()
    approximate(model, "crs")
    other.load_state_dict(model.state_dict())
    model.load_state_dict(other.state_dict())
    x = torch.randn(2, 3, 8, 8)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))


def test_subclassed_layers_stay_exact_with_a_warning():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyConv(4, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match="stay exact"):
        names = approximate(model, "crs")
    assert names == ["2"] and type(model[1]) is MyConv


@pytest.mark.parametrize(
    ("kwargs", "field", "fix"),
    [
        ({"method": "crsx"}, "method", "use one of"),
        ({"method": "crs", "sample_ratio": 0.0}, "crs.sample_ratio", "(0, 1]"),
        ({"method": "crs", "sample_ratio": 1.5}, "crs.sample_ratio", "(0, 1]"),
        ({"method": "crs", "sample_ratio": "half"}, "crs.sample_ratio", "Fix:"),
        ({"method": "crs", "ratio": 0.5}, "crs.ratio", "sample_ratio"),
        ({"method": "crs", "exclude": ["nope.*"]}, "exclude[0]", "body.0"),
        ({"method": "crs", "exclude": "*"}, "exclude", "exclude fewer"),
        ({"method": "crs", "uniform_mix": 1.0}, "crs.uniform_mix", "[0, 1)"),
    ],
)
def test_bad_configuration_names_field_and_fix(kwargs, field, fix):
    with pytest.raises(ConfigError) as err:
        approximate(Net(), **kwargs)
    assert err.value.field == field
    assert fix in str(err.value) and "Fix:" in str(err.value)
