"""Column-row sampling primitives (Adelman et al., NeurIPS 2021).

A product ``A @ B = sum_i A[:, i] B[i, :]`` is estimated from ``k`` of its column-row pairs.
Each function returns the chosen indices and the factor each chosen pair is scaled by; the
caller gathers the rows and runs the product on the smaller tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_count(ratio: float, n: int) -> int:
    """k = ceil(ratio * n), at least 1 and at most n."""
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def crs_probabilities(weights: Tensor, uniform_mix: float = 0.0) -> Tensor:
    """Sampling distribution p_i ∝ w_i, mixed with the uniform one.

    Weights are ``||A_i|| * ||B_i||``, which minimises the estimator's variance. The mix
    bounds 1/p_i when some pairs are tiny; where every weight is zero the product is zero and
    any distribution is exact, so the uniform one is used.
    """
    w = weights.float().clamp_min(0)
    total = w.sum(dim=-1, keepdim=True)
    n = w.shape[-1]
    uniform = torch.full_like(w, 1.0 / n)
    p = torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), uniform)
    if uniform_mix > 0:
        p = (1 - uniform_mix) * p + uniform_mix * uniform
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
    scale = 1.0 / (k * p.gather(-1, idx))
    return idx, scale
