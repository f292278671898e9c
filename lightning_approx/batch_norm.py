"""Re-estimating batch norm's running statistics on the network that is evaluated.

A method that replaces the training forward (``forward_sampling``) normalises the sampled
activations during training, so batch norm's running averages describe the sampled network,
while evaluation runs the exact one. Recomputing them from a few exact forward passes over
training data (as SWA does after averaging weights, :func:`torch.optim.swa_utils.update_bn`)
makes them match the evaluated network again; nothing else in the model changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, inputs: Iterable[Tensor]) -> int:
    """Replaces every batch norm's running mean and variance with their plain average over
    the batches of ``inputs``, each run through ``model`` in training mode without gradients
    (the approximate layers run their exact forward there).

    Unlike :func:`torch.optim.swa_utils.update_bn`, an exception (or an empty ``inputs``)
    leaves the statistics, momenta and training mode as they were.

    Args:
        model: The network; its training mode is restored afterwards.
        inputs: Model inputs, one batch each (not ``(input, target)`` pairs).

    Returns:
        The number of batches averaged (0: nothing changed).
    """
    layers = batch_norms(model)
    if not layers:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    was_training = model.training
    count = 0
    kept = False  # whether the new statistics stand: only after every batch ran
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
        model.train()
        for x in inputs:
            model(x)
            count += 1
        kept = count > 0
    finally:
        for m, momentum, mean, var, tracked in saved:
            m.momentum = momentum
            if not kept:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return count
