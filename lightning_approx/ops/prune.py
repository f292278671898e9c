"""Stochastic pruning of small gradient entries (Ye et al., ECCV 2020; SparseTrain).

Gradients entering a conv's backward are modelled as N(0, sigma^2). For a target sparsity p
the threshold is the value below which a fraction p of such entries fall,

    sigma = sqrt(pi / 2) * mean|g|        (E|g| = sigma * sqrt(2 / pi) for a normal g)
    tau   = Phi^-1((1 + p) / 2) * sigma

Entries with |g| >= tau are kept. A smaller entry becomes tau * sign(g) with probability
|g| / tau and 0 otherwise, so its expectation is g: the pruned gradient is unbiased.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def prune_threshold(g: Tensor, sparsity: float) -> Tensor:
    """tau for target ``sparsity`` under the normal model, as a 0-d float32 tensor."""
    return _threshold_from_magnitude(g.abs(), sparsity)


def _threshold_from_magnitude(magnitude: Tensor, sparsity: float) -> Tensor:
    sigma = math.sqrt(math.pi / 2) * magnitude.mean(dtype=torch.float32)
    quantile = torch.special.ndtri(torch.tensor((1.0 + sparsity) / 2.0, dtype=torch.float64)).item()
    return sigma * quantile


# One random digit is 16 bits: keep decisions read 4 digits per 64-bit draw, a quarter of the
# generator's work of one float32 uniform per entry (on CPU that draw is serial and took about
# 40 % of a call). A digit that ties with floor(|g| / tau * 65536) draws a float32
# uniform for the fraction, so the decision has the law of a continuous uniform's.
_DIGITS = 65536
_BLOCK = 1024  # entries per partial count; ties are looked for only in blocks that hold one


def stochastic_prune(g: Tensor, sparsity: float, generator: torch.Generator | None) -> tuple[Tensor, int]:
    """Prunes ``g`` to about ``sparsity`` zeros, unbiasedly.

    Args:
        g: The gradient (any shape, floating point).
        sparsity: Target fraction of zeros, in [0, 1); 0 returns ``g`` unchanged.
        generator: Random stream for the keep decisions (on ``g``'s device).

    Returns:
        ``(pruned, non_zeros)``: a new tensor shaped like ``g`` (in its memory layout) and its
        number of non-zeros.
    """
    if sparsity <= 0:
        return g, int(torch.count_nonzero(g))
    # Work on g's storage order, so every pass below is a flat, unit-stride loop.
    order = sorted(range(g.dim()), key=lambda d: -g.stride(d))
    flat = g.permute(order).reshape(-1)
    n = flat.numel()
    magnitude = flat.abs()
    tau = float(_threshold_from_magnitude(magnitude, sparsity))
    if not tau > 0:  # all-zero gradient: nothing to prune
        return g, int(torch.count_nonzero(g))
    # |g| / tau in units of one digit, padded with -1 (never kept) to whole blocks.
    scaled = torch.empty(-(-n // _BLOCK) * _BLOCK, dtype=torch.float32, device=g.device)
    scaled[:n].copy_(magnitude).mul_(_float32_at_least(_DIGITS / tau))  # in float32 whatever g's dtype
    scaled[n:] = -1.0
    keep, non_zeros = _keep_where_uniform_below(scaled, generator)
    # sign(g) * max(|g|, tau), kept or 0: entries with |g| >= tau (scaled >= 65536) are always
    # kept, unchanged; smaller ones become tau * sign(g) with probability |g| / tau. Float
    # arithmetic only: on CPU, where / masked_fill with a bool mask are 5-8x slower.
    pruned = magnitude.clamp_min_(tau).copysign_(flat).mul_(keep[:n].to(g.dtype))
    inverse = sorted(range(g.dim()), key=lambda d: order[d])
    return pruned.view([g.shape[d] for d in order]).permute(inverse), non_zeros


def _float32_at_least(x: float) -> float:
    """The smallest float32 >= ``x``: with it, |g| >= tau gives |g| * 65536 / tau >= 65536 after
    rounding, so those entries are always kept (the keep probability of the others grows by
    under 2^-23 of itself, float32's own rounding)."""
    y = torch.tensor(x, dtype=torch.float32)
    if y.item() < x:
        y = torch.nextafter(y, torch.tensor(math.inf))
    return y.item()


def _keep_where_uniform_below(scaled: Tensor, generator: torch.Generator | None) -> tuple[Tensor, int]:
    """1.0 where ``u < scaled`` for independent ``u ~ U[0, 65536)``, else 0.0, and their count.

    ``scaled`` is flat float32 of whole ``_BLOCK``s. The integer digit of ``u`` decides unless
    it equals ``floor(scaled)`` (probability 2^-16); those ties compare a float32 uniform with
    the fraction, so ``P(keep) = scaled / 65536`` for ``scaled`` in [0, 65536].
    """
    bits = torch.empty(scaled.numel() // 4, dtype=torch.int64, device=scaled.device)
    bits.random_(-2**63, None, generator=generator)  # the full 64-bit range: four uniform digits
    digit = bits.view(torch.int16).to(torch.float32).add_(_DIGITS // 2)  # uniform on {0, ..., 65535}
    vote = scaled.floor().sub_(digit).sign_()  # +1 keep, -1 drop, 0 a tie
    net = vote.view(-1, _BLOCK).sum(1)  # kept - dropped, per block (exact: small integers)
    keep = vote.clamp_min_(0)
    kept = keep.view(-1, _BLOCK).sum(1)
    tied_blocks = (_BLOCK - 2 * kept + net).nonzero().squeeze(1)
    non_zeros = int(kept.sum(dtype=torch.float64))
    if tied_blocks.numel():
        blocks = scaled.view(-1, _BLOCK)[tied_blocks]
        ties = (blocks.floor() == digit.view(-1, _BLOCK)[tied_blocks]).nonzero()
        where = tied_blocks[ties[:, 0]] * _BLOCK + ties[:, 1]
        fraction = scaled[where] - scaled[where].floor()
        u = torch.rand(where.numel(), generator=generator, device=scaled.device)
        won = (u < fraction).to(torch.float32)
        keep[where] = won
        non_zeros += int(won.sum())
    return keep, non_zeros
