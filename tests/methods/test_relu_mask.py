"""relu_mask: the backward skips the input channels and samples a ReLU zeroed, exactly.

The gradients equal the dense backward (float64, 1e-12) through real layers and a small
network; the skipped work is real (the products run on gathered tensors) and counted; layers
whose input is not a ReLU output are left alone; and the mask composes with the other
backward stages (crs, grad_output transforms) without changing their results.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_approx import METHODS, approximate, restore
from lightning_approx.errors import ConfigError
from lightning_approx.methods import CRS, Method, Pipeline, ReluMask
from lightning_approx.ops.mask import find_live, is_relu_output, plane_nonzeros
from lightning_approx.surgery import make_pipeline, patched_sites

CONV_CONFIGS = [
    dict(in_channels=6, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=6, out_channels=5, kernel_size=(3, 2), dilation=(1, 2)),
    dict(in_channels=6, out_channels=5, kernel_size=4, padding="same"),
    dict(in_channels=6, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=6, out_channels=4, kernel_size=1),
]
IDS = ["plain", "strided", "dilated", "same", "reflect", "1x1"]
DEAD_CHANNELS = [0, 3]
DEAD_SAMPLE = 2


def _relu_input(n: int = 4, c: int = 6, h: int = 7, w: int = 6, dead_sample: bool = True) -> torch.Tensor:
    """Pre-activation with channels 0 and 3 negative everywhere (dead across the batch) and,
    optionally, one sample negative everywhere; the rest is ordinary (about half zeros)."""
    z = torch.randn(n, c, h, w, dtype=torch.float64)
    z[:, DEAD_CHANNELS] = -z[:, DEAD_CHANNELS].abs() - 0.1
    if dead_sample:
        z[DEAD_SAMPLE] = -z[DEAD_SAMPLE].abs() - 0.1
    return z


def _grads(layer: nn.Module, z: torch.Tensor, dy: torch.Tensor, act=torch.relu) -> list[torch.Tensor]:
    z = z.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(act(z)).backward(dy)
    return [z.grad] + [p.grad for p in layer.parameters()]


def _dense_vs_masked(layer: nn.Module, z: torch.Tensor, methods: list[Method] | None = None, act=torch.relu):
    dy = torch.randn_like(layer(act(z)).detach())
    dense = _grads(layer, z, dy, act)
    approximate(layer, Pipeline(methods or [ReluMask()]), exclude=None)
    masked = _grads(layer, z, dy, act)
    site = patched_sites(layer)[0]
    restore(layer)
    return dense, masked, site


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=IDS)
def test_conv_equals_dense_and_skips_dead_slices(cfg):
    layer = nn.Conv2d(**cfg).double()
    z = _relu_input()
    dense, masked, site = _dense_vs_masked(layer, z)
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=1e-12, atol=1e-12)
    x = torch.relu(z)
    n, c = x.shape[:2]
    kept = (n - 1) * (c - len(DEAD_CHANNELS)) / (n * c)  # one sample, two channels dead
    assert site.work.exact > 0
    assert site.work.computed == pytest.approx(site.work.exact * kept, rel=1e-12)
    zero_fraction = float((x == 0).double().mean())  # of the layer input, before any explicit padding
    assert site.work.zero == 2 * round(site.work.exact / 2 * zero_fraction)
    assert 0 < site.work.zero < site.work.exact


def test_products_run_on_gathered_tensors(monkeypatch):
    import lightning_approx.methods.pipeline as pipeline

    seen = []
    real = pipeline.conv2d_grads

    def spy(geom, x, weight, dy):  # both products exact: the pipeline makes one fused call
        seen.append((tuple(x.shape[:2]), tuple(weight.shape[:2]), dy.shape[0]))
        return real(geom, x, weight, dy)

    monkeypatch.setattr(pipeline, "conv2d_grads", spy)
    layer = nn.Conv2d(6, 5, 3, padding=1).double()
    approximate(layer, "relu_mask", exclude=None)
    z = _relu_input().requires_grad_(True)
    layer(torch.relu(z)).sum().backward()
    assert seen == [((3, 4), (5, 4), 3)]


def test_network_gradients_equal_dense():
    """conv -> ReLU -> conv (two dead input channels) -> ReLU -> grouped conv -> ReLU -> linear
    -> ReLU -> linear: every parameter gradient and the input gradient match the dense ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 25, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)).double()
    with torch.no_grad():  # two channels of the first ReLU dead for every input
        model[0].weight[[2, 5]] = 0
        model[0].bias[[2, 5]] = -1
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn(6, 3, dtype=torch.float64)

    def grads():
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        model(xx).backward(dy)
        return [xx.grad, *(p.grad for p in model.parameters())]

    dense = grads()
    approximate(model, "relu_mask", exclude=None)
    masked = grads()
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=1e-12, atol=1e-12)
    sites = {s.name: s for s in patched_sites(model)}
    assert sites["0"].work.computed == sites["0"].work.exact and sites["0"].work.zero == 0  # not a ReLU input
    assert sites["2"].work.computed < sites["2"].work.exact  # two dead channels skipped
    assert sites["4"].work.computed == sites["4"].work.exact  # grouped: counted, not skipped
    assert sites["4"].work.zero > 0
    assert sites["7"].work.zero == 0  # after Flatten: x is not the ReLU's result
    assert sites["9"].work.zero > 0  # after an in-place ReLU
    method = sites["2"].pipeline.methods[0]
    assert set(method.stats) == {"2", "4", "9"}
    assert method.stats["2"].fractions()["dead_channels"] == pytest.approx(2 / 8)
    step = method.metrics()  # what the callback logs as approx/relu_mask.<key>
    per_layer = method.stats.values()
    dead = sum(s.dead_channels for s in per_layer) / sum(s.channels for s in per_layer)
    assert step["dead_channels"] == pytest.approx(dead) and dead >= 2 / (8 + 8 + 16)
    assert 0 < step["zero_elements"] < 1
    method.reset_metrics()
    assert method.metrics() == {} and set(method.stats) == {"2", "4", "9"}


