"""The crs estimator: exact at ratio 1.0 for every layer configuration, unbiased below it,
and really computed on smaller tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_approx.methods.sampling as sampling
from lightning_approx import approximate, restore
from lightning_approx.methods import CRS, Pipeline
from lightning_approx.surgery import patched_sites
from tests.statistics import assert_unbiased, looks_biased, mean_over_windows, over_windows, windows

CONV_CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6, bias=False),  # depthwise
    dict(in_channels=4, out_channels=6, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),  # asymmetric 'same'
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
]


def _grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(x).backward(dy)
    return [x.grad] + [p.grad for p in layer.parameters()]


class _ThroughMethod(Pipeline):
    """Runs the method's own backward even at ratio 1.0 (layers would otherwise take the
    plain path, exact by construction)."""

    is_exact = False


def _exact_vs_patched(layer: nn.Module, x: torch.Tensor, method: CRS):
    y = layer(x)
    dy = torch.randn_like(y)
    exact = _grads(layer, x, dy)
    approximate(layer, _ThroughMethod([method]), exclude=None)
    patched = _grads(layer, x, dy)
    restore(layer)
    return exact, patched


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_ratio_one_is_exact(cfg):
    layer = nn.Conv2d(**cfg).double()
    x = torch.randn(5, cfg["in_channels"], 9, 11, dtype=torch.float64)
    exact, patched = _exact_vs_patched(layer, x, CRS(sample_ratio=1.0))
    for e, p in zip(exact, patched, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_ratio_one_is_exact(shape, bias):
    layer = nn.Linear(5, 6, bias=bias).double()
    x = torch.randn(*shape, dtype=torch.float64)
    exact, patched = _exact_vs_patched(layer, x, CRS(sample_ratio=1.0))
    for e, p in zip(exact, patched, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


def test_plain_path_at_ratio_one_is_bitwise_exact():
    layer = nn.Conv2d(3, 4, 3)
    x = torch.randn(4, 3, 8, 8)
    dy = torch.randn(4, 4, 6, 6)
    exact = _grads(layer, x, dy)
    approximate(layer, "crs", sample_ratio=1.0, exclude=None)
    patched = _grads(layer, x, dy)
    for e, p in zip(exact, patched, strict=True):
        assert torch.equal(e, p)


def _site(layer: nn.Module, method: CRS):
    approximate(layer, Pipeline([method]), exclude=None, seed=1)
    return patched_sites(layer)[0]


@pytest.mark.parametrize("cfg", [CONV_CONFIGS[1], CONV_CONFIGS[3]], ids=["strided", "grouped"])
def test_conv_crs_is_unbiased(cfg):
    layer = nn.Conv2d(**cfg).double()
    method = CRS(sample_ratio=0.4, uniform_mix=0.1)
    site = _site(layer, method)
    x = torch.randn(6, cfg["in_channels"], 7, 7, dtype=torch.float64)
    x[0] *= 5  # uneven norms, so the 1/(k p) scaling matters
    w = layer.weight.detach()
    dy = torch.randn_like(layer(x).detach())
    from lightning_approx.ops.conv import conv2d_grad_input, conv2d_grad_weight

    exact_w = conv2d_grad_weight(site.geometry, x, w, dy)
    exact_x = conv2d_grad_input(site.geometry, x, w, dy)
    assert_unbiased(lambda: method.conv2d_grad_weight(site, x, w, dy)[0], exact_w)
    assert_unbiased(lambda: method.conv2d_grad_input(site, x, w, dy)[0], exact_x)


def test_linear_crs_is_unbiased():
    layer = nn.Linear(6, 5).double()
    method = CRS(sample_ratio=0.5)
    site = _site(layer, method)
    x = torch.randn(8, 6, dtype=torch.float64) * torch.linspace(0.2, 3, 8, dtype=torch.float64)[:, None]
    w = layer.weight.detach()
    dy = torch.randn(8, 5, dtype=torch.float64)
    assert_unbiased(lambda: method.linear_grad_weight(site, x, w, dy)[0], dy.t() @ x)
    assert_unbiased(lambda: method.linear_grad_input(site, x, w, dy)[0], dy @ w)


class _Unscaled(CRS):
    """Norm-proportional draws scaled by 1/k instead of 1/(k p): biased on purpose."""

    name = "crs_unscaled_test_only"

    def select(self, weights, k, generator):
        idx, scale = super().select(weights, k, generator)
        return idx, torch.full_like(scale, 1.0 / k) * weights.shape[-1]


def test_statistical_check_rejects_a_biased_estimator():
    layer = nn.Linear(6, 5).double()
    method = _Unscaled(sample_ratio=0.5)
    site = _site(layer, method)
    x = torch.randn(8, 6, dtype=torch.float64) * torch.linspace(0.2, 3, 8, dtype=torch.float64)[:, None]
    dy = torch.randn(8, 5, dtype=torch.float64)
    assert looks_biased(lambda: method.linear_grad_weight(site, x, layer.weight.detach(), dy)[0], dy.t() @ x)


def test_sampled_products_run_on_smaller_tensors(monkeypatch):
    """Both products run on the distinct drawn rows, not on zero-filled full-size tensors, and
    the work counted is the work done."""

    samples, channels = [], []
    real_w, real_x = sampling.conv2d_grad_weight, sampling.conv2d_grad_input

    def spy_w(geom, x, weight, dy):
        samples.append((x.shape[0], dy.shape[0]))
        return real_w(geom, x, weight, dy)

    def spy_x(geom, x, weight, dy):
        channels.append((weight.shape[0], dy.shape[1]))
        return real_x(geom, x, weight, dy)

    monkeypatch.setattr(sampling, "conv2d_grad_weight", spy_w)
    monkeypatch.setattr(sampling, "conv2d_grad_input", spy_x)
    layer = nn.Conv2d(4, 8, 3, padding=1)
    approximate(layer, "crs", sample_ratio=0.25, exclude=None)
    x = torch.randn(16, 4, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    (n, n_dy), = samples
    (c, c_dy), = channels
    assert n == n_dy and 1 <= n <= 4 and c == c_dy and 1 <= c <= 2  # k = 4 of 16 samples, 2 of 8 channels
    site = patched_sites(layer)[0]
    assert site.work.exact == 2 * 16 * 8 * 64 * 4 * 9
    assert site.work.computed == 16 * 8 * 64 * 4 * 9 * (n / 16 + c / 8)


def test_first_layer_input_grad_is_not_counted():
    layer = nn.Conv2d(3, 8, 3)
    approximate(layer, "crs", sample_ratio=0.5, exclude=None)
    layer(torch.randn(4, 3, 6, 6)).sum().backward()  # the input needs no gradient
    site = patched_sites(layer)[0]
    macs = 4 * 8 * 16 * 3 * 9
    assert site.work.exact == macs and site.work.computed == macs // 2


def test_eval_and_no_grad_are_exact():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3)
    x = torch.randn(2, 4, 8, 8)
    ref = layer(x).detach()
    approximate(layer, "crs", sample_ratio=0.1, exclude=None)
    with torch.no_grad():
        assert torch.equal(layer(x), ref)
    layer.eval()
    assert torch.equal(layer(x).detach(), ref)


def test_channels_last_is_exact_and_keeps_its_format():
    layer = nn.Conv2d(4, 6, 3, padding=1).double().to(memory_format=torch.channels_last)
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    exact, patched = _exact_vs_patched(layer, x, CRS(sample_ratio=1.0))
    for e, p in zip(exact, patched, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)
    approximate(layer, "crs", sample_ratio=0.5, exclude=None)
    x = x.clone().requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("rows", [None, 3], ids=["1-d", "grouped"])
def test_merged_draws_give_the_same_estimate(rows):
    """Repeated draws merge into one pair with the summed scale: the estimate is unchanged, the
    indices are distinct and ascending, and grouped rows are padded with scale-0 entries."""
    from lightning_approx.ops.sampling import crs_sample, merge_duplicates

    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(rows or 1, 10, dtype=torch.float64) + 0.1
    values = torch.randn(rows or 1, 10, dtype=torch.float64)
    if rows is None:
        weights, values = weights[0], values[0]
    idx, scale = crs_sample(weights, 12, gen)
    merged_idx, merged_scale = merge_duplicates(idx, scale)
    assert merged_idx.shape[-1] < 12  # 12 draws from 10 pairs must repeat some
    estimate = (values.gather(-1, idx) * scale).sum(-1)
    torch.testing.assert_close((values.gather(-1, merged_idx) * merged_scale).sum(-1), estimate)
    for row_idx, row_scale in zip(merged_idx.view(-1, merged_idx.shape[-1]),
                                  merged_scale.view(-1, merged_scale.shape[-1]), strict=True):
        live = row_idx[row_scale > 0]
        assert torch.equal(live, live.unique(sorted=True))  # distinct, ascending
        assert (row_scale[len(live):] == 0).all()  # padding only at the end


# --- bernoulli_crs: keep-probabilities by water-filling -----------------------------------------
def _bernoulli_rows(n_rows: int = 300):
    """(weights, k) pairs that reach every branch: light and heavy tails (w**8 leaves pair masses
    of 1e-25 next to 0.3), zeros, fewer non-zero pairs than k, ties."""
    gen = torch.Generator().manual_seed(0)
    for i in range(n_rows):
        n = int(torch.randint(1, 130, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        w = torch.rand(n, generator=gen)
        kind = i % 5
        if kind == 1:
            w = w**8
        elif kind == 2:
            w[torch.rand(n, generator=gen) < 0.7] = 0
        elif kind == 3:
            w = torch.zeros(n)
            w[: max(1, k // 2)] = 1.0 + torch.rand(max(1, k // 2), generator=gen)
        elif kind == 4:
            w = torch.ones(n)
        yield (w if i % 2 else w.view(1, n)), k


def test_bernoulli_probabilities_keep_k_in_expectation():
    """p_i = min(c w_i, 1): at most 1, proportional to w where unclipped, summing to k (or to the
    number of non-zero pairs, all kept, where there are at most k)."""
    from lightning_approx.ops.sampling import bernoulli_probabilities

    for w, k in _bernoulli_rows():
        p = bernoulli_probabilities(w, k).flatten()
        w = w.flatten()
        nonzero = int((w > 0).sum())
        assert (p <= 1).all() and (p[w == 0] == 0).all()
        assert float(p.double().sum()) == pytest.approx(min(k, nonzero), rel=1e-4)
        free = (p < 1 - 1e-6) & (w > 0)
        if free.sum() > 1:
            ratio = p[free].double() / w[free].double()
            torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-3, atol=0)


def test_bernoulli_host_row_solves_as_the_vectorised_rows(monkeypatch):
    """One CPU row is solved by a host loop (3x faster); it must give the vectorised solution and,
    from the same generator state, the same pairs and scales."""
    import lightning_approx.ops.sampling as ops

    for w, k in _bernoulli_rows():
        fast_p = ops.bernoulli_probabilities(w, k, 0.1 if k % 3 == 0 else 0.0)
        fast = ops.bernoulli_sample(w, k, torch.Generator().manual_seed(k))
        with monkeypatch.context() as m:
            m.setattr(ops, "_one_host_row", lambda _: False)
            slow_p = ops.bernoulli_probabilities(w, k, 0.1 if k % 3 == 0 else 0.0)
            slow = ops.bernoulli_sample(w, k, torch.Generator().manual_seed(k))
        torch.testing.assert_close(fast_p, slow_p, rtol=0, atol=1e-6)
        assert fast[0].shape == slow[0].shape == (*w.shape[:-1], fast[0].shape[-1])
        assert torch.equal(fast[0], slow[0])
        torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=0)


def test_bernoulli_host_row_sums_small_tails_without_cancellation():
    # A first version subtracted from the total: with masses of 1e-14 left it lost them to
    # rounding and kept all 30 pairs where 29 were asked for.
    from lightning_approx.ops.sampling import bernoulli_probabilities

    w = torch.rand(30, generator=torch.Generator().manual_seed(3)) ** 8
    w[-1] = 1e-25
    assert float(bernoulli_probabilities(w, 29).double().sum()) == pytest.approx(29, rel=1e-6)


# --- probabilities="uniform": one window of k pairs, scaled by n / k ----------------------------
def test_windows_are_draw_rows_outcomes():
    from lightning_approx.ops.sampling import draw_rows

    gen = torch.Generator().manual_seed(0)
    for n, k in [(6, 3), (6, 4), (8, 3)]:
        seen = {tuple((r.start, r.stop) for r in draw_rows(n, k, gen)) for _ in range(400)}
        assert seen == {tuple((r.start, r.stop) for r in w) for w in windows(n, k)}


@pytest.mark.parametrize("cfg", [CONV_CONFIGS[1], CONV_CONFIGS[3], CONV_CONFIGS[4]],
                         ids=["strided", "grouped", "depthwise"])
@pytest.mark.parametrize("ratio", [0.5, 0.4], ids=["divides", "wraps"])
def test_uniform_conv_crs_is_unbiased(monkeypatch, cfg, ratio):
    """Exactly unbiased: the mean over every window is the exact gradient (float64)."""
    from lightning_approx.ops.conv import conv2d_grad_input, conv2d_grad_weight
    from lightning_approx.ops.sampling import sample_count

    layer = nn.Conv2d(**cfg).double()
    method = CRS(sample_ratio=ratio, probabilities="uniform")
    site = _site(layer, method)
    x = torch.randn(6, cfg["in_channels"], 7, 7, dtype=torch.float64)
    w = layer.weight.detach()
    dy = torch.randn_like(layer(x).detach())
    per_group = w.shape[0] // cfg.get("groups", 1)
    mean_w = mean_over_windows(monkeypatch, lambda: method.conv2d_grad_weight(site, x, w, dy)[0],
                               6, sample_count(ratio, 6))
    mean_x = mean_over_windows(monkeypatch, lambda: method.conv2d_grad_input(site, x, w, dy)[0],
                               per_group, sample_count(ratio, per_group))
    torch.testing.assert_close(mean_w, conv2d_grad_weight(site.geometry, x, w, dy), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_x, conv2d_grad_input(site.geometry, x, w, dy), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.5, 0.375], ids=["divides", "wraps"])
def test_uniform_linear_crs_is_unbiased(monkeypatch, ratio):
    layer = nn.Linear(6, 8).double()
    method = CRS(sample_ratio=ratio, probabilities="uniform")
    site = _site(layer, method)
    x = torch.randn(8, 6, dtype=torch.float64)
    w = layer.weight.detach()
    dy = torch.randn(8, 8, dtype=torch.float64)
    k = round(ratio * 8)
    mean_w = mean_over_windows(monkeypatch, lambda: method.linear_grad_weight(site, x, w, dy)[0], 8, k)
    mean_x = mean_over_windows(monkeypatch, lambda: method.linear_grad_input(site, x, w, dy)[0], 8, k)
    torch.testing.assert_close(mean_w, dy.t() @ x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_x, dy @ w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio,options,windows_of", [
    (0.5, {}, (10, 5)), (0.4, {}, (10, 4)),  # windows of the batch: k divides n, or wraps
    (0.25, {"weight_window": "pixel_grid"}, (4, 1)), (1 / 9, {"weight_window": "pixel_grid"}, (9, 1)),  # grid offsets
], ids=["divides", "wraps", "grid-2x2", "grid-3x3"])
def test_uniform_weight_only_is_unbiased_through_a_network(monkeypatch, ratio, options, windows_of):
    """With exact input gradients every layer's dy is exact, so each weight gradient is unbiased
    in a whole network too (batch norm included): the mean over every window is the exact one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 16, 5)).double()
    x, y = torch.randn(10, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (10,))

    def grads() -> torch.Tensor:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = grads()
    approximate(model, "crs", sample_ratio=ratio, probabilities="uniform", grads="weight", exclude=None, **options)
    assert not torch.allclose(grads(), exact)
    mean = mean_over_windows(monkeypatch, grads, *windows_of)
    torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-12)


