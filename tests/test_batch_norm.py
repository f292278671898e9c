"""Batch-norm recalibration: the function against the plain average of batch statistics, and
ApproxBackward's ``recalibrate_bn`` through a real Trainer."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approx import ApproxBackward, ConfigError
from lightning_approx.batch_norm import recalibrate_batch_norm
from lightning_approx.methods import ForwardSampling


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 5, 5, generator=g) * (i + 1) for i in range(n)]


def test_recalibration_is_the_plain_average_of_the_batch_statistics():
    net = bn_net().eval()
    xs = batches()
    assert recalibrate_batch_norm(net, xs) == len(xs)
    # By hand: each batch's mean and unbiased variance at the first BN, averaged with equal weight.
    pre = [net[0](x) for x in xs]
    mean = torch.stack([p.mean((0, 2, 3)) for p in pre]).mean(0)
    var = torch.stack([p.var((0, 2, 3), unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert not net.training  # the mode it was in
    assert net[1].momentum == 0.1 and int(net[1].num_batches_tracked) == len(xs)


def statistics(net: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def test_an_exception_or_no_batches_changes_nothing():
    net = bn_net().train()
    net(batches(1, seed=5)[0])  # running statistics away from their initial values
    before = statistics(net)

    def failing():
        yield batches(1)[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        recalibrate_batch_norm(net, failing())
    assert all(torch.equal(a, b) for a, b in zip(before, statistics(net), strict=True))
    assert net.training and all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert recalibrate_batch_norm(net, []) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, statistics(net), strict=True))
    assert recalibrate_batch_norm(nn.Linear(2, 2), batches()) == 0  # nothing to recalibrate



def test_frozen_batch_norms_and_every_modules_mode_are_kept():
    net = bn_net().train()
    net[1].eval()  # frozen, as when fine-tuning
    net[2].eval()  # a module's own mode, which model.train(flag) would overwrite
    before = statistics(net)
    xs = batches()
    assert recalibrate_batch_norm(net, xs) == len(xs)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], statistics(net)[:3], strict=True))
    assert [m.training for m in net.modules()] == [True, True, False, False, True, True, True]
    # The second one averages the statistics of the network with the first normalising by its own.
    pre = [net[3](net[2](net[1](net[0](x)))) for x in xs]
    torch.testing.assert_close(net[4].running_mean, torch.stack([p.mean((0, 2, 3)) for p in pre]).mean(0))


def test_frozen_layers_can_be_named_and_are_checked():
    net = bn_net().eval()
    before = statistics(net)
    assert recalibrate_batch_norm(net, batches(), frozen=[net[4]]) == 3
    after = statistics(net)
    assert not torch.equal(before[0], after[0])
    assert all(torch.equal(a, b) for a, b in zip(before[3:], after[3:], strict=True))
    assert recalibrate_batch_norm(net, batches(), frozen=[net[1], net[4]]) == 0  # nothing left to recalibrate
    with pytest.raises(ConfigError, match=r"frozen\[0\]='Conv2d'.*Fix: list layers from"):
        recalibrate_batch_norm(net, batches(), frozen=[net[0]])
    with pytest.raises(ConfigError, match=r"frozen='BatchNorm2d'.*must be a list"):
        recalibrate_batch_norm(net, batches(), frozen=net[1])
    assert not any(m.training for m in net.modules())

class BNClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(torch.relu(self.stem(x))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                      batch_size=8)


def fit(tmp_path, recalibrate_bn: int) -> BNClassifier:
    model = BNClassifier()
    cb = ApproxBackward(ForwardSampling(sample_ratio=0.5), recalibrate_bn=recalibrate_bn)
    pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               callbacks=[cb]).fit(model, data(), data())
    return model


def test_fit_ends_with_statistics_of_the_exact_network(tmp_path):
    model = fit(tmp_path, recalibrate_bn=2)
    # The same two batches through the final (exact) network give the same statistics.
    expected = copy.deepcopy(model)
    recalibrate_batch_norm(expected, [x for x, _ in list(data())[:2]])
    bn, ref = model.body[1], expected.body[1]
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    # Without recalibration they are the training forward's moving averages, which differ.
    plain = fit(tmp_path, recalibrate_bn=0).body[1]
    assert not torch.allclose(plain.running_mean, ref.running_mean)



class FrozenBN(BNClassifier):
    def on_train_epoch_start(self):
        self.body[1].eval()  # Lightning puts the model in training mode before each epoch


def test_callback_leaves_batch_norms_frozen_during_training_untouched(tmp_path):
    model = FrozenBN()
    cb = ApproxBackward(ForwardSampling(sample_ratio=0.5), recalibrate_bn=2)
    pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(model, data(), data())
    bn = model.body[1]
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.running_var, torch.ones(8))
    assert int(bn.num_batches_tracked) == 0

@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"method": ForwardSampling(), "recalibrate_bn": -1}, "whole number"),
    ({"method": ForwardSampling(), "recalibrate_bn": True}, "whole number"),
    ({"method": "crs", "recalibrate_bn": 5}, "leave the training forward exact"),
])
def test_bad_recalibration_settings_fail_at_construction(kwargs, problem):
    with pytest.raises(ConfigError, match="recalibrate_bn") as info:
        ApproxBackward(**kwargs)
    assert problem in str(info.value)


def test_forward_method_without_recalibration_warns(tmp_path):
    with pytest.warns(UserWarning, match="recalibrate_bn"):
        fit(tmp_path, recalibrate_bn=0)


def test_recalibrates_before_each_validation_and_not_twice_without_training(tmp_path, monkeypatch):
    import lightning_approx.callbacks.approx_backward as approx_backward

    calls = []
    real = approx_backward.recalibrate_batch_norm

    def spy(model, inputs, **kwargs):
        calls.append((model.trainer.sanity_checking, model.trainer.validating, model.trainer.global_step))
        return real(model, inputs, **kwargs)

    monkeypatch.setattr(approx_backward, "recalibrate_batch_norm", spy)
    fit(tmp_path, recalibrate_bn=1)
    # Not for the sanity check; before the validations after epochs 0 and 1 (4 steps each); not
    # again at the end of training, since no step ran after the last validation.
    assert calls == [(False, True, 4), (False, True, 8)]


class DictBatches(BNClassifier):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        pass


def test_a_batch_without_a_findable_input_is_refused_and_changes_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(3, 8, 8, generator=g), "y": i % 4} for i in range(16)]
    model = DictBatches()
    seen = []  # the statistics after each training step, the last of them right before validation

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(statistics(pl_module))

    cb = ApproxBackward(ForwardSampling(sample_ratio=0.5), recalibrate_bn=2)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[cb, Snapshot()])
    with pytest.raises(ConfigError, match=r"recalibrate_bn.*dict"):
        trainer.fit(model, DataLoader(rows, batch_size=8), DataLoader(rows, batch_size=8))
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen[-1], statistics(model), strict=True))
    assert type(model.body[0]) is nn.Conv2d  # the exact layer is back
