"""forward_sampling: the training op itself runs on k sampled input channels (Adelman et al.).

Exact at ratio 1.0 and in evaluation; the crs selection gives an unbiased layer output and
topk a measured bias; gradients reach only the sampled channels; the work is counted when
the backward runs; and it refuses to compose with methods that change the backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_approx.layers as layers
import lightning_approx.methods.forward_sampling as forward_sampling
from lightning_approx import approximate, restore
from lightning_approx.errors import ConfigError
from lightning_approx.methods import ForwardSampling, Pipeline, build_method
from lightning_approx.surgery import make_pipeline, patched_sites
from tests.statistics import assert_unbiased, looks_biased, mean_over_windows

CONV_CONFIGS = [
    dict(in_channels=6, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=6, out_channels=5, kernel_size=4, padding="same"),
    dict(in_channels=6, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
]
IDS = ["plain", "strided", "grouped", "same", "reflect"]


class _ThroughMethod(Pipeline):
    is_exact = False  # run the method's own forward even at ratio 1.0


def _grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(x).backward(dy)
    return [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("selection", ["topk", "crs", "uniform"])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=IDS)
def test_conv_ratio_one_is_exact(cfg, selection):
    layer = nn.Conv2d(**cfg).double()
    x = torch.randn(3, cfg["in_channels"], 7, 8, dtype=torch.float64)
    y = layer(x).detach()
    dy = torch.randn_like(y)
    exact = _grads(layer, x, dy)
    approximate(layer, _ThroughMethod([ForwardSampling(1.0, selection=selection)]), exclude=None)
    assert torch.equal(layer(x), y)
    for e, p in zip(exact, _grads(layer, x, dy), strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6)])
def test_linear_ratio_one_is_exact(shape):
    layer = nn.Linear(6, 4).double()
    x = torch.randn(*shape, dtype=torch.float64)
    dy = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    exact = _grads(layer, x, dy)
    approximate(layer, _ThroughMethod([ForwardSampling(1.0)]), exclude=None)
    for e, p in zip(exact, _grads(layer, x, dy), strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


def _uneven_input(n: int, c: int, *spatial: int) -> torch.Tensor:
    # Channels of very different norms, so the importance weights matter.
    scale = torch.linspace(0.2, 3.0, c, dtype=torch.float64).view(1, c, *([1] * len(spatial)))
    return torch.randn(n, c, *spatial, dtype=torch.float64) * scale


@pytest.mark.parametrize("cfg", [CONV_CONFIGS[0], CONV_CONFIGS[2]], ids=["plain", "grouped"])
def test_conv_crs_forward_is_unbiased(cfg):
    layer = nn.Conv2d(**cfg).double()
    x = _uneven_input(2, cfg["in_channels"], 5, 5)
    exact = layer(x).detach()
    approximate(layer, ForwardSampling(0.5, selection="crs"), exclude=None, seed=3)
    assert_unbiased(lambda: layer(x).detach(), exact, samples=800)


def test_linear_crs_forward_is_unbiased():
    layer = nn.Linear(6, 4).double()
    x = _uneven_input(5, 6)
    exact = layer(x).detach()
    approximate(layer, ForwardSampling(0.5, selection="crs"), exclude=None)
    assert_unbiased(lambda: layer(x).detach(), exact, samples=1500)


@pytest.mark.parametrize("cfg", [CONV_CONFIGS[1], CONV_CONFIGS[2]], ids=["strided", "grouped"])
@pytest.mark.parametrize("ratio", [0.5, 0.6], ids=["divides", "wraps"])
def test_conv_uniform_forward_is_unbiased(monkeypatch, cfg, ratio):
    """Exactly unbiased: the mean of the sampled forward over every window is the exact output,
    and so is the mean of its weight gradient (the forward is linear in the weight)."""
    layer = nn.Conv2d(**cfg).double()
    x = _uneven_input(2, cfg["in_channels"], 6, 6)
    exact = layer(x).detach()
    dy = torch.randn_like(exact)
    exact_dw = torch.autograd.grad(layer(x), layer.weight, dy)[0]
    cin_g = cfg["in_channels"] // cfg.get("groups", 1)
    approximate(layer, ForwardSampling(ratio, selection="uniform"), exclude=None)
    k = math.ceil(ratio * cin_g)
    mean_y = mean_over_windows(monkeypatch, lambda: layer(x).detach(), cin_g, k)
    mean_dw = mean_over_windows(monkeypatch,
                                lambda: torch.autograd.grad(layer(x), layer.weight, dy)[0], cin_g, k)
    torch.testing.assert_close(mean_y, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_dw, exact_dw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.5, 0.6], ids=["divides", "wraps"])
def test_linear_uniform_forward_is_unbiased(monkeypatch, ratio):
    layer = nn.Linear(6, 4).double()
    x = _uneven_input(5, 6)
    exact = layer(x).detach()
    approximate(layer, ForwardSampling(ratio, selection="uniform"), exclude=None)
    mean_y = mean_over_windows(monkeypatch, lambda: layer(x).detach(), 6, math.ceil(ratio * 6))
    torch.testing.assert_close(mean_y, exact, rtol=1e-10, atol=1e-12)


def test_uniform_runs_on_one_window_without_scores(monkeypatch):
    """The uniform forward computes no norms, and runs on k neighbouring channels (cyclically)."""
    def no_norms(*_):
        raise AssertionError("selection='uniform' must not compute scores")

    monkeypatch.setattr(forward_sampling.kops, "plane_sq_norms", no_norms)
    layer = nn.Conv2d(8, 4, 3, padding=1).double()
    approximate(layer, ForwardSampling(0.375, selection="uniform"), exclude=None, seed=1)
    for _ in range(5):
        layer.zero_grad()
        layer(_uneven_input(2, 8, 5, 5)).sum().backward()
        kept = (layer.weight.grad.abs().sum((0, 2, 3)) > 0).nonzero().flatten().tolist()
        assert len(kept) == 3
        assert any(kept == sorted((s + i) % 8 for i in range(3)) for s in range(8))


def test_uniform_keeps_channels_last(monkeypatch):
    """The same op on either layout (the window forced), and the layout is kept."""
    monkeypatch.setattr(layers, "draw_rows", lambda n, k, gen: (slice(3, 4), slice(0, 1)))
    layer = nn.Conv2d(4, 6, 3, padding=1).double()
    approximate(layer, ForwardSampling(0.5, selection="uniform"), exclude=None)
    x = _uneven_input(3, 4, 6, 6)
    dy = torch.randn(3, 6, 6, 6, dtype=torch.float64)
    contiguous = _grads(layer, x, dy)
    x_cl, dy_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    assert layer(x_cl).is_contiguous(memory_format=torch.channels_last)
    channels_last = _grads(layer, x_cl, dy_cl)
    assert channels_last[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(contiguous, channels_last, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(contiguous[0].abs().sum((0, 2, 3)) > 0, torch.tensor([True, False, False, True]))


def test_uniform_selection_is_recorded_for_the_communication_hook(monkeypatch):
    monkeypatch.setattr(layers, "draw_rows", lambda n, k, gen: (slice(3, 4), slice(0, 1)))
    layer = nn.Conv2d(8, 6, 3, padding=1, groups=2)
    method = ForwardSampling(0.5, selection="uniform")
    approximate(layer, method, exclude=None)
    method.track_selections()
    layer(torch.randn(2, 8, 5, 5)).sum().backward()
    mask = method.take_selection(patched_sites(layer)[0].name)
    assert mask.tolist() == [[True, False, False, True]] * 2


def test_topk_forward_has_a_measured_bias():
    layer = nn.Conv2d(6, 5, 3, padding=1).double()
    x = _uneven_input(2, 6, 5, 5)
    exact = layer(x).detach()
    approximate(layer, ForwardSampling(0.5, selection="topk"), exclude=None)
    out = layer(x).detach()
    assert torch.equal(layer(x).detach(), out)  # deterministic
    relative_bias = float((out - exact).norm() / exact.norm())
    assert relative_bias > 1e-3
    assert looks_biased(lambda: layer(x).detach(), exact, samples=20)


@pytest.mark.parametrize("selection", ["topk", "crs", "uniform"])
def test_conv_gradients_reach_only_sampled_channels(selection):
    layer = nn.Conv2d(8, 5, 3, padding=1).double()
    x = _uneven_input(3, 8, 6, 6).requires_grad_(True)
    approximate(layer, ForwardSampling(0.25, selection=selection), exclude=None)
    layer(x).sum().backward()
    touched_w = layer.weight.grad.abs().sum((0, 2, 3)) > 0
    touched_x = x.grad.abs().sum((0, 2, 3)) > 0
    assert torch.equal(touched_w, touched_x)
    assert 1 <= int(touched_w.sum()) <= 2  # k = ceil(0.25 * 8) = 2 (crs may draw one twice)
    assert layer.bias.grad is not None and torch.all(layer.bias.grad != 0)
    if selection == "topk":  # the two largest ||W[:, c]|| * ||x[:, c]||
        scores = torch.linalg.vector_norm(layer.weight.detach(), dim=(0, 2, 3)) * torch.linalg.vector_norm(
            x.detach(), dim=(0, 2, 3))
        assert set(touched_w.nonzero().flatten().tolist()) == set(scores.topk(2).indices.tolist())


@pytest.mark.parametrize("groups", [1, 2])
def test_channels_last_gives_the_same_op_and_keeps_the_layout(groups):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1, groups=groups).double()
    approximate(layer, ForwardSampling(0.5), exclude=None)
    x = _uneven_input(3, 8, 6, 6)
    dy = torch.randn(3, 6, 6, 6, dtype=torch.float64)
    contiguous = _grads(layer, x, dy)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    channels_last = _grads(layer, x.contiguous(memory_format=torch.channels_last),
                           dy.contiguous(memory_format=torch.channels_last))
    for a, b in zip(contiguous, channels_last, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("selection", ["topk", "uniform"])
def test_grouped_conv_samples_within_each_group(selection):
    layer = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    x = _uneven_input(2, 8, 5, 5)
    approximate(layer, ForwardSampling(0.5, selection=selection), exclude=None)
    layer(x).sum().backward()
    # Rows g*3..g*3+2 of the weight belong to group g; each group keeps k = 2 of its 4 columns.
    per_group = [int((layer.weight.grad[g * 3:(g + 1) * 3].abs().sum((0, 2, 3)) > 0).sum()) for g in range(2)]
    assert per_group == [2, 2]


def test_linear_gradients_reach_only_sampled_features():
    layer = nn.Linear(10, 3).double()
    x = _uneven_input(4, 10).requires_grad_(True)
    approximate(layer, ForwardSampling(0.3), exclude=None)
    layer(x).sum().backward()
    assert int((layer.weight.grad.abs().sum(0) > 0).sum()) == 3
    assert torch.equal(layer.weight.grad.abs().sum(0) > 0, x.grad.abs().sum(0) > 0)


def test_work_is_counted_when_backward_runs():
    layer = nn.Conv2d(8, 4, 3, padding=1)
    approximate(layer, ForwardSampling(0.25), exclude=None)
    site = patched_sites(layer)[0]
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = layer(x)
    assert site.work.exact == 0  # nothing ran yet
    y.sum().backward()
    macs = 2 * 4 * 25 * 8 * 9
    assert site.work.exact == 2 * macs and site.work.computed == 2 * macs // 4
    site.work.reset()
    layer(torch.randn(2, 8, 5, 5)).sum().backward()  # input needs no gradient: dW only
    assert site.work.exact == macs and site.work.computed == macs // 4


def test_eval_no_grad_and_restore_are_exact():
    layer = nn.Conv2d(6, 4, 3)
    x = torch.randn(2, 6, 7, 7)
    ref = layer(x).detach()
    approximate(layer, ForwardSampling(0.3), exclude=None)
    assert not torch.equal(layer(x).detach(), ref)  # training forward is sampled
    with torch.no_grad():
        assert torch.equal(layer(x), ref)
    layer.eval()
    assert torch.equal(layer(x).detach(), ref)
    layer.train()
    restore(layer)
    assert type(layer) is nn.Conv2d and torch.equal(layer(x).detach(), ref)


def test_sample_ratio_schedule_and_config_round_trip():
    method = build_method({"name": "forward_sampling", "sample_ratio": 0.25, "selection": "crs"})
    assert method == ForwardSampling(0.25, selection="crs")
    assert build_method(method.to_config()) == method
    with pytest.raises(ConfigError, match="selection"):
        ForwardSampling(0.5, selection="random")
    with pytest.raises(ConfigError, match="Fix:"):
        ForwardSampling(0.0)


@pytest.mark.parametrize("other", ["crs", "topk", "relu_mask"])
def test_composition_with_backward_methods_is_refused(other):
    with pytest.raises(ConfigError, match="Fix:") as err:
        make_pipeline(["forward_sampling", other])
    assert err.value.field == "method"
    assert "forward_sampling" in str(err.value) and other in str(err.value)


def test_trains_a_small_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 4))
    approximate(model, "forward_sampling", sample_ratio=0.5, exclude=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