def test_uniform_runs_one_window_without_norms(monkeypatch):
    """The uniform draw computes exactly k samples and k channels, which are neighbours, and
    never takes a norm."""

    def no_norms(*_):
        raise AssertionError("probabilities='uniform' must not compute norms")

    monkeypatch.setattr(sampling.kops, "sample_norms", no_norms)
    monkeypatch.setattr(sampling.kops, "plane_sq_norms", no_norms)
    seen = []
    real_w = sampling.conv2d_grad_weight
    monkeypatch.setattr(sampling, "conv2d_grad_weight",
                        lambda g, x, w, dy: seen.append(x.shape[0]) or real_w(g, x, w, dy))
    layer = nn.Conv2d(4, 8, 3, padding=1)
    approximate(layer, "crs", sample_ratio=0.25, probabilities="uniform", exclude=None)
    x = torch.randn(16, 4, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    assert seen == [4]  # k divides n: one block, one product
    site = patched_sites(layer)[0]
    assert site.work.computed == 16 * 8 * 64 * 4 * 9 * (4 / 16 + 2 / 8)


def test_uniform_keeps_channels_last():
    layer = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    approximate(layer, "crs", sample_ratio=0.3, probabilities="uniform", exclude=None)
    x = torch.randn(5, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


# --- control_variate="batch_mean": the window estimates the batch-centred products only ---------
@pytest.mark.parametrize("cfg", [CONV_CONFIGS[1], CONV_CONFIGS[3]], ids=["strided", "grouped"])
@pytest.mark.parametrize("ratio", [0.5, 0.4], ids=["divides", "wraps"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_batch_mean_control_variate_is_unbiased(monkeypatch, cfg, ratio, channels_last):
    from lightning_approx.ops.conv import conv2d_grad_weight
    from lightning_approx.ops.sampling import sample_count

    layer = nn.Conv2d(**cfg).double()
    method = CRS(sample_ratio=ratio, probabilities="uniform", grads="weight", control_variate="batch_mean")
    site = _site(layer, method)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.rand(6, cfg["in_channels"], 7, 7, dtype=torch.float64) + 1).contiguous(memory_format=fmt)
    w = layer.weight.detach()
    dy = torch.randn_like(layer(x).detach()).contiguous(memory_format=fmt)
    mean_w = mean_over_windows(monkeypatch, lambda: method.conv2d_grad_weight(site, x, w, dy)[0],
                               6, sample_count(ratio, 6))
    torch.testing.assert_close(mean_w, conv2d_grad_weight(site.geometry, x, w, dy), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.5, 0.375], ids=["divides", "wraps"])
def test_batch_mean_control_variate_is_unbiased_for_linear(monkeypatch, ratio):
    layer = nn.Linear(6, 8).double()
    method = CRS(sample_ratio=ratio, probabilities="uniform", control_variate="batch_mean")
    site = _site(layer, method)
    x, dy = torch.rand(8, 6, dtype=torch.float64) + 1, torch.randn(8, 8, dtype=torch.float64)
    mean_w = mean_over_windows(monkeypatch, lambda: method.linear_grad_weight(site, x, layer.weight.detach(), dy)[0],
                               8, round(ratio * 8))
    torch.testing.assert_close(mean_w, dy.t() @ x, rtol=1e-10, atol=1e-12)


def test_batch_mean_control_variate_removes_the_shared_mean(monkeypatch):
    """Inputs with a large shared mean (as ReLU outputs have) make the plain window's error large;
    the control variate's error is that of the centred inputs, which are small here."""
    from lightning_approx.ops.conv import conv2d_grad_weight

    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    torch.manual_seed(0)
    x = 5 + 0.1 * torch.randn(8, 3, 6, 6, dtype=torch.float64)
    w = layer.weight.detach()
    dy = torch.randn(8, 4, 6, 6, dtype=torch.float64)

    def error(control_variate: str) -> float:
        method = CRS(sample_ratio=0.5, probabilities="uniform", grads="weight", control_variate=control_variate)
        site = _site(layer, method)
        exact = conv2d_grad_weight(site.geometry, x, w, dy)
        grads = over_windows(monkeypatch, lambda: method.conv2d_grad_weight(site, x, w, dy)[0], 8, 4)
        return max(float((g - exact).norm() / exact.norm()) for g in grads)

    assert error("batch_mean") < 0.1 * error("none")


def test_batch_mean_control_variate_is_exact_at_ratio_one():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(4, 3, 6, 6, requires_grad=True)
    layer(x).square().sum().backward()
    exact = layer.weight.grad.clone()
    layer.weight.grad = None
    approximate(layer, "crs", sample_ratio=1.0, probabilities="uniform", control_variate="batch_mean", exclude=None)
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, exact)


@pytest.mark.parametrize("kwargs,message", [
    ({"control_variate": "mean"}, "unknown control variate"),
    ({"control_variate": "batch_mean"}, "equal probability only"),
    ({"control_variate": "batch_mean", "probabilities": "uniform", "grads": "input"}, "leaves exact"),
])
def test_control_variate_config_errors(kwargs, message):
    from lightning_approx import ConfigError

    with pytest.raises(ConfigError, match=r"crs\.control_variate") as err:
        CRS(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs,field", [({"probabilities": "softmax"}, "crs.probabilities"),
                                          ({"probabilities": "uniform", "uniform_mix": 0.1}, "crs.uniform_mix")])
