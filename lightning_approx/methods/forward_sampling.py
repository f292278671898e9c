"""``forward_sampling``: run the training forward itself on a sample of the input channels.

Adelman et al., *Faster Neural Network Training with Approximate Tensor Operations*
(NeurIPS 2021), in the mode that worked best for them: the convolution (or matrix product)
of the training forward is approximated by column-row sampling over its inner dimension,
the input channels (Linear: input features),

    y = conv(x[:, S] * s, W[:, S]) + b,      |S| = k = ceil(r * C_in / groups) per group,

ranked by ``score_c = ||W[:, c]|| * ||x[:, c]||`` (the weight norm over output channels and
kernel, the activation norm over batch and space). Autograd differentiates the sampled op,
so the backward shrinks by the same factor k / C_in: both of its products run on the k
gathered channels, and only those channels get gradients (the others get zero).

Selection (option ``selection``):

- ``"topk"`` (default, the paper's best): the k highest scores, unscaled (s = 1);
  deterministic and biased (the dropped channels' contribution is missing);
- ``"crs"``: k draws with replacement, p_c ∝ score_c, s = 1 / (k p_c): the layer's output is
  an unbiased estimate of the exact output. Gradients through a network are still biased
  (downstream non-linearities see a noisy input), so the class says ``unbiased = False``;
- ``"uniform"``: k distinct channels with equal probabilities, one contiguous window of each
  group's channels (:func:`~lightning_approx.ops.sampling.draw_rows`), s = C_in / k: also an
  unbiased layer output. It computes no scores (``rank_by`` is not used), so the forward reads
  the activation once, to copy the window, instead of three times (norms, then gather).

Ranking (option ``rank_by``): ``"weight_activation"`` (default, the score above) or
``"weight"`` (``score_c = ||W[:, c]||`` only). Under data parallelism the weights are the same
on every rank while the activations are not, so ranking by the weight alone makes every rank
pick the same channels, and a DDP communication hook can all-reduce only their gradient
slices (:class:`~lightning_approx.strategies.ApproxDDPStrategy`, which reads them through
:meth:`ForwardSampling.track_selections` / :meth:`ForwardSampling.take_selection`).

Evaluation is exact (the layer routes ``eval()`` / ``no_grad`` to the plain forward), and
``sample_ratio = 1.0`` runs the plain op. Batch norm's running statistics, though, are averaged
over the sampled training forward; ``ApproxBackward(..., recalibrate_bn=N)`` recomputes them on
the exact network before each validation (:mod:`lightning_approx.batch_norm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.kernels import ops as kops
from lightning_approx.methods.base import Hyperparameter, Method
from lightning_approx.methods.registry import register
from lightning_approx.methods.sampling import SAMPLE_RATIO
from lightning_approx.ops.layout import channel_window, select_channels, take_rows
from lightning_approx.ops.sampling import crs_sample, group_rows, merge_duplicates, sample_count, topk_select
from lightning_approx.schedules import Schedule

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite

SELECTIONS = ("topk", "crs", "uniform")
RANK_BY = ("weight_activation", "weight")


@register
class ForwardSampling(Method):
    """Column-row sampling of the training forward over the input channels (Adelman et al.).

    Args:
        sample_ratio: Fraction r of the input channels of each group (Linear: input
            features) the forward and backward run on; a float in (0, 1] or a schedule.
            1.0 is exact.
        selection: ``"topk"`` (the k largest scores, unscaled; deterministic, biased),
            ``"crs"`` (k draws with replacement, p ∝ score, scaled by 1/(k p): an unbiased
            forward output) or ``"uniform"`` (one random window of k channels per group,
            scaled by C_in / k: unbiased, and no scores to compute).
        rank_by: ``"weight_activation"`` (score = weight norm × activation norm) or
            ``"weight"`` (weight norm only: the same channels on every data-parallel rank).
            Not used by ``selection="uniform"``.

    Work is counted when the backward runs (a gradient hook on the layer output): the
    exact backward MACs of the full layer against those of the sampled op, whose two
    products shrink by k / C_in. A forward whose output never gets a gradient counts nothing.
    """

    name = "forward_sampling"
    stages = frozenset({"forward"})
    unbiased = False
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {"sample_ratio": SAMPLE_RATIO}

    def __init__(self, sample_ratio: float | Schedule = 0.5, selection: str = "topk",
                 rank_by: str = "weight_activation") -> None:
        super().__init__()
        self._set("sample_ratio", sample_ratio)
        if selection not in SELECTIONS:
            raise ConfigError(f"{self.name}.selection", selection, "unknown selection",
                              f"use one of {list(SELECTIONS)} ('topk': the paper's best; 'crs': unbiased; "
                              "'uniform': unbiased, no scores)")
        self.selection = selection
        if rank_by not in RANK_BY:
            raise ConfigError(f"{self.name}.rank_by", rank_by, "unknown ranking",
                              f"use one of {list(RANK_BY)} ('weight': the same channels on every DDP rank)")
        self.rank_by = rank_by
        self._tracking = False
        self._selected: dict[str, Tensor] = {}

    def options(self) -> dict:
        return {"selection": self.selection, "rank_by": self.rank_by}

    # --- which channels ran, for a communication hook ----------------------------------------
    def track_selections(self, enabled: bool = True) -> None:
        """Starts (or stops) recording the input channels each layer's training forward uses,
        so a DDP communication hook can reduce only their gradient slices (off by default: it
        costs a small mask update per forward)."""
        self._tracking = enabled
        self._selected.clear()

    def take_selection(self, site_name: str) -> Tensor | None:
        """The input channels layer ``site_name`` ran on since the last call, as a
        ``(groups, C_in / groups)`` bool mask (the union over forwards, e.g. accumulated
        micro-batches), or ``None`` when no recorded forward ran; clears the record."""
        return self._selected.pop(site_name, None)

    def _record(self, site: LayerSite, idx: Tensor | None, groups: int, channels: int, device: torch.device) -> None:
        if not self._tracking:
            return
        mask = self._selected.get(site.name)
        if mask is None:
            mask = self._selected[site.name] = torch.zeros(groups, channels, dtype=torch.bool, device=device)
        if idx is None:  # the plain op ran on every channel
            mask.fill_(True)
        else:
            mask.scatter_(1, idx.view(groups, -1), True)

    # --- selection ------------------------------------------------------------------------
    def select(self, scores: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """k channels per row of ``scores`` (one row per group): ``(indices, scale)``."""
        if self.selection == "crs":
            return merge_duplicates(*crs_sample(scores, k, generator))  # on CPU repeats run once
        return topk_select(scores, k)

    def _k(self, channels: int) -> int:
        return sample_count(self.value("sample_ratio"), channels)

    # --- Conv2d ------------------------------------------------------------------------
    def conv2d_forward(self, site: LayerSite, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The training forward of a conv on k sampled input channels per group.

        Args:
            site: The layer.
            x: The input, already pre-padded (``ConvGeometry.prepare_input``).
            weight: ``(C_out, C_in / groups, kh, kw)``.
            bias: ``(C_out,)`` or ``None``.
        """
        geom = site.geometry
        groups = geom.groups
        cout, cin_g, kh, kw = weight.shape
        k = self._k(cin_g)
        if k >= cin_g:  # nothing to save: the exact op costs the same and has no variance
            self._record(site, None, groups, cin_g, weight.device)
            y = geom.forward(x, weight, bias)
            self._count_on_backward(site, y, x, weight, macs=geom.macs(x.shape, weight, y.shape), kept=1.0)
            return y
        cout_g = cout // groups
        if self.selection == "uniform":
            return self._conv2d_window(site, x, weight, bias, k)
        with torch.no_grad():
            # Scores of each input channel within its group: ||W[:, c]|| over the group's output
            # channels and the kernel, times ||x[:, c]|| over batch and space. Reduced from
            # per-plane squared norms: one contiguous pass each (a multi-dim vector_norm over
            # NCHW is far slower on CPU, see ops/norms.py).
            w_sq = kops.plane_sq_norms(weight.detach()).view(groups, cout_g, cin_g).sum(1)
            if self.rank_by == "weight":
                scores = w_sq.sqrt()
            else:
                scores = (w_sq * kops.plane_sq_norms(x.detach()).sum(0).view(groups, cin_g)).sqrt()
            idx, scale = self.select(scores, k, site.generator(x.device))  # (groups, k') each
            k = idx.shape[-1]  # k' <= k: repeated draws are merged
            self._record(site, idx, groups, cin_g, weight.device)
        channels = (idx + torch.arange(groups, device=idx.device).unsqueeze(1) * cin_g).flatten()
        x_k = select_channels(x, channels)
        w_k = weight.reshape(groups, cout_g, cin_g, kh, kw).gather(
            2, idx.view(groups, 1, k, 1, 1).expand(groups, cout_g, k, kh, kw))
        if self.selection != "topk":
            # Scale the weight, not x: it is the smaller tensor for every conv past the stem.
            w_k = w_k * scale.to(weight.dtype).view(groups, 1, k, 1, 1)
        w_k = w_k.reshape(cout, k, kh, kw)
        y = geom.forward(x_k, w_k, bias)
        self._count_on_backward(site, y, x, weight, macs=geom.macs(x.shape, weight, y.shape), kept=k / cin_g)
        return y

    def _window(self, site: LayerSite, n: int, k: int, groups: int, device: torch.device) -> tuple[slice, ...]:
        """The uniform draw (:meth:`LayerSite.draw_window`), recorded for a communication hook."""
        rows = site.draw_window(n, k)
        if self._tracking:
            idx = torch.cat([torch.arange(n)[r] for r in rows]).to(device)
            self._record(site, idx.repeat(groups), groups, n, device)
        return rows

    def _conv2d_window(self, site: LayerSite, x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> Tensor:
        """``selection="uniform"``: the conv on one window of each group's input channels
        (the same offsets in every group), the weight slice scaled by C_in / k."""
        geom = site.geometry
        cin_g, groups = weight.shape[1], geom.groups
        rows = self._window(site, cin_g, k, groups, weight.device)
        # The weight slice is small: scaling it costs nothing next to scaling x.
        w_k = take_rows(weight, rows, 1) * (cin_g / k)
        y = geom.forward(channel_window(x, group_rows(rows, groups, cin_g)), w_k, bias)
        self._count_on_backward(site, y, x, weight, macs=geom.macs(x.shape, weight, y.shape), kept=k / cin_g)
        return y

    # --- Linear ----------------------------------------------------------------------------
    def linear_forward(self, site: LayerSite, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The training forward of a Linear on k sampled input features (``x``: ``(..., in)``)."""
        fan_in = weight.shape[1]
        macs = x.numel() // x.shape[-1] * weight.numel()
        k = self._k(fan_in)
        if k >= fan_in:
            self._record(site, None, 1, fan_in, weight.device)
            y = F.linear(x, weight, bias)
            self._count_on_backward(site, y, x, weight, macs=macs, kept=1.0)
            return y
        if self.selection == "uniform":
            rows = self._window(site, fan_in, k, 1, weight.device)
            y = F.linear(take_rows(x, rows, -1), take_rows(weight, rows, 1) * (fan_in / k), bias)
            self._count_on_backward(site, y, x, weight, macs=macs, kept=k / fan_in)
            return y
        with torch.no_grad():
            acc = torch.promote_types(x.dtype, torch.float32)  # half-precision sums lose small features
            w_sq = weight.detach().to(acc).square().sum(0)
            if self.rank_by != "weight":
                w_sq = w_sq * x.detach().reshape(-1, fan_in).to(acc).square().sum(0)
            idx, scale = self.select(w_sq.sqrt(), k, site.generator(x.device))
            k = idx.numel()
            self._record(site, idx, 1, fan_in, weight.device)
        w_k = weight.index_select(1, idx)
        if self.selection != "topk":
            w_k = w_k * scale.to(weight.dtype)
        y = F.linear(x.index_select(-1, idx), w_k, bias)
        self._count_on_backward(site, y, x, weight, macs=macs, kept=k / fan_in)
        return y

    # --- accounting ------------------------------------------------------------------------
    @staticmethod
    def _count_on_backward(site: LayerSite, y: Tensor, x: Tensor, weight: Tensor, macs: int,
                           kept: float) -> None:
        """Adds the backward's exact and computed MACs to ``site.work`` when the backward
        reaches ``y`` (a gradient hook), so a forward that is never differentiated counts
        nothing. Which products run is known now: dx if x needs a gradient, dW if W does."""
        parts = int(x.requires_grad) + int(weight.requires_grad)
        if not (parts and y.requires_grad):
            return
        exact, computed = macs * parts, round(macs * kept) * parts

        def count(grad: Tensor) -> None:
            site.work.add(exact=exact, computed=computed)

        y.register_hook(count)

