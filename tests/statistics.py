"""Tests of unbiasedness: a CLT test for Monte-Carlo estimators, and the exact expectation of
the uniform window draw."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def unbiasedness_statistic(draw: Callable[[], Tensor], exact: Tensor, samples: int) -> tuple[float, float, float]:
    """Runs ``draw`` ``samples`` times and standardises the mean's error element-wise.

    Under unbiasedness each ``t_e = (mean_e - exact_e) / (std_e / sqrt(M))`` is about N(0, 1),
    so ``mean(t_e**2)`` is about 1 with standard deviation sqrt(2 / d) for d independent
    elements (elements are correlated, so tests leave a wide margin), and ``max |t_e|`` stays
    below a Bonferroni bound.

    Returns:
        ``(mean of t squared, max |t|)`` over elements whose estimate varies, and the largest
        relative error of the elements that never vary (deterministic parts must be exact).
    """
    total = torch.zeros_like(exact, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for _ in range(samples):
        g = draw().double()
        total += g
        total_sq += g * g
    mean = total / samples
    var = (total_sq / samples - mean * mean).clamp_min(0) * samples / (samples - 1)
    std_err = var.sqrt() / math.sqrt(samples)
    varies = std_err > 1e-12 * exact.abs().max().clamp_min(1e-30)
    scale = exact.double().abs().max().clamp_min(1e-30)
    fixed_error = float((mean[~varies] - exact.double()[~varies]).abs().max() / scale) if (~varies).any() else 0.0
    if not varies.any():
        return 0.0, 0.0, fixed_error
    t = (mean[varies] - exact.double()[varies]) / std_err[varies]
    return float((t * t).mean()), float(t.abs().max()), fixed_error


def assert_unbiased(draw: Callable[[], Tensor], exact: Tensor, samples: int = 2000) -> None:
    mean_t2, max_t, fixed_error = unbiasedness_statistic(draw, exact, samples)
    assert fixed_error < 1e-9, f"elements that never vary are off by {fixed_error:.2e} (relative)"
    d = exact.numel()
    assert mean_t2 < 1.0 + 6 * math.sqrt(2 / d) + 0.15, f"mean t^2 = {mean_t2:.3f}: estimator looks biased"
    bound = math.sqrt(2 * math.log(2 * d / 1e-4))  # Bonferroni-style, family-wise 1e-4
    assert max_t < bound + 1.0, f"max |t| = {max_t:.2f} > {bound:.2f}: estimator looks biased"


def looks_biased(draw: Callable[[], Tensor], exact: Tensor, samples: int = 2000) -> bool:
    mean_t2, max_t, fixed_error = unbiasedness_statistic(draw, exact, samples)
    d = exact.numel()
    bound = math.sqrt(2 * math.log(2 * d / 1e-4)) + 1.0
    return fixed_error > 1e-6 or mean_t2 > 1.0 + 6 * math.sqrt(2 / d) + 0.15 or max_t > bound


def windows(n: int, k: int) -> list[tuple[slice, ...]]:
    """Every window ``draw_rows(n, k)`` can return, each as likely as the others."""
    starts = range(0, n, k) if n % k == 0 else range(n)
    return [(slice(s, s + k),) if s + k <= n else (slice(s, n), slice(0, s + k - n)) for s in starts]


def over_windows(monkeypatch, draw: Callable[[], Tensor], n: int, k: int) -> list[Tensor]:
    """``draw()`` for every equally likely window, each forced by patching the draw every layer
    makes (:meth:`~lightning_approx.layers.LayerSite.draw_window` calls ``layers.draw_rows``)."""
    import lightning_approx.layers as layers

    results = []
    for window in windows(n, k):
        monkeypatch.setattr(layers, "draw_rows", lambda n_, k_, gen, w=window: w)
        results.append(draw())
    return results


def mean_over_windows(monkeypatch, draw: Callable[[], Tensor], n: int, k: int) -> Tensor:
    """An estimator's expectation over the uniform window draw, exactly: the mean of ``draw()``
    over every equally likely window (:func:`over_windows`)."""
    results = over_windows(monkeypatch, draw, n, k)
    return sum(results[1:], results[0]) / len(results)
