"""Runs a list of small fits on 2 CPU processes (gloo) and saves what the tests compare.

    python tests/strategies/ddp_fits.py SPEC.json OUT_DIR

Lightning's DDP launcher starts rank 1 by running this same command again, so every fit of
the list runs on both ranks in one process group. SPEC is a list of runs::

    {"name": "crs", "method": {"name": "crs", "sample_ratio": 0.5} | null, "exclude": null,
     "strategy": "approx" | "ddp" | "approx_ddp", "kwargs": {...}, "epochs": 2,
     "resume": "<name of an earlier run whose checkpoint to resume>" | null, "accumulate": 1}

Each run writes ``OUT_DIR/<name>.rank<r>.pt`` (parameters, communication totals, the seeds
of the layers' random streams), a checkpoint ``OUT_DIR/<name>.ckpt`` and the CSV log
``OUT_DIR/<name>/metrics.csv`` (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approx import ApproxBackward, ApproxDDPStrategy
from lightning_approx.surgery import patched_sites


class Net(pl.LightningModule):
    """Conv (3 -> 8), grouped conv (8 -> 16, groups 2), conv (16 -> 16), Linear (16 -> 4):
    every parameter size is a multiple of 8 except the last bias (4, one partial block)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        self.seeds: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        if not self.seeds:  # the streams as the strategy seeded them for the first batch
            self.seeds = {s.name: s.generator(self.device).initial_seed() for s in patched_sites(self)}
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return DataLoader(data, batch_size=8)  # 4 batches per rank and epoch


def strategy_of(run: dict):
    kwargs = dict(run.get("kwargs", {}))
    kind = run.get("strategy", "approx")
    if kind == "ddp":
        return DDPStrategy(**kwargs)
    if kind == "approx":
        return ApproxDDPStrategy(**kwargs)
    return kind  # a registered name


def fit(run: dict, out: Path) -> None:
    pl.seed_everything(0, workers=True)
    model = Net()
    callbacks = []
    if run.get("method") is not None:
        callbacks.append(ApproxBackward(run["method"], exclude=run.get("exclude"), seed=3, log_per_layer=False))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy_of(run), max_epochs=run.get("epochs", 2),
        callbacks=callbacks, logger=pl.loggers.CSVLogger(out, name=run["name"], version=""),
        accumulate_grad_batches=run.get("accumulate", 1), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=run.get("log_every", 1),
        deterministic=True)
    ckpt = out / f"{run['resume']}.ckpt" if run.get("resume") else None
    trainer.fit(model, loader(), ckpt_path=ckpt)
    trainer.save_checkpoint(out / f"{run['name']}.ckpt")
    strategy = trainer.strategy
    totals = strategy.comm_totals.to_dict() if isinstance(strategy, ApproxDDPStrategy) else None
    mode = strategy.comm_mode if isinstance(strategy, ApproxDDPStrategy) else None
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "totals": totals,
                "comm_mode": mode, "seeds": model.seeds, "strategy": type(strategy).__name__,
                "global_step": trainer.global_step},
               out / f"{run['name']}.rank{trainer.global_rank}.pt")


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    torch.set_num_threads(1)
    for run in spec:
        fit(run, out)


if __name__ == "__main__":
    main()