def test_uniform_config_errors(kwargs, field):
    from lightning_approx import ConfigError

    with pytest.raises(ConfigError, match=field):
        CRS(**kwargs)


def test_bernoulli_and_topk_take_no_probabilities():
    from lightning_approx.methods import BernoulliCRS, TopK

    for cls in (BernoulliCRS, TopK):
        with pytest.raises(TypeError):
            cls(probabilities="uniform")
        assert "probabilities" not in cls().to_config()


def test_autocast_runs_the_sampled_layers_in_its_precision():
    """Under autocast the patched layers compute in its dtype, as the plain ones do, and the
    parameters' gradients stay in theirs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x)
    approximate(model, "crs", sample_ratio=0.5, exclude=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == plain.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# --- weight_window="pixel_grid": a random offset of a strided grid of output pixels -------------
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("ratio", [0.5, 0.25, 1 / 9], ids=["rows", "2x2", "3x3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pixel_grid_weight_gradient_is_unbiased(monkeypatch, cfg, ratio, channels_last):
    """Exactly unbiased for every geometry: the mean over the grid's offsets is the exact
    weight gradient (float64), and each offset really differs from it."""
    from lightning_approx.ops.conv import conv2d_grad_weight
    from lightning_approx.ops.sampling import grid_step

    layer = nn.Conv2d(**cfg).double()
    method = CRS(sample_ratio=ratio, probabilities="uniform", grads="weight", weight_window="pixel_grid")
    site = _site(layer, method)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = site.geometry.prepare_input(torch.randn(3, cfg["in_channels"], 9, 11, dtype=torch.float64))
    x = x.contiguous(memory_format=fmt)
    w = layer.weight.detach()
    dy = torch.randn_like(site.geometry.forward(x, w, None)).contiguous(memory_format=fmt)
    exact = conv2d_grad_weight(site.geometry, x, w, dy)
    cells = math.prod(grid_step(ratio))
    grads = over_windows(monkeypatch, lambda: method.conv2d_grad_weight(site, x, w, dy)[0], cells, 1)
    torch.testing.assert_close(sum(grads) / cells, exact, rtol=1e-10, atol=1e-12)
    assert all(not torch.allclose(g, exact) for g in grads)


def test_pixel_grid_runs_a_strided_product_on_the_grid_only():
    """At 1/9 a 3x3 grid: the product sees a ninth of the output pixels and the work counts
    them; the input gradient and a Linear layer's weight gradient stay exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 81, 5))
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    model(x).square().sum().backward()
    exact = [x.grad.clone(), model[2].weight.grad.clone()]
    x.grad = None
    model.zero_grad()
    approximate(model, "crs", sample_ratio=1 / 9, probabilities="uniform", grads="weight",
                weight_window="pixel_grid", exclude=None)
    model(x).square().sum().backward()
    torch.testing.assert_close(x.grad, exact[0])
    torch.testing.assert_close(model[2].weight.grad, exact[1])
    conv_site, linear_site = patched_sites(model)
    macs = 2 * 4 * 81 * 3 * 9
    assert conv_site.work.computed == macs + macs // 9  # exact input gradient + 9 of 81 pixels
    assert linear_site.work.computed == linear_site.work.exact


