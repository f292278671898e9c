"""grad_prune: unbiased stochastic pruning, the realized sparsity the normal model predicts,
and the zeros counted as zero work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_approx import ConfigError, approximate
from lightning_approx.methods import GradPrune
from lightning_approx.ops.prune import prune_threshold, stochastic_prune
from lightning_approx.surgery import patched_sites
from tests.statistics import assert_unbiased


def expected_gaussian_sparsity(p: float) -> float:
    """Zeros produced from N(0, s^2) entries: P(|g| < tau) - E[|g|/tau; |g| < tau]."""
    z = torch.special.ndtri(torch.tensor((1 + p) / 2, dtype=torch.float64)).item()
    return p - math.sqrt(2 / math.pi) * (1 - math.exp(-z * z / 2)) / z


def test_zero_sparsity_is_the_identity():
    g = torch.randn(100)
    out, nnz = stochastic_prune(g, 0.0, None)
    assert out is g and nnz == 100


def test_threshold_follows_the_normal_model():
    g = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) * 3.0
    tau = float(prune_threshold(g, 0.8))
    assert (g.abs() < tau).float().mean().item() == pytest.approx(0.8, abs=0.005)


@pytest.mark.parametrize("p", [0.5, 0.8, 0.9])
def test_realized_sparsity_on_gaussian_gradients(p):
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    out, nnz = stochastic_prune(g, p, torch.Generator().manual_seed(2))
    realized = 1 - nnz / g.numel()
    assert realized == pytest.approx(expected_gaussian_sparsity(p), abs=0.005)
    tau = float(prune_threshold(g, p))
    small = g.abs() < tau
    assert torch.equal(out[~small], g[~small])  # large entries are kept as they are
    rounded = out[small].abs()
    assert torch.all((rounded == 0) | torch.isclose(rounded, torch.tensor(tau)))


def test_non_gaussian_gradients_drift_from_the_prediction():
    """The threshold assumes normal gradients; Laplace ones (sharper peak) give more zeros."""
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    _, nnz = stochastic_prune(laplace, 0.9, torch.Generator().manual_seed(0))
    realized = 1 - nnz / laplace.numel()
    assert expected_gaussian_sparsity(0.9) + 0.05 < realized < 0.75  # measured 0.65 (see the card)


def test_pruned_gradient_is_unbiased():
    g = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    assert_unbiased(lambda: stochastic_prune(g, 0.9, gen)[0], g, samples=2000)


def test_layer_logs_realized_sparsity_and_zero_work():
    layer = nn.Conv2d(4, 6, 3, padding=1)
    method = GradPrune(sparsity=0.9)
    approximate(layer, [method], exclude=None)
    x = torch.randn(8, 4, 8, 8, requires_grad=True)
    layer(x).backward(torch.randn(8, 6, 8, 8))
    realized = method.metrics()["realized_sparsity"]
    assert realized == pytest.approx(expected_gaussian_sparsity(0.9), abs=0.05)
    work = patched_sites(layer)[0].work
    assert work.computed == work.exact  # dense kernels: nothing skipped
    assert work.zero == pytest.approx(realized * work.exact, rel=1e-3)
    method.reset_metrics()
    assert method.metrics() == {}


def test_linear_layers_are_left_alone_by_default():
    layer = nn.Linear(5, 4)
    approximate(layer, "grad_prune", sparsity=0.9, exclude=None)
    x = torch.randn(3, 5, requires_grad=True)
    dy = torch.randn(3, 4)
    layer(x).backward(dy)
    torch.testing.assert_close(x.grad, dy @ layer.weight.detach())


@pytest.mark.parametrize(("kwargs", "field"), [({"sparsity": 1.0}, "grad_prune.sparsity"),
                                               ({"sparsity": -0.1}, "grad_prune.sparsity"),
                                               ({"apply_to_linear": "yes"}, "grad_prune.apply_to_linear")])
def test_bad_values_fail_at_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        GradPrune(**kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)