def test_linear_equals_dense_and_skips_dead_features():
    layer = nn.Linear(6, 4).double()
    z = torch.randn(5, 6, dtype=torch.float64)
    z[:, 0] = 1.0  # no row dead by chance
    z[0] = 1.0  # no feature dead by chance
    z[:, [1, 4]] = -1.0  # dead features
    z[3] = -1.0  # dead row
    dense, masked, site = _dense_vs_masked(layer, z)
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=1e-12, atol=1e-12)
    assert site.work.computed == 2 * 4 * 4 * 4  # 4 live rows x 4 outputs x 4 live features, both products


def test_linear_with_leading_dims():
    layer = nn.Linear(6, 4).double()
    z = torch.randn(2, 3, 6, dtype=torch.float64)
    z[..., 0] = 1.0
    z[0, 0] = 1.0
    z[..., 2] = -1.0
    dense, masked, site = _dense_vs_masked(layer, z)
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=1e-12, atol=1e-12)
    assert site.work.computed == 2 * 6 * 4 * 5


def test_all_dead_input_gives_zero_gradients():
    layer = nn.Conv2d(6, 5, 3, padding=1).double()
    z = -torch.rand(3, 6, 5, 5, dtype=torch.float64) - 0.1
    dense, masked, site = _dense_vs_masked(layer, z)
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=0, atol=0)
    assert site.work.computed == 0 and site.work.zero == site.work.exact


@pytest.mark.parametrize("act", [torch.sigmoid, F.leaky_relu, lambda t: torch.relu(t) * 1.0],
                         ids=["sigmoid", "leaky_relu", "relu_then_scale"])
def test_other_inputs_are_left_alone(act):
    layer = nn.Conv2d(6, 5, 3, padding=1).double()
    z = _relu_input()
    dense, masked, site = _dense_vs_masked(layer, z, act=act)
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=1e-12, atol=1e-12)
    assert site.work.computed == site.work.exact and site.work.zero == 0
    assert site.pipeline.methods[0].stats == {}


