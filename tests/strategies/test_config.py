"""ApproxDDPStrategy in one process: settings, registry, LightningCLI, seeds, and the
forward_sampling channel records the communication hook reads."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn

from lightning_approx import ApproxDDPStrategy, ConfigError, Pipeline, approximate
from lightning_approx.classifier import ImageClassifier
from lightning_approx.methods import ForwardSampling, build_method
from lightning_approx.schedules import Constant, Linear
from lightning_approx.strategies.comm import CommTotals, SlicedWeight, mix_seed
from lightning_approx.surgery import patched_sites


def test_is_a_ddp_strategy_with_its_settings():
    s = ApproxDDPStrategy(comm="sampled", comm_ratio=0.25, block_size=64, find_unused_parameters=True)
    assert isinstance(s, DDPStrategy)
    assert s.comm == "sampled" and s.comm_ratio == Constant(0.25) and s.block_size == 64
    assert s._ddp_kwargs["find_unused_parameters"] is True
    assert ApproxDDPStrategy(comm="sampled").comm_ratio == Constant(0.5)  # the default ratio
    assert ApproxDDPStrategy().comm_mode == "auto"  # resolved when fit sets up DDP


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"comm": "sparse"}, "comm"),
    ({"comm": "dense", "comm_ratio": 0.5}, "comm_ratio"),
    ({"comm": "sampled", "comm_ratio": 0.0}, "comm_ratio"),
    ({"comm": "sampled", "comm_ratio": 1.5}, "comm_ratio"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": True}, "block_size"),
    ({"rank_seeding": "random"}, "rank_seeding"),
    ({"seed": 1.5}, "seed"),
    ({"ddp_comm_hook": lambda state, bucket: None}, "ddp_comm_hook"),
])
def test_bad_settings_are_refused(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ApproxDDPStrategy(**kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)


def test_registered_names():
    for name, start in (("approx_ddp", "popen"), ("approx_ddp_spawn", "spawn"), ("approx_ddp_fork", "fork")):
        strategy = StrategyRegistry.get(name)
        assert type(strategy) is ApproxDDPStrategy and strategy._start_method == start
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="approx_ddp", logger=False)
    assert type(trainer.strategy) is ApproxDDPStrategy
    # registering again (a reload) is harmless
    ApproxDDPStrategy.register_strategies(StrategyRegistry)


def test_lightning_cli_yaml_with_plain_arguments(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text("""
trainer:
  accelerator: cpu
  devices: 2
  logger: false
  strategy:
    class_path: lightning_approx.ApproxDDPStrategy
    init_args:
      comm: sampled
      comm_ratio:
        class_path: lightning_approx.schedules.Linear
        init_args: {start: 1.0, end: 0.25, begin: 0, until: 2}
      block_size: 256
      rank_seeding: per_rank
      find_unused_parameters: true
""")
    cli = LightningCLI(ImageClassifier, pl.LightningDataModule, subclass_mode_data=True, run=False,
                       args=["--config", str(config), "--data", "lightning_approx.data.CIFAR10DataModule",
                             "--data.data_dir", str(tmp_path)])
    s = cli.trainer.strategy
    assert type(s) is ApproxDDPStrategy
    assert (s.comm, s.block_size, s.rank_seeding) == ("sampled", 256, "per_rank")
    assert s.comm_ratio == Linear(start=1.0, end=0.25, begin=0, until=2)
    assert s._ddp_kwargs["find_unused_parameters"] is True


def test_mix_seed_is_a_deterministic_63_bit_function_of_its_key():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    seeds = {mix_seed(0, rank, batch, layer) for rank in (-1, 0, 1) for batch in range(50) for layer in range(10)}
    assert len(seeds) == 3 * 50 * 10
    assert all(0 <= s < 2**63 for s in seeds)


def test_totals_round_trip():
    totals = CommTotals(sent=10, dense=40, syncs=2)
    assert CommTotals.from_dict(totals.to_dict()) == totals and totals.fraction == 0.25
    assert CommTotals().fraction == 1.0


# --- forward_sampling: ranking by weight, channel records -------------------------------------
def test_rank_by_is_validated_and_round_trips():
    method = build_method({"name": "forward_sampling", "sample_ratio": 0.5, "rank_by": "weight"})
    assert method == ForwardSampling(0.5, rank_by="weight") and method.to_config()["rank_by"] == "weight"
    with pytest.raises(ConfigError) as err:
        ForwardSampling(0.5, rank_by="activation")
    assert err.value.field == "forward_sampling.rank_by"


@pytest.mark.parametrize("selection", ["topk", "crs"])
def test_rank_by_weight_picks_the_same_channels_for_any_input(selection):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 4, 3, padding=1)
    method = ForwardSampling(0.5, selection=selection, rank_by="weight")
    approximate(layer, method, exclude=None)
    method.track_selections(True)
    (site,) = patched_sites(layer)
    picked = []
    for _ in range(3):  # different batches, as on different ranks, with the stream re-seeded alike
        site.generator(torch.device("cpu")).manual_seed(7)
        layer(torch.randn(2, 8, 5, 5)).sum().backward()
        picked.append(method.take_selection(site.name))
    assert all(torch.equal(p, picked[0]) for p in picked)
    kept = int(picked[0].sum())
    assert kept == 4 if selection == "topk" else 1 <= kept <= 4  # crs draws with replacement


def test_records_are_the_union_over_forwards_and_mark_the_weight_gradient_support():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1, groups=2)
    method = ForwardSampling(0.25)  # k = 1 of 4 channels per group
    approximate(layer, method, exclude=None)
    (site,) = patched_sites(layer)
    layer(torch.randn(2, 8, 5, 5)).sum().backward()
    assert method.take_selection(site.name) is None  # not tracking: nothing recorded
    method.track_selections(True)
    layer.weight.grad = None
    for _ in range(4):  # accumulated micro-batches
        layer(torch.randn(2, 8, 5, 5)).sum().backward()
    mask = method.take_selection(site.name)
    assert mask.shape == (2, 4) and mask.dtype == torch.bool
    support = SlicedWeight(site, method, layer.weight, groups=2).expand(mask)
    assert support.shape == layer.weight.shape
    assert torch.count_nonzero(layer.weight.grad[~support]) == 0  # zero outside the recorded channels
    assert method.take_selection(site.name) is None  # taking clears the record


def test_linear_records_and_ratio_one_records_everything():
    layer = nn.Linear(8, 3)
    method = ForwardSampling(1.0)
    approximate(layer, _AlwaysThrough([method]), exclude=None)
    method.track_selections(True)
    (site,) = patched_sites(layer)
    layer(torch.randn(4, 8)).sum().backward()
    mask = method.take_selection(site.name)
    assert mask.shape == (1, 8) and bool(mask.all())


class _AlwaysThrough(Pipeline):
    is_exact = False  # run the method's own forward even at ratio 1.0
