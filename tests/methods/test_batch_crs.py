"""batch_crs: one draw of rows for the whole network, exact on the drawn rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_approx import ConfigError, approximate, restore
from lightning_approx.methods import BatchCRS
from lightning_approx.methods.batch_crs import _BatchNormRows, undrawn
from lightning_approx.ops.sampling import draw_rows
from lightning_approx.surgery import patched_sites


class Net(nn.Module):
    def __init__(self, norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def _grads(model, x, dy):
    model.zero_grad(set_to_none=True)
    model(x).backward(dy)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("n", "k"), [(8, 4), (8, 2), (10, 3), (7, 7)])
def test_every_row_is_drawn_with_probability_k_over_n(n, k):
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    draws = 3000
    for _ in range(draws):
        rows = draw_rows(n, k, gen)
        picked = [i for r in rows for i in range(n)[r]]
        assert len(picked) == len(set(picked)) == k
        assert sorted(picked + [i for r in undrawn(rows, n) for i in range(n)[r]]) == list(range(n))
        counts[picked] += 1
    # Binomial(draws, k/n) per row: 5 standard deviations.
    p = k / n
    assert torch.all((counts / draws - p).abs() <= 5 * (p * (1 - p) / draws) ** 0.5 + 1e-9)


def test_gradient_is_the_exact_one_of_the_drawn_rows():
    """Without batch norm the estimate is exactly backprop of (n/k) * the drawn rows' gradient."""
    torch.manual_seed(0)
    model = Net().double()
    exact_model = Net().double()
    exact_model.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    dy = torch.randn(8, 4, dtype=torch.float64)
    method = BatchCRS(sample_ratio=0.25)
    approximate(model, method, exclude=None)
    for _ in range(4):
        got = _grads(model, x, dy)
        rows, n = method._active
        masked = torch.zeros_like(dy)
        for r in rows:
            masked[r] = dy[r] * n / 2
        for g, e in zip(got, _grads(exact_model, x, masked), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(s.work.computed * 4 == s.work.exact for s in patched_sites(model))


def test_batch_norm_makes_it_biased():
    """With training-mode batch norm the undrawn rows' share of the statistics' gradient is
    dropped: the mean of many draws misses the exact gradient (by a bounded amount here)."""
    torch.manual_seed(0)
    model = Net(norm=True).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    dy = torch.randn(8, 4, dtype=torch.float64)
    exact = torch.cat([g.flatten() for g in _grads(model, x, dy)])
    approximate(model, BatchCRS(sample_ratio=0.5), exclude=None)
    mean = torch.stack([torch.cat([g.flatten() for g in _grads(model, x, dy)]) for _ in range(400)]).mean(0)
    rel = ((mean - exact).norm() / exact.norm()).item()
    assert 1e-6 < rel < 0.3


def test_eval_and_no_grad_are_untouched():
    model = Net()
    approximate(model, "batch_crs", exclude=None)
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        assert model(x).grad_fn is None
    model.eval()
    out = model(x)
    assert "DrawnRows" not in type(out.grad_fn).__name__


def test_restore_and_repatch_remove_the_hook():
    model = Net()
    approximate(model, "batch_crs", exclude=None)
    approximate(model, "batch_crs", exclude=None)
    assert len(model.fc._forward_hooks) == 1
    restore(model)
    assert len(model.fc._forward_hooks) == 0 and "_approx_hooks" not in model.__dict__


def test_unknown_output_layer_is_refused_and_nothing_stays_patched():
    model = Net()
    with pytest.raises(ConfigError, match=r"batch_crs.output='head'.*is not a Conv2d/Linear layer"):
        approximate(model, BatchCRS(output="head"), exclude=None)
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.Identity, Net) for m in model.modules())


def test_a_loss_not_from_the_output_layer_is_an_error():
    model = Net()
    approximate(model, BatchCRS(output="fc"), exclude=None)
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(RuntimeError, match="ran its backward without a draw from output layer 'fc'"):
        model.conv2(model.conv1(x)).sum().backward()