def test_relu_like_producers():
    z = torch.randn(4, requires_grad=True)
    assert is_relu_output(torch.relu(z)) and is_relu_output(nn.ReLU()(z)) and is_relu_output(F.relu6(z))
    assert is_relu_output(F.threshold(z, 0.5, 0.0)) and is_relu_output(F.relu(z.clone(), inplace=True))
    assert not is_relu_output(F.threshold(z, -0.5, 0.0))  # a zero output may pass a gradient
    assert not is_relu_output(F.leaky_relu(z)) and not is_relu_output(F.hardtanh(z))
    assert not is_relu_output(torch.relu(z).detach()) and not is_relu_output(torch.relu(z) + 0)


def test_find_live_statistics():
    x = torch.relu(_relu_input())
    live = find_live(x)
    assert live.samples.tolist() == [0, 1, 3] and live.channels.tolist() == [1, 2, 4, 5]
    assert live.dead_channels == 2 and live.dead_samples == 1
    assert live.dead_planes >= 6 + 2 * 3  # the dead sample's 6 planes and the dead channels' 2 x 3 others
    assert live.zero_elements == int((x == 0).sum())
    counted = find_live(x, restrict=False)
    assert counted.samples is None and counted.channels is None and not counted.restricts


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "half", "linear"])
def test_plane_nonzeros_matches_count_nonzero(layout):
    x = torch.relu(torch.randn(3, 4, 5, 6))
    x[0, 1] = 0
    x[1, 2, 0, 0] = 1e-40  # a denormal is not zero
    x[2, 3] = 0
    x[2, 3, 1, 1] = float("nan")  # a NaN keeps its plane live (counted full)
    if layout == "linear":
        x = x[:, :, 0, 0]
    expected = torch.count_nonzero(x.reshape(*x.shape[:2], -1), dim=2)
    if layout != "linear":
        expected[2, 3] = 30
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "half":
        x[1, 2, 0, 0] = 1e-6  # a half denormal
        x = x.half()
    assert torch.equal(plane_nonzeros(x), expected)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_nothing_dead_runs_the_plain_op(kind):
    """Where nothing can be skipped the layer runs the plain op (autograd's own backward, no
    custom Function); the slices are still found in the forward, recorded and counted."""
    torch.manual_seed(0)
    if kind == "conv":
        layer, z = nn.Conv2d(6, 5, 3, padding=1).double(), torch.randn(4, 6, 5, 5, dtype=torch.float64)
        plain = "ConvolutionBackward0"
    else:
        layer, z = nn.Linear(6, 4).double(), torch.randn(8, 6, dtype=torch.float64)
        plain = "AddmmBackward0"
    x = torch.relu(z)
    assert not find_live(x).restricts  # no channel, feature or sample dead
    dy = torch.randn_like(layer(x).detach())
    dense = _grads(layer, z, dy)
    approximate(layer, "relu_mask", exclude=None)
    site, method = patched_sites(layer)[0], patched_sites(layer)[0].pipeline.methods[0]
    assert type(layer(torch.relu(z.clone().requires_grad_(True))).grad_fn).__name__ == plain
    assert method.stats[site.name].calls == 1  # counted in the forward, before any backward
    site.work.reset()
    masked = _grads(layer, z, dy)
    for d, m in zip(dense, masked, strict=True):
        torch.testing.assert_close(m, d, rtol=1e-12, atol=1e-12)
    assert site.work.computed == site.work.exact > 0
    assert site.work.zero == 2 * round(site.work.exact / 2 * float((x == 0).double().mean()))
    assert method.stats[site.name].calls == 2


