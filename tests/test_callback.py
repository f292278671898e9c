"""ApproxBackward through a real Trainer: patch at fit start, exact layers after, schedules
follow progress, logs, resume, and restore when fit raises."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approx import ApproxBackward, ConfigError
from lightning_approx.layers import ApproxConv2d
from lightning_approx.schedules import Linear
from lightning_approx.surgery import patched_sites
from tests.logs import read_metrics_csv


class TinyCNN(pl.LightningModule):
    def __init__(self, fail_at_step: int | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.fail_at_step = fail_at_step
        self.seen_types: list[type] = []

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        self.seen_types.append(type(self.conv))
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch)


def trainer(tmp_path, callbacks, **kw):
    kw = {"log_every_n_steps": 1, **kw}
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path),
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, **kw)


def test_fit_patches_during_training_and_leaves_exact_layers(tmp_path):
    model = TinyCNN()
    cb = ApproxBackward("crs", sample_ratio=0.5)
    trainer(tmp_path, [cb], max_epochs=1).fit(model, loader())
    assert set(model.seen_types) == {ApproxConv2d}
    assert type(model.conv) is nn.Conv2d and not hasattr(model.conv, "approx_site")
    assert cb.layer_names == ["conv"]
    metrics = trainer_metrics(tmp_path)
    assert metrics["approx/crs.sample_ratio"] == [0.5] * 4
    # Half the samples are drawn; repeated draws run once, so at most half the work is done.
    assert all(0 < w <= 0.5 + 1e-9 for w in metrics["approx/backward_work"])
    assert all(t > 0 for t in metrics["approx/step_time"])
    assert metrics["approx/work/conv"] == metrics["approx/backward_work"]


def trainer_metrics(tmp_path) -> dict[str, list[float]]:
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    return read_metrics_csv(path)


def test_schedule_follows_fractional_epochs(tmp_path):
    cb = ApproxBackward("crs", sample_ratio=Linear(start=1.0, end=0.5, begin=0, until=2))
    trainer(tmp_path, [cb], max_epochs=3).fit(TinyCNN(), loader())
    ratios = trainer_metrics(tmp_path)["approx/crs.sample_ratio"]
    expected = [1.0 - 0.5 * min(1.0, (e + b / 4) / 2) for e in range(3) for b in range(4)]
    assert ratios == pytest.approx(expected)
    work = trainer_metrics(tmp_path)["approx/backward_work"]
    assert work[0] == 1.0 and work[-1] == pytest.approx(0.5)


def test_layers_restored_when_fit_raises(tmp_path):
    model = TinyCNN(fail_at_step=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [ApproxBackward("crs", sample_ratio=0.5)], max_epochs=1).fit(model, loader())
    assert ApproxConv2d in model.seen_types
    assert type(model.conv) is nn.Conv2d and not hasattr(model.conv, "approx_site")


def test_resume_continues_schedule_and_random_streams(tmp_path):
    def run(root, max_epochs, ckpt_path=None):
        pl.seed_everything(0)
        model = TinyCNN()
        cb = ApproxBackward("crs", sample_ratio=Linear(start=1.0, end=0.25, begin=0, until=4), seed=3)
        t = trainer(root, [cb, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)], max_epochs=max_epochs)
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model, root

    straight, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, root = run(tmp_path / "c", 4, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    ratios = trainer_metrics(root)["approx/crs.sample_ratio"]
    assert ratios[0] == pytest.approx(1.0 - 0.75 * 2 / 4)  # starts at epoch 2, not 0


def test_callback_from_yaml_and_class_path(tmp_path):
    from jsonargparse import ArgumentParser

    yaml = """
    cb:
      class_path: lightning_approx.ApproxBackward
      init_args:
        method: crs
        sample_ratio:
          class_path: lightning_approx.schedules.Cosine
          init_args: {start: 1.0, end: 0.25, begin: 0, until: 10}
        exclude: [auto]
    """
    parser = ArgumentParser()
    parser.add_argument("--cb", type=pl.Callback)
    cfg = parser.parse_string(yaml)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    cb = instantiate(cfg).cb
    assert isinstance(cb, ApproxBackward)
    assert cb.pipeline.methods[0].schedule("sample_ratio").to_config()["type"] == "cosine"
    # omegaconf: the method config written by one callback builds an equal one
    conf = OmegaConf.create({"method": cb.pipeline.to_config()})
    again = ApproxBackward(method=conf.method)
    assert again.pipeline.to_config() == cb.pipeline.to_config()
    assert OmegaConf.to_yaml(conf)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"method": "nope"}, "method"), ({"sample_ratio": 0}, "crs.sample_ratio"),
     ({"sample_ratio": {"type": "linear", "start": 1.0, "end": 0.5, "begin": 5, "until": 2}}, "crs.sample_ratio"),
     ({"active_epochs": 4}, "active_epochs"), ({"active_epochs": [4]}, "active_epochs"),
     ({"active_epochs": "4,8"}, "active_epochs"), ({"active_epochs": [-1, None]}, "active_epochs"),
     ({"active_epochs": [4, 4]}, "active_epochs"), ({"active_epochs": [None, 4]}, "active_epochs"),
     ({"active_epochs": [True, 4]}, "active_epochs"), ({"active_epochs": [0, float("nan")]}, "active_epochs")],
)
def test_bad_configuration_fails_at_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ApproxBackward(**kwargs)
    assert err.value.field.startswith(field) and "Fix:" in str(err.value)


def test_exclude_pattern_matching_nothing_fails_at_setup(tmp_path):
    with pytest.raises(ConfigError, match=r"exclude\[0\]"):
        trainer(tmp_path, [ApproxBackward("crs", exclude=["missing.*"])], max_epochs=1).fit(TinyCNN(), loader())



class LateLayers(TinyCNN):
    """Builds its layers in ``hook`` (the model of Lightning's docs for large models)."""

    def __init__(self, hook):
        pl.LightningModule.__init__(self)
        self.hook, self.fail_at_step, self.seen_types = hook, None, []

    def build(self):
        if not hasattr(self, "conv"):
            self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

    def setup(self, stage):
        if self.hook == "setup":
            self.build()

    def configure_model(self):
        if self.hook == "configure_model":
            self.build()


class OneLateLayer(TinyCNN):
    """Builds one more conv in ``configure_model``, after the callbacks' setup patched the others."""

    def configure_model(self):
        if not hasattr(self, "late"):
            self.late = nn.Conv2d(8, 8, 3, padding=1)


def test_a_layer_added_after_setup_is_refused_at_fit_start_and_nothing_stays_patched(tmp_path):
    model = OneLateLayer()
    with pytest.raises(ConfigError, match=r"model='OneLateLayer'.*\['late'\].*Fix: build the layers in"):
        trainer(tmp_path, [ApproxBackward("crs")], max_epochs=1).fit(model, loader())
    assert not patched_sites(model)


@pytest.mark.parametrize("hook", ["setup", "configure_model"])
def test_layers_built_after_the_callbacks_setup_are_refused_with_the_reason(tmp_path, hook):
    with pytest.raises(ConfigError, match=r"model='LateLayers'.*configure_model\(\).*Fix: build the layers in") as err:
        trainer(tmp_path, [ApproxBackward("crs")], max_epochs=1).fit(LateLayers(hook), loader())
    assert err.value.field == "model" and "exclude" not in str(err.value)


def test_excluding_every_layer_still_blames_exclude(tmp_path):
    with pytest.raises(ConfigError, match=r"exclude='\*'.*leaves no Conv2d/Linear layer"):
        trainer(tmp_path, [ApproxBackward("crs", exclude="*")], max_epochs=1).fit(TinyCNN(), loader())


def test_a_second_approx_backward_is_refused_and_nothing_stays_patched(tmp_path):
    model = TinyCNN()
    callbacks = [ApproxBackward("crs"), ApproxBackward("grad_prune")]
    with pytest.raises(ConfigError, match=r"method=\['grad_prune'\].*already patched.*Fix: use one ApproxBackward"):
        trainer(tmp_path, callbacks, max_epochs=1).fit(model, loader())
    assert type(model.conv) is nn.Conv2d and not hasattr(model.conv, "approx_site") and model.seen_types == []


class Evaluated(TinyCNN):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)