def test_pixel_grid_keeps_channels_last_and_is_exact_above_two_thirds():
    layer = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(5, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    layer(x).sum().backward()
    exact = layer.weight.grad.clone()
    layer.weight.grad = None
    approximate(layer, _ThroughMethod([CRS(sample_ratio=0.7, probabilities="uniform", weight_window="pixel_grid",
                                           grads="weight")]), exclude=None)
    x.grad = None
    layer(x).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer.weight.grad, exact)


@pytest.mark.parametrize("kwargs,message", [
    ({"weight_window": "pixels"}, "unknown weight-gradient window"),
    ({"weight_window": "pixel_grid"}, "equal probabilities only"),
    ({"weight_window": "pixel_grid", "probabilities": "uniform", "grads": "input"}, "leaves exact"),
    ({"weight_window": "pixel_grid", "probabilities": "uniform", "control_variate": "batch_mean"}, "no batch mean"),
])
def test_pixel_grid_config_errors(kwargs, message):
    from lightning_approx import ConfigError

    with pytest.raises(ConfigError, match=r"crs\.weight_window") as err:
        CRS(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("ratio,step", [(1.0, (1, 1)), (0.7, (1, 1)), (0.5, (2, 1)), (1 / 3, (3, 1)),
                                        (0.25, (2, 2)), (1 / 6, (3, 2)), (1 / 9, (3, 3)), (0.2, (5, 1))])
def test_grid_step(ratio, step):
    from lightning_approx.ops.sampling import grid_step

    assert grid_step(ratio) == step