@pytest.mark.parametrize("method", [["relu_mask"], ["relu_mask", "crs"], [CRS(1.0)]], ids=["mask", "mask+crs", "exact"])
def test_activation_checkpointing_counts_each_layer_once(method):
    """torch.utils.checkpoint re-runs the forward inside the backward; the work and zero
    statistics counted in a forward must not count that recompute again, and the gradients
    stay those of the plain run."""
    from torch.utils.checkpoint import checkpoint

    def run(checkpointed: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(5, 4, 3, padding=1)).double()
        approximate(net, make_pipeline(method), exclude=None, seed=0)
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        y = checkpoint(net, x, use_reentrant=False) if checkpointed else net(x)
        y.square().sum().backward()
        sites = patched_sites(net)
        stats = getattr(sites[0].pipeline.methods[0], "stats", {})
        return ([(s.work.exact, s.work.computed, s.work.zero) for s in sites],
                {name: (st.calls, st.zero_elements) for name, st in stats.items()},
                [p.grad for p in net.parameters()])

    (work, stats, grads), (work_ck, stats_ck, grads_ck) = run(False), run(True)
    assert work_ck == work and all(w[0] > 0 for w in work)
    assert stats_ck == stats
    for g, g_ck in zip(grads, grads_ck, strict=True):
        torch.testing.assert_close(g_ck, g, rtol=1e-12, atol=1e-12)


def test_probe_and_other_methods_run_the_pipeline():
    """A fidelity probe needs the pipeline's backward (it compares it with the exact one), and
    so does another method that approximates; one at an exact setting leaves the plain op."""
    layer = nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.relu(torch.randn(4, 6, 5, 5, dtype=torch.float64)).requires_grad_(True)
    approximate(layer, "relu_mask", exclude=None)
    site = patched_sites(layer)[0]
    site.probe = True
    layer(x).sum().backward()
    assert site.fidelity["weight.cos"] == pytest.approx(1.0) and not site.probe
    restore(layer)
    for crs, plain in ((CRS(0.5), False), (CRS(1.0), True)):
        approximate(layer, Pipeline([ReluMask(), crs]), exclude=None)
        assert (type(layer(x).grad_fn).__name__ == "ConvolutionBackward0") == plain
        restore(layer)


def test_eval_and_restore_are_exact():
    layer = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.relu(torch.randn(2, 6, 5, 5))
    ref = layer(x).detach()
    approximate(layer, "relu_mask", exclude=None)
    assert torch.equal(layer(x).detach(), ref)  # the forward is never changed
    layer.eval()
    assert torch.equal(layer(x).detach(), ref)
    restore(layer)
    assert type(layer) is nn.Conv2d


# --- composition ----------------------------------------------------------------------------
def _crs_pair(layer: nn.Module, z: torch.Tensor, ratio: float = 0.5):
    """Gradients from crs alone and from relu_mask + crs, each on a fresh random stream
    with the same seed."""
    dy = torch.randn_like(layer(torch.relu(z)).detach())
    out = []
    for methods in ([CRS(ratio)], [ReluMask(), CRS(ratio)]):
        approximate(layer, Pipeline(methods), exclude=None, seed=7)
        out.append(_grads(layer, z, dy))
        restore(layer)
    return out


def test_relu_mask_plus_crs_equals_crs_when_dead_weights_are_zero():
    """crs samples the batch for dW with p ∝ ||x_n||·||dy_n|| (dead channels add nothing to
    ||x_n||) and the output channels for dx with p ∝ ||W_o||·||dy_o||; with the dead channels'
    weight columns zero, ||W_o|| is the same over all or over the live channels, so the same
    stream draws the same pairs and the results are equal."""
    layer = nn.Conv2d(6, 8, 3, padding=1).double()
    with torch.no_grad():
        layer.weight[:, DEAD_CHANNELS] = 0
    z = _relu_input(n=8, dead_sample=False)
    z[0] *= 4  # uneven norms, so the draws depend on them
    alone, masked = _crs_pair(layer, z)
    assert not torch.allclose(alone[1], _grads(layer, z, torch.ones(8, 8, 7, 6, dtype=torch.float64))[1])
    for a, m in zip(alone, masked, strict=True):
        torch.testing.assert_close(m, a, rtol=1e-12, atol=1e-12)


