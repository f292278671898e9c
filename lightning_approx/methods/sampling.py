"""Column-row sampling of the backward products (Adelman et al., NeurIPS 2021).

Three ways to choose the pairs share one implementation (:meth:`CRS.select`):

- ``crs``: k draws with replacement, p ∝ ||A_i||·||B_i||, scaled by 1/(k p_i): unbiased;
- ``bernoulli_crs``: each pair kept independently with p_i = min(c w_i, 1), sum p_i = k,
  scaled by 1/p_i: unbiased, no duplicates, a random count with mean k;
- ``topk``: the k largest w_i, unscaled: deterministic and biased.

``crs``: the weight gradient ``sum_n conv_w(x_n, dy_n)`` is estimated from k of the B
samples, and the input gradient ``sum_c conv_t(dy_c, W_c)`` from k of the output channels
(of each group), drawn with replacement with p ∝ ||A_i||·||B_i|| and scaled by 1/(k p_i):
unbiased, and the products run on the gathered, smaller tensors. A pair drawn more than once
is gathered once with its scales summed (on CPU), so k draws cost only their distinct pairs
(at most about 0.39 n of them at k = n/2).

``crs`` with ``probabilities="uniform"`` draws its k pairs without replacement and with equal
probabilities, as one contiguous window (:func:`~lightning_approx.ops.sampling.draw_rows`),
scaled by n / k: also unbiased. It needs no norms and no gathers of the batch (a window of the
batch is a view). On a CPU those passes over the activations cost about as much as the
sampling saves (docs/methods/crs.md).

With ``weight_window="pixel_grid"`` the weight gradient's pairs are output pixels instead of
samples: the product ``sum_{n,i,j} dy[n,:,i,j] x_patch(n,i,j)`` runs on one random offset of a
strided grid of pixels (:func:`~lightning_approx.ops.sampling.grid_step`) in every sample, scaled
by the grid's cell count. Neighbouring pixels carry much the same gradient, so the estimate keeps
every sample's contribution and is far less noisy than a window of the batch of the same size.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.kernels import ops as kops
from lightning_approx.methods.base import Hyperparameter, Method
from lightning_approx.methods.registry import register
from lightning_approx.ops.conv import conv2d_grad_input, conv2d_grad_weight, conv2d_grad_weight_on_grid
from lightning_approx.ops.layout import batch_sum, channel_window, take_rows
from lightning_approx.ops.sampling import (
    bernoulli_sample,
    crs_sample,
    grid_step,
    group_rows,
    merge_duplicates,
    sample_count,
    topk_select,
)
from lightning_approx.schedules import Schedule

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite

SAMPLE_RATIO = Hyperparameter(low=0.0, high=1.0, low_open=True, high_open=False, exact_at=1.0,
                              fix="give a fraction in (0, 1]; 1.0 computes the exact gradients")


GRADS = {"both": frozenset({"grad_input", "grad_weight"}), "weight": frozenset({"grad_weight"}),
         "input": frozenset({"grad_input"})}
PROBABILITIES = ("norms", "uniform")
CONTROL_VARIATES = ("none", "batch_mean")
WEIGHT_WINDOWS = ("batch", "pixel_grid")


def _window_product(rows: tuple[slice, ...], product) -> Tensor:
    """``product(r)`` summed over the slices of a drawn window (two where it wraps)."""
    total = product(rows[0])
    for r in rows[1:]:
        total = total.add_(product(r))
    return total


def _batch_mean_correction(rows: tuple[slice, ...], n: int, k: int, x: Tensor, dy: Tensor, product) -> Tensor:
    """``product(x̄, D - (n/k) D_w)``: the control variate that makes a window's weight gradient
    an estimate of the centred products only.

    The weight gradient is bilinear in (x, dy) summed over the batch, so
    ``sum_n x_n*dy_n = x̄ * D + sum_n (x_n - x̄) * dy_n`` with ``x̄`` the batch mean of x and
    ``D = sum_n dy_n``. Estimating only the second sum from the window, ``(n/k) sum_w x_n*dy_n +
    x̄ * (D - (n/k) D_w)``, stays exactly unbiased (``E[(n/k) D_w] = D``) and drops the part of
    the variance that the shared mean of x carries; ReLU outputs are all positive, so that part is
    large. ``product`` is a batch-1 weight gradient: a 1/n-th of the full one.
    """
    window_sum = _window_product(rows, lambda r: batch_sum(dy[r]))
    residual = batch_sum(dy).sub_(window_sum, alpha=n / k)
    return product(batch_sum(x).div_(n), residual)


@register
class CRS(Method):
    """Column-row sampling in backward mode (forward exact).

    Args:
        sample_ratio: Fraction of the batch samples (weight gradient) and of the output
            channels (input gradient) that are computed; a float or a schedule. 1.0 is exact.
        uniform_mix: Weight of the uniform distribution mixed into the sampling
            probabilities, in [0, 1); bounds the 1/p scale of rarely drawn pairs.
        grads: Which backward products are sampled: ``"both"``, ``"weight"`` (the input
            gradient stays exact, so no sampling noise travels down the network) or
            ``"input"``.
        probabilities: ``"norms"`` (Adelman et al.'s p ∝ ||A_i||·||B_i||, k draws with
            replacement) or ``"uniform"`` (k distinct pairs with equal probabilities, one
            contiguous window of the batch / of the output channels, scaled by n / k). Uniform
            needs no norms and no gathers; on a CPU it is the faster one (docs/methods/crs.md).
        control_variate: ``"none"``, or ``"batch_mean"``: the weight gradient's window estimates
            only the products of the batch-centred inputs, and the batch mean's share is added
            exactly (one batch-1 product and a pass over x and dy). Still exactly unbiased, with
            much less variance behind ReLU (docs/methods/crs.md). Needs
            ``probabilities="uniform"`` and a sampled weight gradient.
        weight_window: What a uniform weight-gradient window holds: ``"batch"`` (k of the
            samples) or ``"pixel_grid"`` (a random offset of a strided grid of each conv's output
            pixels, in every sample: ``round(1 / sample_ratio)`` grid cells, so 0.5, 1/3, 0.25,
            1/9 are kept exactly; exact above 2/3). Exactly unbiased, with far less variance than
            a window of the batch (docs/methods/crs.md). Needs ``probabilities="uniform"`` and a
            sampled weight gradient; a Linear layer has no pixels, so its weight gradient stays
            exact.
    """

    name = "crs"
    stages = frozenset({"grad_input", "grad_weight"})
    unbiased = True
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {"sample_ratio": SAMPLE_RATIO}

    def __init__(self, sample_ratio: float | Schedule = 0.5, uniform_mix: float = 0.0, grads: str = "both",
                 probabilities: str = "norms", control_variate: str = "none",
                 weight_window: str = "batch") -> None:
        super().__init__()
        self._set("sample_ratio", sample_ratio)
        if not isinstance(grads, str) or grads not in GRADS:  # a list is unhashable: TypeError
            raise ConfigError(f"{self.name}.grads", grads, "unknown choice of sampled products",
                              f"use one of {sorted(GRADS)}")
        self.grads = grads
        self.stages = GRADS[grads]  # the stages this instance replaces; the rest run exactly
        if isinstance(uniform_mix, bool) or not isinstance(uniform_mix, (int, float)) or not 0 <= uniform_mix < 1:
            raise ConfigError(f"{self.name}.uniform_mix", uniform_mix, "must lie in [0, 1)",
                              "give 0.0 for pure norm-proportional sampling, or e.g. 0.1")
        self.uniform_mix = float(uniform_mix)
        if probabilities not in PROBABILITIES:
            raise ConfigError(f"{self.name}.probabilities", probabilities, "unknown sampling distribution",
                              f"use one of {list(PROBABILITIES)}")
        if probabilities == "uniform" and self.uniform_mix:
            raise ConfigError(f"{self.name}.uniform_mix", uniform_mix, "mixes the uniform distribution into the "
                              "norm-proportional one, so it has no meaning with probabilities='uniform'",
                              "drop uniform_mix, or use probabilities='norms'")
        self.probabilities = probabilities
        if control_variate not in CONTROL_VARIATES:
            raise ConfigError(f"{self.name}.control_variate", control_variate, "unknown control variate",
                              f"use one of {list(CONTROL_VARIATES)}")
        if control_variate != "none" and probabilities != "uniform":
            raise ConfigError(f"{self.name}.control_variate", control_variate,
                              "is implemented for windows of equal probability only",
                              "add probabilities='uniform', or drop control_variate")
        if control_variate != "none" and "grad_weight" not in self.stages:
            raise ConfigError(f"{self.name}.control_variate", control_variate,
                              f"corrects the weight gradient, which grads={grads!r} leaves exact",
                              "use grads='both' or grads='weight', or drop control_variate")
        self.control_variate = control_variate
        if weight_window not in WEIGHT_WINDOWS:
            raise ConfigError(f"{self.name}.weight_window", weight_window, "unknown weight-gradient window",
                              f"use one of {list(WEIGHT_WINDOWS)}")
        if weight_window == "pixel_grid":
            field = f"{self.name}.weight_window"
            if probabilities != "uniform":
                raise ConfigError(field, weight_window, "is drawn with equal probabilities only",
                                  "add probabilities='uniform', or use weight_window='batch'")
            if "grad_weight" not in self.stages:
                raise ConfigError(field, weight_window, f"samples the weight gradient, which grads={grads!r} leaves "
                                  "exact", "use grads='both' or grads='weight', or drop weight_window")
            if control_variate != "none":
                raise ConfigError(field, weight_window, "has no batch mean to correct: every sample is in the grid",
                                  "drop control_variate, or use weight_window='batch'")
        self.weight_window = weight_window

    def options(self) -> dict:
        return {"uniform_mix": self.uniform_mix, "grads": self.grads, "probabilities": self.probabilities,
                "control_variate": self.control_variate, "weight_window": self.weight_window}

    # --- pair selection: the part bernoulli_crs / topk change ----------------------------
    def select(self, weights: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Chooses k pairs per row of ``weights``; returns ``(indices, scale)``.

        On CPU repeated draws are merged, so the products run on the distinct pairs only (the
        same estimate). On CUDA the k draws are kept as they are: counting the distinct pairs
        would make the host wait for the device in every layer's backward.
        """
        return merge_duplicates(*crs_sample(weights, k, generator, self.uniform_mix))

    def _exact(self) -> bool:
        return self.value("sample_ratio") >= 1.0

    def _plane_sq_norms(self, dy: Tensor) -> Tensor:
        """(N, C) squared norms of ``dy``, shared by the two products of one backward."""
        cached = getattr(self, "_norm_cache", None)
        if cached is None or cached[0]() is not dy or cached[1] != dy._version:
            cached = (weakref.ref(dy), dy._version, kops.plane_sq_norms(dy))
            self._norm_cache = cached
        return cached[2]

    # --- Conv2d ------------------------------------------------------------------------
    def conv2d_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        geom = site.geometry
        macs = geom.macs(x.shape, weight, dy.shape)
        n = x.shape[0]
        if self._exact():
            return conv2d_grad_weight(geom, x, weight, dy), macs
        if self.weight_window == "pixel_grid":
            return self._conv2d_grad_weight_on_grid(site, x, weight, dy, macs)
        k = sample_count(self.value("sample_ratio"), n)
        if self.probabilities == "uniform":
            rows = site.draw_window(n, k)
            grad = _window_product(rows, lambda r: conv2d_grad_weight(geom, x[r], weight, dy[r])).mul_(n / k)
            if self.control_variate == "batch_mean" and k < n:  # a window of the whole batch is exact
                grad += _batch_mean_correction(rows, n, k, x, dy, lambda a, b: conv2d_grad_weight(geom, a, weight, b))
                return grad, macs * k // n + macs // n
            return grad, macs * k // n
        norms = kops.sample_norms(x) * self._plane_sq_norms(dy).sum(1).sqrt()
        idx, scale = self.select(norms, k, site.generator(x.device))
        dy_k = kops.gather_scale(dy, idx, scale, 0)
        grad = conv2d_grad_weight(geom, kops.gather_scale(x, idx, None, 0), weight, dy_k)
        return grad, macs * idx.numel() // n

    def _conv2d_grad_weight_on_grid(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor,
                                    macs: int) -> tuple[Tensor, int]:
        """One of the grid's ``s_h * s_w`` offsets, drawn uniformly (as a window of one), scaled by
        ``s_h * s_w``: every output pixel is in the grid with probability ``1 / (s_h s_w)``."""
        geom = site.geometry
        s_h, s_w = grid_step(self.value("sample_ratio"))
        if s_h * s_w == 1:
            return conv2d_grad_weight(geom, x, weight, dy), macs
        a, b = divmod(site.draw_window(s_h * s_w, 1)[0].start, s_w)
        grad = conv2d_grad_weight_on_grid(geom, x, weight, dy, (s_h, s_w), (a, b)).mul_(s_h * s_w)
        h, w = dy.shape[2:]
        return grad, macs * len(range(a, h, s_h)) * len(range(b, w, s_w)) // (h * w)

    def conv2d_grad_input(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        geom = site.geometry
        macs = geom.macs(x.shape, weight, dy.shape)
        if self._exact():
            return conv2d_grad_input(geom, x, weight, dy), macs
        cout, groups = weight.shape[0], geom.groups
        per_group = cout // groups
        k = sample_count(self.value("sample_ratio"), per_group)
        if self.probabilities == "uniform":
            # One window of each group's channels (the same offsets in every group).
            rows = group_rows(site.draw_window(per_group, k), groups, per_group)
            weight_k = take_rows(weight, rows, 0) * (per_group / k)  # scale the small operand
            grad = conv2d_grad_input(geom, x, weight_k, channel_window(dy, rows))
            return grad, macs * k // per_group
        # Grouped convs keep their structure: the same number of channels from every group.
        norms = kops.sample_norms(weight) * self._plane_sq_norms(dy).sum(0).sqrt()
        idx, scale = self.select(norms.view(groups, per_group), k, site.generator(x.device))
        if groups > 1:
            idx = idx + torch.arange(groups, device=idx.device).unsqueeze(1) * per_group
        idx = idx.flatten()
        # conv_t(s_c dy_c, W_c) = conv_t(dy_c, s_c W_c): scale the small weight, not dy.
        weight_k = kops.gather_scale(weight, idx, scale.flatten(), 0)
        grad = conv2d_grad_input(geom, x, weight_k, kops.gather_scale(dy, idx, None, 1))
        return grad, macs * idx.numel() // cout

    # --- Linear (x: (N, in), dy: (N, out)) ------------------------------------------------
    def linear_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        n = x.shape[0]
        macs = n * weight.shape[0] * weight.shape[1]
        if self._exact() or self.weight_window == "pixel_grid":  # no pixels: exact
            return dy.t().mm(x), macs
        k = sample_count(self.value("sample_ratio"), n)
        if self.probabilities == "uniform":
            rows = site.draw_window(n, k)
            grad = _window_product(rows, lambda r: dy[r].t().mm(x[r])).mul_(n / k)
            if self.control_variate == "batch_mean" and k < n:
                grad += _batch_mean_correction(rows, n, k, x, dy, lambda a, b: b.t().mm(a))
                return grad, macs * k // n + macs // n
            return grad, macs * k // n
        norms = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(dy, dim=1)
        idx, scale = self.select(norms, k, site.generator(x.device))
        dy_k = kops.gather_scale(dy, idx, scale, 0)
        return dy_k.t().mm(kops.gather_scale(x, idx, None, 0)), macs * idx.numel() // n

    def linear_grad_input(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        out = weight.shape[0]
        macs = x.shape[0] * out * weight.shape[1]
        if self._exact():
            return dy.mm(weight), macs
        k = sample_count(self.value("sample_ratio"), out)
        if self.probabilities == "uniform":
            rows = site.draw_window(out, k)
            return _window_product(rows, lambda r: dy[:, r].mm(weight[r] * (out / k))), macs * k // out
        norms = torch.linalg.vector_norm(weight, dim=1) * torch.linalg.vector_norm(dy, dim=0)
        idx, scale = self.select(norms, k, site.generator(x.device))
        weight_k = kops.gather_scale(weight, idx, scale, 0)
        return kops.gather_scale(dy, idx, None, 1).mm(weight_k), macs * idx.numel() // out


@register
class BernoulliCRS(CRS):
    """Bernoulli column-row sampling: each pair kept independently (Adelman et al.).

    Args:
        sample_ratio: Expected fraction of pairs kept; a float or a schedule. 1.0 is exact.
        uniform_mix: Weight of the uniform distribution mixed into the weights, in [0, 1).
        grads: Which backward products are sampled, as for ``crs``.
    """

    name = "bernoulli_crs"

    def __init__(self, sample_ratio: float | Schedule = 0.5, uniform_mix: float = 0.0, grads: str = "both") -> None:
        super().__init__(sample_ratio=sample_ratio, uniform_mix=uniform_mix, grads=grads)

    def options(self) -> dict:
        return {"uniform_mix": self.uniform_mix, "grads": self.grads}

    def select(self, weights: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return bernoulli_sample(weights, k, generator, self.uniform_mix)


@register
class TopK(CRS):
    """The k pairs with the largest norm products, unscaled (Adelman et al.). Biased: the
    smallest pairs are always dropped, so the estimate is shrunk towards the large ones.

    Args:
        sample_ratio: Fraction of pairs kept; a float or a schedule. 1.0 is exact.
        grads: Which backward products are sampled, as for ``crs``.
    """

    name = "topk"
    unbiased = False

    def __init__(self, sample_ratio: float | Schedule = 0.5, grads: str = "both") -> None:
        super().__init__(sample_ratio=sample_ratio, grads=grads)

    def options(self) -> dict:
        return {"grads": self.grads}

    def select(self, weights: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return topk_select(weights, k)