def test_one_callback_serves_repeated_fits_trainers_and_evaluations(tmp_path):
    model, cb = Evaluated(), ApproxBackward("crs", sample_ratio=0.5)
    t = trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=False)
    t.fit(model, loader(), loader())
    t.fit_loop.max_epochs = 2
    t.fit(model, loader(), loader())  # the same Trainer again
    t.validate(model, loader())
    t.test(model, loader())
    trainer(tmp_path / "other", [cb], max_epochs=1, enable_checkpointing=False).fit(model, loader())  # another Trainer
    assert model.seen_types == [ApproxConv2d] * 12 and cb.layer_names == ["conv"]
    assert type(model.conv) is nn.Conv2d and not hasattr(model.conv, "approx_site")

def test_gradient_fidelity_is_logged_on_probe_steps(tmp_path):
    cb = ApproxBackward("crs", sample_ratio=0.5, fidelity_every_n_steps=2)
    trainer(tmp_path, [cb], max_epochs=1).fit(TinyCNN(), loader())
    metrics = trainer_metrics(tmp_path)
    cos = metrics["approx/fidelity/weight.cos"]
    assert len(cos) == 2  # steps 0 and 2 of 4
    assert all(0 < c < 1 for c in cos)
    assert all(e > 0 for e in metrics["approx/fidelity/input.rel_err"])
    assert metrics["approx/fidelity/conv/weight.cos"] == cos