def test_a_layer_whose_rows_are_not_the_batch_is_an_error():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 5)
            self.fc = nn.Linear(5 * 3, 2)

        def forward(self, x):  # (B, 3, 5): proj sees B * 3 rows
            return self.fc(self.proj(x).flatten(1))

    model = Tokens()
    approximate(model, "batch_crs", exclude=None)
    with pytest.raises(RuntimeError, match="sees 12 rows but the output has 4"):
        model(torch.randn(4, 3, 5)).sum().backward()


@pytest.mark.parametrize("output", [3, ""])
def test_bad_output_setting(output):
    with pytest.raises(ConfigError, match=r"batch_crs\.output"):
        BatchCRS(output=output)


def test_bad_batch_norm_setting():
    with pytest.raises(ConfigError, match=r"batch_crs\.batch_norm='fold'.*use one of \['drop', 'scale'\]"):
        BatchCRS(batch_norm="fold")


def test_relu_mask_is_refused_and_nothing_stays_patched():
    model = Net()
    with pytest.raises(ConfigError, match="'relu_mask' removes dead samples"):
        approximate(model, ["relu_mask", "batch_crs"], exclude=None)
    assert not patched_sites(model) and "_approx_hooks" not in model.__dict__


def test_the_output_may_be_modified_in_place():
    torch.manual_seed(0)
    model, exact_model = Net().double(), Net().double()
    exact_model.load_state_dict(model.state_dict())
    approximate(model, BatchCRS(sample_ratio=1.0 / 2), exclude=None)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    out = model(x)
    out /= 2  # e.g. a temperature
    out.sum().backward()
    rows, n = model.fc.approx_site.pipeline.methods[0]._active
    dy = torch.zeros(4, 4, dtype=torch.float64)
    for r in rows:
        dy[r] = 0.5 * n / 2
    exact_model(x).backward(dy)
    for p, e in zip(model.parameters(), exact_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e.grad, rtol=1e-10, atol=1e-12)


class _NoDraw:
    _active = None  # what _BatchNormRows reads: no draw, so every row counts


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_backward_without_a_draw_is_exact(affine, channels_last):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, affine=affine).double()
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    x1 = x.clone().requires_grad_()
    exact = torch.autograd.grad(bn(x1), [x1, *params], dy)
    x2 = x.clone().requires_grad_()
    mean, var = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    out = _BatchNormRows.apply(x2, bn.weight, bn.bias, mean, var, 0.1, bn.eps, _NoDraw())
    torch.testing.assert_close(out, bn(x), rtol=1e-10, atol=1e-12)
    for g, e in zip(torch.autograd.grad(out, [x2, *params], dy), exact, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_running_statistics_match_nn(momentum):
    torch.manual_seed(0)
    model, plain = Net(norm=True), Net(norm=True)
    for m in (model, plain):
        m.bn.momentum = momentum
    plain.load_state_dict(model.state_dict())
    approximate(model, BatchCRS(batch_norm="scale"), exclude=None)
    assert type(model.bn) is not nn.BatchNorm2d  # the sampled training forward is the swapped one
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4)
        model(x).sum().backward()
        plain(x).sum().backward()
    for key, value in plain.bn.state_dict().items():
        torch.testing.assert_close(model.bn.state_dict()[key], value)


def test_restore_puts_batch_norm_back():
    model = Net(norm=True)
    keys = list(model.state_dict())
    approximate(model, BatchCRS(batch_norm="scale"), exclude=None)
    restore(model)
    assert type(model.bn) is nn.BatchNorm2d and "_batch_crs" not in model.bn.__dict__
    assert list(model.state_dict()) == keys


def test_other_batch_norms_are_named_in_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"batch norm layers \['1'\] are not plain nn.BatchNorm2d"):
        approximate(model, BatchCRS(batch_norm="scale"), exclude=None)


def test_drop_leaves_batch_norm_alone():
    model = Net(norm=True)
    approximate(model, "batch_crs", exclude=None)
    assert type(model.bn) is nn.BatchNorm2d
