"""Column-row sampling primitives (Adelman et al., NeurIPS 2021).

A product ``A @ B = sum_i A[:, i] B[i, :]`` is estimated from ``k`` of its column-row pairs.
Each function returns the chosen indices and the factor each chosen pair is scaled by; the
caller gathers the rows and runs the product on the smaller tensors.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def sample_count(ratio: float, n: int) -> int:
    """k = ceil(ratio * n), at least 1 and at most n."""
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def draw_rows(n: int, k: int, generator: torch.Generator) -> tuple[slice, ...]:
    """k of ``range(n)`` with equal probabilities, as one contiguous window: a random one of
    the n / k blocks when k divides n, else a random cyclic window (one or two slices).

    Every index is in the window with probability k / n, so scaling the kept pairs by n / k is
    unbiased. Slices of a batch-major tensor are views: the draw costs no gather. Neighbours
    are always drawn together, which costs nothing over a random subset where the order is
    random (a shuffled batch) and adds variance where neighbours are alike.
    """
    if n % k == 0:
        start = k * int(torch.randint(n // k, (1,), generator=generator))
    else:
        start = int(torch.randint(n, (1,), generator=generator))
    end = start + k
    return (slice(start, end),) if end <= n else (slice(start, n), slice(0, end - n))


def grid_step(ratio: float) -> tuple[int, int]:
    """The pixel grid that keeps about ``ratio`` of a feature map: steps ``(s_h, s_w)`` with
    ``s_h * s_w = round(1 / ratio)``, as square as the product allows (0.5: (2, 1); 0.25: (2, 2);
    1/9: (3, 3)); ``(1, 1)`` (every pixel) from a ratio above 2/3."""
    cells = max(1, round(1 / ratio))
    s_w = max(d for d in range(1, math.isqrt(cells) + 1) if cells % d == 0)
    return cells // s_w, s_w


def group_rows(rows: tuple[slice, ...], groups: int, per_group: int) -> tuple[slice, ...]:
    """The same window in each of ``groups`` consecutive groups of ``per_group`` rows."""
    if groups == 1:
        return rows
    return tuple(slice(g * per_group + r.start, g * per_group + r.stop) for g in range(groups) for r in rows)


def row_count(rows: tuple[slice, ...], n: int) -> int:
    """How many of ``range(n)`` the slices hold."""
    return sum(len(range(n)[r]) for r in rows)


def crs_probabilities(weights: Tensor, uniform_mix: float = 0.0) -> Tensor:
    """Sampling distribution p_i ∝ w_i, mixed with the uniform one.

    Weights (non-negative) are ``||A_i|| * ||B_i||``, which minimises the estimator's
    variance. The mix bounds 1/p_i when some pairs are tiny; where every weight is zero the
    product is zero and any distribution is exact, so the uniform one is used.
    """
    w = weights.float()
    n = w.shape[-1]
    # An all-zero row divides 0 by 0; its NaNs become the uniform distribution. Three ops, no
    # host sync: this runs twice in every sampled layer's backward.
    p = (w / w.sum(dim=-1, keepdim=True)).nan_to_num_(nan=1.0 / n)
    if uniform_mix > 0:
        p = p.mul_(1 - uniform_mix).add_(uniform_mix / n)
    return p


def crs_sample(weights: Tensor, k: int, generator: torch.Generator | None, uniform_mix: float = 0.0
               ) -> tuple[Tensor, Tensor]:
    """Draws k pairs with replacement, p_i ∝ w_i; each draw is scaled by 1 / (k p_i).

    ``weights`` may be 2-d (one independent draw per row, as for grouped convolutions); the
    returned indices then index within each row.

    Returns:
        ``(indices, scale)``, both shaped ``weights.shape[:-1] + (k,)``.
    """
    p = crs_probabilities(weights, uniform_mix)
    idx = torch.multinomial(p, k, replacement=True, generator=generator)
    scale = p.gather(-1, idx).mul_(k).reciprocal_()
    return idx, scale


def merge_duplicates(idx: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The same estimate with each drawn pair once: a pair drawn c times is kept once with the
    sum of its c scales. With-replacement draws repeat pairs (k = n/2 draws hold about 0.39 n
    distinct ones), and each repeat would otherwise be gathered and multiplied again.

    Rows of a 2-d ``idx`` (conv groups) keep one length, the most distinct pairs of any row;
    shorter rows are padded with scale-0 entries, which cost work but add nothing.

    CUDA draws are returned as they are: sizing the result needs the count of distinct pairs
    on the host, which would make it wait for the device in every layer's backward.

    Returns:
        ``(indices, scale)``: the distinct indices of each row in ascending order (CPU).
    """
    if idx.is_cuda:
        return idx, scale
    if idx.dim() == 1 or idx.numel() == idx.shape[-1]:  # one row: sum the scales per pair
        flat_idx, flat_scale = idx.flatten(), scale.flatten()
        n = int(flat_idx.max()) + 1
        summed = flat_scale.new_zeros(n).index_add_(0, flat_idx, flat_scale)
        # Drawn pairs have scale > 0 (p > 0), so the non-zero sums are exactly the drawn pairs.
        unique = summed.nonzero().flatten()
        shape = (*idx.shape[:-1], -1)
        return unique.view(shape), summed.index_select(0, unique).view(shape)
    s_idx, order = idx.sort(dim=-1)
    s_scale = scale.gather(-1, order)
    first = torch.ones_like(s_idx, dtype=torch.bool)
    first[..., 1:] = s_idx[..., 1:] != s_idx[..., :-1]
    slot = first.cumsum(-1) - 1  # position of each draw's pair among its row's distinct pairs
    count = int(slot[..., -1].max()) + 1
    shape = (*idx.shape[:-1], count)
    # Draws of one pair write the same index to the same slot, so the scatter is deterministic.
    return (idx.new_zeros(shape).scatter_(-1, slot, s_idx),
            scale.new_zeros(shape).scatter_add_(-1, slot, s_scale))


