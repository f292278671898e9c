"""Counts the multiply-accumulates (MACs) a backward pass computed against the exact one.

Counts come from the real tensor shapes at each call, so they say what the kernels were
asked to do, not what a method hoped to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WorkCounter:
    """Backward MACs of one layer since the last :meth:`reset`.

    Attributes:
        exact: MACs the exact backward would have computed for the same calls.
        computed: MACs the approximate backward asked its kernels to compute.
        zero: MACs that were known to be multiplications by zero (relu_mask, grad_prune):
            part of ``exact``; a method that skips them also leaves them out of ``computed``.
    """

    exact: int = 0
    computed: int = 0
    zero: int = 0

    def add(self, exact: int, computed: int, zero: int = 0) -> None:
        self.exact += int(exact)
        self.computed += int(computed)
        self.zero += int(zero)

    def reset(self) -> None:
        self.exact = self.computed = self.zero = 0

    @property
    def fraction(self) -> float:
        """Computed over exact MACs; 1.0 when nothing was counted."""
        return self.computed / self.exact if self.exact else 1.0


def recomputing() -> bool:
    """Whether this forward runs inside autograd's backward: activation checkpointing
    (``torch.utils.checkpoint``) recomputing it. Work and statistics that a layer counts in
    its forward are skipped then, so a checkpointed layer is counted once per step."""
    return torch._C._current_graph_task_id() != -1
