"""Gradient fidelity: how close an approximate gradient is to the exact one of the same step."""

from __future__ import annotations

import torch
from torch import Tensor


def fidelity(approx: Tensor, exact: Tensor) -> dict[str, float]:
    """Cosine similarity and relative L2 error of ``approx`` against ``exact``.

    Both are computed in float64 over the flattened tensors; a zero exact gradient gives
    cosine 1 and error 0 when the approximation is zero too.
    """
    a, e = approx.detach().double().flatten(), exact.detach().double().flatten()
    e_norm, a_norm = torch.linalg.vector_norm(e), torch.linalg.vector_norm(a)
    diff = torch.linalg.vector_norm(a - e)
    if e_norm == 0:
        return {"cos": 1.0 if a_norm == 0 else 0.0, "rel_err": 0.0 if a_norm == 0 else float("inf")}
    cos = float(a @ e / (a_norm * e_norm)) if a_norm > 0 else 0.0
    return {"cos": cos, "rel_err": float(diff / e_norm)}