def bernoulli_probabilities(weights: Tensor, k: int, uniform_mix: float = 0.0) -> Tensor:
    """Keep-probabilities p_i = min(c w_i, 1) with c chosen so that sum_i p_i = k.

    Clipping the largest pairs at 1 frees probability mass, which goes to the others by
    raising c (water-filling), so the expected number kept stays k. Rows of a 2-d
    ``weights`` are solved independently. Where fewer than k weights are non-zero, all of
    those are kept (the zero pairs contribute nothing).
    """
    w = crs_probabilities(weights, uniform_mix)  # normalised, mixed; rows sum to 1
    if _one_host_row(w):
        return _water_fill_row(w, k)
    sorted_w, _ = w.sort(dim=-1, descending=True)
    n = w.shape[-1]
    # With the t largest clipped, c_t = (k - t) / (sum of the rest); the first t whose
    # largest unclipped pair stays <= 1 is the solution.
    tail = sorted_w.flip(-1).cumsum(-1).flip(-1)  # tail[t] = sum_{i >= t} sorted_w[i]
    t = torch.arange(n, device=w.device, dtype=w.dtype)
    c = (k - t) / tail.clamp_min(torch.finfo(w.dtype).tiny)
    ok = (sorted_w * c <= 1 + 1e-6) & (t < k)
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full_like(ok[..., 0], n, dtype=torch.long))
    c_star = c.gather(-1, first.clamp_max(n - 1).unsqueeze(-1))
    c_star = torch.where(first.unsqueeze(-1) >= n, torch.full_like(c_star, float("inf")), c_star)
    return (w * c_star).clamp_max(1.0).nan_to_num(0.0)


def _one_host_row(w: Tensor) -> bool:
    """One row of pairs on the CPU (every ungrouped layer): small enough that a host loop beats
    the vectorised solution's ~25 small ops, and no device to wait for."""
    return w.device.type == "cpu" and w.numel() == w.shape[-1]


def _water_fill_row(w: Tensor, k: int) -> Tensor:
    """:func:`bernoulli_probabilities` of one normalised CPU row, solved on the host: walk the
    pairs from the largest, clipping each to 1 while ``c = (k - t) / (mass left)`` would push it
    above 1. The same solution as the vectorised one, in about a third of the time (n <= 128)."""
    ordered = w.flatten().sort(descending=True).values.tolist()
    # Mass left after the t largest, summed from the smallest: subtracting from the total would
    # lose the small tails to cancellation.
    tails = list(itertools.accumulate(reversed(ordered)))[::-1]
    for t, (largest, tail) in enumerate(zip(ordered[:k], tails[:k], strict=True)):
        if tail <= 0.0:  # only zero pairs left: keep every non-zero one
            break
        c = (k - t) / tail
        if largest * c <= 1 + 1e-6:
            return (w * c).clamp_max_(1.0)
    return (w > 0).to(w.dtype)  # at most k non-zero pairs: all of them, with certainty


def bernoulli_sample(weights: Tensor, k: int, generator: torch.Generator | None, uniform_mix: float = 0.0
                     ) -> tuple[Tensor, Tensor]:
    """Keeps each pair independently with p_i (see :func:`bernoulli_probabilities`); each kept
    pair is scaled by 1/p_i. Unbiased; the number kept is random with mean k.

    For 2-d ``weights`` (one row per conv group) every row must return the same count, so
    shorter rows are padded with scale-0 entries: the padding costs work but adds nothing.

    Returns:
        ``(indices, scale)`` shaped ``weights.shape[:-1] + (kept,)``.
    """
    p = bernoulli_probabilities(weights, k, uniform_mix)
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    keep = u < p
    if _one_host_row(p):  # no rows to pad to one length: the kept pairs, in ascending order
        idx = keep.flatten().nonzero().flatten()
        if idx.numel():
            shape = (*p.shape[:-1], -1)
            kept_p = p.flatten().index_select(0, idx).clamp_min_(torch.finfo(p.dtype).tiny)
            return idx.view(shape), kept_p.reciprocal_().view(shape)
    count = int(keep.sum(-1).max())
    count = max(count, 1)  # keep shapes valid; a kept-nothing draw gets one zero-scaled pair
    # Kept pairs first (stable order), then the padding.
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :count]
    kept = keep.gather(-1, order)
    scale = torch.where(kept, 1.0 / p.gather(-1, order).clamp_min(torch.finfo(p.dtype).tiny),
                        torch.zeros((), dtype=p.dtype, device=p.device))
    return order, scale


def topk_select(weights: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k pairs with the largest weights, unscaled: deterministic and biased."""
    idx = weights.topk(k, dim=-1, sorted=False).indices
    return idx, torch.ones(idx.shape, dtype=torch.float32, device=weights.device)