def _mean_error_ratio(draw, exact: torch.Tensor, samples: int) -> float:
    """||mean - exact||^2 over its expectation under unbiasedness, sum_e var_e / M.

    A global version of the CLT check in tests/statistics.py: crs draws k of C_out output
    channels, so every element of dx depends on the same few random counts and the
    element-wise t statistics are strongly correlated (their mean t^2 then varies far more
    than for independent elements). This ratio has expectation 1 whatever the correlation,
    and grows linearly with M under a bias.
    """
    draws = torch.stack([draw().double() for _ in range(samples)])
    mean, var = draws.mean(0), draws.var(0)
    return float((mean - exact).square().sum() / (var.sum() / samples))


def test_relu_mask_plus_crs_weight_gradient_equals_crs_and_input_gradient_is_unbiased():
    """With ordinary weights the dx draws use ||W_o|| over the live channels only (the part
    of dx the ReLU keeps), so they differ from crs alone, but the estimate stays unbiased; the
    dW draws see the same norms and match crs alone exactly."""
    layer = nn.Conv2d(6, 8, 3, padding=1).double()
    z = _relu_input(n=8, dead_sample=False)
    alone, masked = _crs_pair(layer, z)
    torch.testing.assert_close(masked[1], alone[1], rtol=1e-12, atol=1e-12)  # weight
    torch.testing.assert_close(masked[2], alone[2], rtol=1e-12, atol=1e-12)  # bias
    assert not torch.allclose(masked[0], alone[0])  # different dx draws
    dy = torch.randn_like(layer(torch.relu(z)).detach())
    exact = _grads(layer, z, dy)[0]
    approximate(layer, Pipeline([ReluMask(), CRS(0.5)]), exclude=None, seed=1)
    ratio = _mean_error_ratio(lambda: _grads(layer, z, dy)[0], exact, samples=300)
    assert ratio < 6.0, f"||mean - exact||^2 is {ratio:.1f} times its unbiased expectation"
    # Control for its power: the same check flags an estimator scaled by 1.5.
    ratio_biased = _mean_error_ratio(lambda: 1.5 * _grads(layer, z, dy)[0], exact, samples=300)
    assert ratio_biased > 10.0


class _DropGradOutput(Method):
    """A deterministic grad_output transform (test only): zeroes dy's odd output channels."""

    name = "drop_grad_output_test_only"
    stages = frozenset({"grad_output"})
    unbiased = False

    def conv2d_grad_output(self, site, dy):
        keep = torch.arange(dy.shape[1], device=dy.device) % 2 == 0
        return dy * keep.view(1, -1, 1, 1).to(dy.dtype)


def test_grad_output_transform_runs_before_the_mask():
    layer = nn.Conv2d(6, 6, 3, padding=1).double()
    z = _relu_input()
    dy = torch.randn_like(layer(torch.relu(z)).detach())
    results = []
    combos = ([_DropGradOutput()], [_DropGradOutput(), ReluMask()], [ReluMask(), _DropGradOutput(), CRS(1.0)])
    for methods in combos:
        approximate(layer, Pipeline(methods), exclude=None)
        results.append(_grads(layer, z, dy))
        restore(layer)
    assert torch.all(results[0][2][1::2] == 0)  # the bias gradient saw the transformed dy
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("grad_prune" not in METHODS, reason="grad_prune is not in this checkout yet")
def test_relu_mask_plus_grad_prune_equals_grad_prune():
    layer = nn.Conv2d(6, 6, 3, padding=1).double()
    z = _relu_input()
    dy = torch.randn_like(layer(torch.relu(z)).detach())
    results = []
    for spec in (["grad_prune"], ["relu_mask", "grad_prune"]):
        approximate(layer, spec, exclude=None, seed=5)
        results.append(_grads(layer, z, dy))
        restore(layer)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_two_masks_are_refused():
    with pytest.raises(ConfigError, match="Fix:") as err:
        make_pipeline(["relu_mask", "relu_mask"])
    assert err.value.field == "method" and "input_mask" in str(err.value)
