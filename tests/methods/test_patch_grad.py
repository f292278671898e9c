"""patch_grad: the vectorised patch gather equals a plain loop, "random" is unbiased,
"argmax" is biased, and only the selected convs' weight gradients change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_approx import ConfigError, approximate
from lightning_approx.methods import PatchGrad
from lightning_approx.ops.conv import ConvGeometry, conv2d_grad_weight
from lightning_approx.ops.patch import patch_positions, patch_weight_grad
from lightning_approx.surgery import patched_sites
from tests.statistics import assert_unbiased, looks_biased

CONFIGS = [dict(stride=1, padding=1, dilation=1, groups=1), dict(stride=2, padding=0, dilation=1, groups=1),
           dict(stride=1, padding=2, dilation=2, groups=1), dict(stride=2, padding=1, dilation=1, groups=2)]


def loop_reference(conv: nn.Conv2d, x, dy, pos, coef):
    """dW[c] = sum_n coef[n, c] * patch(x_n, pos[n, c]), one patch at a time."""
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    cout, cin_g, kh, kw = conv.weight.shape
    xp = F.pad(x, (pw, pw, ph, ph))
    wo = dy.shape[3]
    grad = torch.zeros_like(conv.weight)
    for n in range(x.shape[0]):
        for c in range(cout):
            oh, ow = divmod(int(pos[n, c]), wo)
            g = c // (cout // conv.groups)
            for i in range(kh):
                for j in range(kw):
                    patch = xp[n, g * cin_g:(g + 1) * cin_g, oh * sh + i * dh, ow * sw + j * dw]
                    grad[c, :, i, j] += coef[n, c] * patch
    return grad


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("variant", ["argmax", "random", "fixed"])
def test_vectorised_equals_loop(cfg, variant):
    conv = nn.Conv2d(4, 6, 3, **cfg).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    dy = torch.randn_like(conv(x))
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = patch_weight_grad(ConvGeometry.of(conv), x, dy, conv.weight.shape, variant, gen_a)
    pos, coef = patch_positions(dy, variant, gen_b)
    torch.testing.assert_close(got, loop_reference(conv, x, dy, pos, coef).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["argmax", "random", "fixed"])
def test_shape_dtype_and_memory_format(variant, dtype):
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(dtype)
    x = torch.randn(2, 4, 5, 5).to(dtype)
    dy = torch.randn(2, 6, 5, 5).to(dtype)
    geom = ConvGeometry.of(conv)
    got = patch_weight_grad(geom, x, dy, conv.weight.shape, variant, torch.Generator().manual_seed(0))
    assert got.shape == conv.weight.shape and got.dtype == dtype
    cl = patch_weight_grad(geom, x.contiguous(memory_format=torch.channels_last),
                           dy.contiguous(memory_format=torch.channels_last), conv.weight.shape, variant,
                           torch.Generator().manual_seed(0))
    torch.testing.assert_close(cl, got)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_argmax_picks_the_first_largest_gradient_and_sums_dy(memory_format):
    dy = torch.randn(2, 3, 4, 5)
    dy[0, 1] = 0  # a dead plane: every position ties
    dy[1, 2, 1, 3], dy[1, 2, 2, 0] = -9.0, 9.0  # |dy| ties: the first in row-major order wins
    dy = dy.contiguous(memory_format=memory_format)
    pos, coef = patch_positions(dy, "argmax", None)
    assert torch.equal(pos, dy.abs().flatten(2).argmax(-1))
    assert pos[0, 1] == 0 and pos[1, 2] == 1 * 5 + 3
    torch.testing.assert_close(coef, dy.sum((2, 3)))


def test_a_nan_in_dy_makes_its_channel_nan_as_the_exact_product_does():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, dy = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    dy[1, 2, 1, 1] = dy[1, 2, 3, 0] = float("nan")
    grad = patch_weight_grad(ConvGeometry.of(conv), x, dy, conv.weight.shape, "argmax", None)
    assert grad[2].isnan().all() and not grad[[0, 1, 3]].isnan().any()


def _grad_draws(variant):
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn_like(conv(x))
    geom = ConvGeometry.of(conv)
    exact = conv2d_grad_weight(geom, x, conv.weight, dy)
    gen = torch.Generator().manual_seed(0)
    return (lambda: patch_weight_grad(geom, x, dy, conv.weight.shape, variant, gen)), exact


def test_random_variant_is_unbiased():
    draw, exact = _grad_draws("random")
    assert_unbiased(draw, exact, samples=3000)


@pytest.mark.parametrize("variant", ["argmax", "fixed"])
def test_deterministic_variants_are_biased(variant):
    draw, exact = _grad_draws(variant)
    assert looks_biased(draw, exact, samples=10)


def test_only_selected_convs_change_and_input_grads_stay_exact():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 1))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    dy = torch.randn(2, 4, 6, 6)
    model(x).backward(dy)
    exact = [p.grad.clone() for p in model.parameters()]
    exact_x = x.grad.clone()
    x.grad = None
    model.zero_grad()
    approximate(model, PatchGrad(every=2), exclude=None)  # indices 0 and 2: the 3x3 at 0, the 1x1 at 2
    model(x).backward(dy)
    grads = [p.grad for p in model.parameters()]
    assert not torch.allclose(grads[0], exact[0])  # conv 0 weight: approximated
    for i in (1, 2, 3, 4, 5):  # conv 0 bias, conv 1 (index 1), conv 2 (1x1: not eligible)
        torch.testing.assert_close(grads[i], exact[i])
    torch.testing.assert_close(x.grad, exact_x)


def test_layers_left_exact_run_the_plain_op_and_count_their_work():
    """The convs patch_grad does not approximate skip the custom op (autograd's own backward),
    unless a fidelity probe is due; their work still counts as computed in full."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    approximate(model, PatchGrad(every=2), exclude=None)  # approximates indices 0 and 2
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    outputs = []
    for layer in model:
        layer.register_forward_hook(lambda _m, _i, out: outputs.append(type(out.grad_fn).__name__))
    model(x).sum().backward()
    assert outputs[1] == "ConvolutionBackward0" and outputs[0] != outputs[1] and outputs[2] == outputs[0]
    sites = patched_sites(model)
    assert sites[1].work.computed == sites[1].work.exact > 0
    assert sites[0].work.computed < sites[0].work.exact
    sites[1].probe = True
    outputs.clear()
    model(x).sum().backward()
    assert outputs[1] != "ConvolutionBackward0" and "weight.cos" in sites[1].fidelity


@pytest.mark.parametrize(("kwargs", "field"), [({"variant": "best"}, "patch_grad.variant"),
                                               ({"every": 0}, "patch_grad.every"),
                                               ({"min_kernel": 1.5}, "patch_grad.min_kernel")])
def test_bad_values_fail_at_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        PatchGrad(**kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)
