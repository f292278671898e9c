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

from lightning_approx.errors import ConfigError


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, inputs: Iterable[Tensor], *,
                           frozen: Iterable[nn.Module] | None = None) -> int:
    """Replaces the running mean and variance of every batch norm that is not frozen with their
    plain average over the batches of ``inputs``, each run through ``model`` in training mode
    without gradients (the approximate layers run their exact forward there).

    A frozen batch norm keeps its statistics and stays in eval mode during the passes, so it
    normalises with them as it does in training. By default the frozen ones are those in eval
    mode while ``model`` is in training mode (``model.train(); bn.eval()``, as when
    fine-tuning); with the whole model in eval mode nothing tells them apart, so every batch
    norm is recalibrated then.

    Unlike :func:`torch.optim.swa_utils.update_bn`, an exception (or an empty ``inputs``)
    leaves the statistics, momenta and every module's training mode as they were.

    Args:
        model: The network; each module's training mode is restored afterwards.
        inputs: Model inputs, one batch each (not ``(input, target)`` pairs).
        frozen: The batch norms to leave untouched, instead of the default above
            (:class:`~lightning_approx.ApproxBackward` passes those in eval mode during its
            training steps, since Lightning validates with the whole model in eval mode).

    Returns:
        The number of batches averaged (0: nothing changed).

    Raises:
        ConfigError: ``frozen`` is not a list of layers from ``batch_norms(model)``.
    """
    layers = batch_norms(model)
    if frozen is None:
        frozen = [m for m in layers if not m.training] if model.training else []
    if isinstance(frozen, nn.Module) or not isinstance(frozen, Iterable):
        raise ConfigError("frozen", type(frozen).__name__, "must be a list of batch norms", "give e.g. [model.bn1]")
    frozen = list(frozen)
    known = {id(m) for m in layers}
    for i, m in enumerate(frozen):
        if id(m) not in known:
            raise ConfigError(f"frozen[{i}]", type(m).__name__, "is not a batch norm of the model that keeps running "
                              "statistics", "list layers from lightning_approx.batch_norm.batch_norms(model)")
    skipped = {id(m) for m in frozen}
    layers = [m for m in layers if id(m) not in skipped]
    if not layers:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    modes = [(m, m.training) for m in model.modules()]  # model.train(flag) would overwrite each module's own
    count = 0
    kept = False  # whether the new statistics stand: only after every batch ran
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
        model.train()
        for m in frozen:
            m.eval()
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
        for m, training in modes:
            m.training = training
    return count