def test_metrics_are_logged_on_the_trainers_logging_steps_and_work_counted_on_every_step(tmp_path):
    def run(root, every):
        pl.seed_everything(0)
        model, cb = TinyCNN(), ApproxBackward("crs", sample_ratio=0.5)
        logged = []
        log_dict = model.log_dict
        model.log_dict = lambda metrics, **kw: (logged.append(metrics), log_dict(metrics, **kw))[1]
        trainer(root, [cb], max_epochs=2, log_every_n_steps=every).fit(model, loader())
        return cb, logged

    every_step, logged_every_step = run(tmp_path / "a", 1)
    third, logged_third = run(tmp_path / "b", 3)
    assert len(logged_every_step) == 8 and len(logged_third) == 2  # steps 3 and 6 of 8
    def untimed(metrics):
        return {k: v for k, v in metrics.items() if k != "approx/step_time"}

    assert [untimed(m) for m in logged_third] == [untimed(logged_every_step[i]) for i in (2, 5)]
    assert (third.totals.exact, third.totals.computed) == (every_step.totals.exact, every_step.totals.computed)
    assert trainer_metrics(tmp_path / "b")["approx/backward_work"] == [m["approx/backward_work"] for m in logged_third]


def test_gradient_fidelity_is_one_at_the_exact_setting():
    from lightning_approx.methods import CRS, Pipeline
    from lightning_approx.surgery import approximate, patched_sites

    class Through(Pipeline):
        is_exact = False

    layer = nn.Conv2d(4, 6, 3)
    approximate(layer, Through([CRS(sample_ratio=1.0)]), exclude=None)
    site = patched_sites(layer)[0]
    site.probe = True
    layer(torch.randn(3, 4, 6, 6, requires_grad=True)).sum().backward()
    assert site.fidelity["weight.cos"] == pytest.approx(1.0) and site.fidelity["weight.rel_err"] < 1e-6
    assert site.fidelity["input.cos"] == pytest.approx(1.0) and not site.probe


@pytest.mark.parametrize("method", ["patch_grad", "crs", "batch_crs"])
def test_active_epochs_run_the_plain_layers_outside_the_window(tmp_path, method):
    kw = {} if method == "patch_grad" else {"sample_ratio": 0.5}
    model = TinyCNN()
    cb = ApproxBackward(method, active_epochs=[1, 2], exclude=None, **kw)
    trainer(tmp_path, [cb], max_epochs=3).fit(model, loader())
    metrics = trainer_metrics(tmp_path)
    assert metrics["approx/active"] == [0.0] * 4 + [1.0] * 4 + [0.0] * 4
    work = metrics["approx/backward_work"]
    assert work[:4] == [1.0] * 4 and work[8:] == [1.0] * 4  # exact: the plain op, counted in full
    assert all(w < 1.0 for w in work[4:8])
    assert not any(m.suspended for m in cb.pipeline.methods)  # nothing left suspended after fit


def test_outside_active_epochs_training_is_the_exact_training(tmp_path):
    # Until the window opens the patched model must train as the plain one does, bit for bit.
    def fit(root, callbacks):
        pl.seed_everything(0)
        model = TinyCNN()
        trainer(root, callbacks, max_epochs=1).fit(model, loader())
        return model

    plain = fit(tmp_path / "plain", [])
    late = fit(tmp_path / "late", [ApproxBackward("crs", sample_ratio=0.25, active_epochs=[1, None])])
    for p, q in zip(plain.parameters(), late.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
