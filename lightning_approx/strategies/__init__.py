"""Distributed training strategies that carry the approximations' savings into communication.

Importing this package registers ``"approx_ddp"`` (and ``"approx_ddp_spawn"``,
``"approx_ddp_fork"``, ``"approx_ddp_notebook"``) with Lightning's strategy registry, so
``Trainer(strategy="approx_ddp")`` works once ``lightning_approx`` is imported.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_approx.strategies.approx_ddp import ApproxDDPStrategy
from lightning_approx.strategies.comm import CommState, CommTotals, approx_allreduce_hook

ApproxDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["ApproxDDPStrategy", "CommState", "CommTotals", "approx_allreduce_hook"]
