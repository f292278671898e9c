"""KernelRescaling: the scaling identity, the switch (shapes, optimizer state), a Trainer fit
through it, resume on either side of it, checkpoints, and bad settings."""

from __future__ import annotations

import csv
import math
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approx import ApproxBackward, ConfigError, KernelRescaling
from lightning_approx.callbacks import kernel_rescaling
from lightning_approx.ops.rescale import (
    AxisGrid,
    resample_kernel,
    resample_matrix,
    rescaled_axis,
    rescaled_kernel_size,
    resize_images,
)
from lightning_approx.schedules import Step


# --- the numeric core ---------------------------------------------------------------------
def smooth_images(n: int, size: int, cutoff: int = 3, seed: int = 0) -> torch.Tensor:
    """Band-limited images: only the lowest ``cutoff`` frequencies per axis."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, dtype=torch.float64, generator=g)
    f = torch.fft.fftfreq(size) * size
    keep = (f[:, None].abs() <= cutoff) & (f[None, :].abs() <= cutoff)
    return torch.fft.ifft2(torch.fft.fft2(x) * keep).real


def rel_error(ref: torch.Tensor, out: torch.Tensor, margin: int = 4) -> float:
    """Relative error away from the border (zero padding differs there by construction)."""
    h = min(ref.shape[-1], out.shape[-1])
    r, o = ref[..., margin:h - margin, margin:h - margin], out[..., margin:h - margin, margin:h - margin]
    return float((r - o).norm() / r.norm())


@pytest.mark.parametrize(("kernel", "scale", "stride"),
                         [(5, 0.5, 1), (5, 0.5, 2), (7, 0.5, 1), (7, 0.5, 2), (11, 0.5, 2), (7, 0.75, 1),
                          (7, 0.75, 2), (11, 0.25, 1), (9, 0.5, 1)])
def test_scaling_identity(kernel, scale, stride):
    x = smooth_images(2, 128)
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    pad = (kernel - 1) // 2
    size, small_pad, grid = rescaled_axis(kernel, stride, pad, scale)
    full = AxisGrid(kernel, 1.0)
    assert size < kernel or scale > 0.5

    def both_ways(w_full, w_small):
        ref = resize_images(F.conv2d(x, w_full, stride=stride, padding=pad), scale)
        out = F.conv2d(resize_images(x, scale), w_small, stride=stride, padding=small_pad)
        assert ref.shape == out.shape
        return rel_error(ref, out)

    # down: a full-size kernel rescaled to the small grid
    w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, generator=g)
    small = resample_kernel(w, (full, full), (grid, grid))
    assert small.shape[-2:] == (size, size)
    err_down = both_ways(w, small)
    # naive resize without the weight-sum factor, for scale: far off
    naive = F.interpolate(w, size=(size, size), mode="bilinear", align_corners=True)
    err_naive = both_ways(w, naive)
    # up: a small kernel (as trained at low resolution) rescaled to full size
    v = torch.randn(4, 3, size, size, dtype=torch.float64, generator=g)
    err_up = both_ways(resample_kernel(v, (grid, grid), (full, full)), v)
    assert err_down < 0.15 and err_up < 0.15, (err_down, err_up)
    assert err_naive > 3 * err_down


def test_resample_preserves_weight_sum_and_centroid():
    full = AxisGrid(7, 1.0)
    for stride in (1, 2):
        _, _, small = rescaled_axis(7, stride, 3, 0.5)
        for src, dst in ((full, small), (small, full)):
            m = resample_matrix(src, dst)
            torch.testing.assert_close(m.sum(0), torch.ones(src.size, dtype=torch.float64))
            # the centroid of every tap whose tent lies inside the destination grid is preserved
            src_pos, dst_pos = torch.tensor(src.positions()), torch.tensor(dst.positions())
            reach = max(1 / src.scale, 1 / dst.scale) - 1 / dst.scale
            inner = ((src_pos - reach >= dst_pos.min() - 1e-9) & (src_pos + reach <= dst_pos.max() + 1e-9)).double()
            assert inner.sum() >= 2
            centroid = (dst_pos.double()[:, None] * m).sum(0)
            torch.testing.assert_close(centroid * inner, src_pos.double() * inner, atol=1e-9, rtol=0)


def test_kernel_sizes_and_padding():
    assert [rescaled_kernel_size(k, 0.5) for k in (1, 3, 5, 7, 9, 11)] == [1, 1, 3, 3, 5, 5]
    assert rescaled_kernel_size(7, 0.75) == 5 and rescaled_kernel_size(4, 0.5) == 2
    assert rescaled_axis(7, 2, 3, 0.5)[:2] == (3, 1)  # ResNet stem: 7x7/2 pad 3 -> 3x3/2 pad 1
    assert rescaled_axis(7, 2, 3, 1.0) == (7, 3, AxisGrid(7, 1.0))
    assert rescaled_axis(7, 1, 3, 0.5)[2].shift == 0.0
    assert rescaled_axis(7, 2, 3, 0.5)[2].shift == pytest.approx(0.25)


# --- models and data --------------------------------------------------------------------------
class StemNet(pl.LightningModule):
    """7x7 stride-2 stem, a 3x3 (or ``conv_kernel``) conv, global pooling (or a flatten), a classifier."""

    def __init__(self, optimizer: str = "sgd", flatten: bool = False, direct: bool = False, size: int = 32,
                 conv_kernel: int = 3):
        super().__init__()
        head = [("flat", nn.Flatten()), ("fc", nn.Linear(8 * (size // 2) ** 2, 4))] if flatten else \
            [("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(8, 4))]
        self.net = nn.Sequential(OrderedDict([
            ("stem", nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)), ("bn", nn.BatchNorm2d(8)),
            ("relu", nn.ReLU()), ("conv", nn.Conv2d(8, 8, conv_kernel, padding=conv_kernel // 2)),
            ("relu2", nn.ReLU()), *head]))
        self.optimizer, self.direct = optimizer, direct
        self.seen: list[tuple[bool, tuple[int, int], tuple[int, int]]] = []

    def forward(self, x):
        self.seen.append((self.training, tuple(x.shape[-2:]), tuple(self.net.stem.weight.shape[-2:])))
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x) if self.direct else self(x)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n=16, batch=4, size=32):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch)


def trainer(tmp_path, callbacks, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("log_every_n_steps", 1)
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


class Probe(Callback):
    """Records, at each batch start (after KernelRescaling switched) and end, the stem weight
    object, its data and its optimizer state."""

    def __init__(self):
        self.start: list[dict] = []
        self.end: list[dict] = []

    def _record(self, trainer, pl_module):
        w = pl_module.net.stem.weight
        state = trainer.optimizers[0].state.get(w, {})
        return {"param": w, "data": w.data.clone(), "group": trainer.optimizers[0].param_groups[0]["params"][0],
                "state": {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)},
                "padding": pl_module.net.stem.padding, "kernel_size": pl_module.net.stem.kernel_size}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append(self._record(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end.append(self._record(trainer, pl_module))


# --- through a Trainer ------------------------------------------------------------------------
def test_fit_through_the_switch_sizes_shapes_and_validation(tmp_path):
    model = StemNet()
    cb = KernelRescaling(scale=0.5, epochs=1)
    trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=1).fit(model, loader(), loader())
    train = [s for s in model.seen if s[0]]
    assert train[:4] == [(True, (16, 16), (3, 3))] * 4  # epoch 0: half resolution, 3x3 stem
    assert train[4:] == [(True, (32, 32), (7, 7))] * 4  # epoch 1: full resolution, 7x7 stem
    evaluation = [s[1:] for s in model.seen if not s[0]]
    # the size check before the first low-resolution step: one forward at each resolution
    assert evaluation[:2] == [((16, 16), (3, 3)), ((32, 32), (7, 7))]
    assert evaluation[2:] == [((32, 32), (7, 7))] * 2  # validation: full resolution in both phases
    stem = model.net.stem
    assert stem.weight.shape == (8, 3, 7, 7) and stem.padding == (3, 3) and stem.kernel_size == (7, 7)
    assert [layer.name for layer in cb.layers] == ["net.stem"]  # the 3x3 conv keeps its kernel


def test_switch_keeps_parameters_and_resamples_momentum(tmp_path):
    probe = Probe()
    cb = KernelRescaling(scale=0.5, epochs=1)
    trainer(tmp_path, [cb, probe], max_epochs=2, limit_val_batches=0).fit(StemNet(), loader())
    before, after = probe.end[3], probe.start[4]  # last step at low resolution, first batch at full
    assert before["data"].shape == (8, 3, 3, 3) and after["data"].shape == (8, 3, 7, 7)
    assert after["param"] is before["param"] is after["group"]  # same Parameter, still in the optimizer
    assert after["padding"] == (3, 3) and before["padding"] == (1, 1)
    layer = cb.layers[0]
    up = (layer.grids(0.5), layer.grids(1.0))
    torch.testing.assert_close(after["data"], resample_kernel(before["data"], *up))
    buf = before["state"]["momentum_buffer"]
    assert buf.shape == (8, 3, 3, 3)
    torch.testing.assert_close(after["state"]["momentum_buffer"], resample_kernel(buf, *up))
    # the first step (before any switch) moved the kernel down the same way
    assert probe.start[0]["data"].shape == (8, 3, 3, 3)


def test_switch_with_adam_resample_and_reset(tmp_path):
    for policy in ("resample", "reset"):
        probe = Probe()
        cb = KernelRescaling(scale=0.5, epochs=1, optimizer_state=policy)
        trainer(tmp_path, [cb, probe], max_epochs=2, limit_val_batches=0).fit(StemNet("adam"), loader())
        state = probe.start[4]["state"]
        if policy == "reset":
            assert state == {}
        else:
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (8, 3, 7, 7)
            assert (state["exp_avg_sq"] >= 0).all() and state["step"] == probe.end[3]["state"]["step"]
        assert probe.end[-1]["state"]["exp_avg"].shape == (8, 3, 7, 7)  # training went on at full size


def test_several_steps_and_logged_scale(tmp_path):
    model = StemNet()
    cb = KernelRescaling(scale=Step(values=[0.5, 0.75, 1.0], milestones=[1, 2]))
    t = trainer(tmp_path, [cb], max_epochs=3, limit_val_batches=0, logger=pl.loggers.CSVLogger(tmp_path))
    t.fit(model, loader())
    train = [s[1:] for s in model.seen if s[0]]
    assert train == [((16, 16), (3, 3))] * 4 + [((24, 24), (5, 5))] * 4 + [((32, 32), (7, 7))] * 4

    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        scales = [float(r["kernel_rescaling/scale"]) for r in csv.DictReader(f) if r["kernel_rescaling/scale"]]
    assert scales == [0.5] * 4 + [0.75] * 4 + [1.0] * 4


def test_scale_is_logged_on_logging_steps_only(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, name, value, **kw: logged.append((name, value)))
    cb = KernelRescaling(scale=Step(values=[0.5, 1.0], milestones=[1]))
    t = trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=0, log_every_n_steps=3)
    t.fit(StemNet(), loader())  # 4 batches an epoch: steps 2 and 5 are logging steps (0-based)
    assert logged == [("kernel_rescaling/scale", 0.5), ("kernel_rescaling/scale", 1.0)]


def run_with_checkpoints(root, ckpt_path=None, max_epochs=3):
    pl.seed_everything(0)
    model = StemNet()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    t = trainer(root, [KernelRescaling(scale=0.5, epochs=1), ckpt], max_epochs=max_epochs, limit_val_batches=1,
                enable_checkpointing=True)
    t.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model


def test_resume_before_and_after_the_switch(tmp_path):
    straight = run_with_checkpoints(tmp_path / "a")
    low = torch.load(tmp_path / "a" / "ckpt" / "epoch=0.ckpt", weights_only=False)
    (state,) = [v for k, v in low["callbacks"].items() if k.startswith("KernelRescaling")]
    assert state["scale"] == 0.5 and state["weights"]["net.stem"].shape == (8, 3, 3, 3)
    assert low["state_dict"]["net.stem.weight"].shape == (8, 3, 7, 7)  # the model's state is always full size
    assert low["optimizer_states"][0]["state"][0]["momentum_buffer"].shape == (8, 3, 7, 7)  # full size too
    assert state["optimizer_state"][0]["state"]["momentum_buffer"].shape == (8, 3, 3, 3)  # the exact one
    fresh = StemNet()  # a checkpoint from the low-resolution phase loads into a fresh full-size model
    fresh.load_state_dict(low["state_dict"])
    for epoch in (0, 1):  # 0: saved at low resolution, 1: saved after the switch
        resumed = run_with_checkpoints(tmp_path / f"r{epoch}", tmp_path / "a" / "ckpt" / f"epoch={epoch}.ckpt")
        for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"resumed from epoch {epoch}: {name}")
        train = [s[1:] for s in resumed.seen if s[0]]
        assert train == [((32, 32), (7, 7))] * 4 * (2 - epoch)


def test_low_resolution_checkpoint_resumes_with_or_without_the_callback(tmp_path):
    class Save(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != 2:
                return
            state = trainer.optimizers[0].state[pl_module.net.stem.weight]
            live = state["momentum_buffer"]
            trainer.save_checkpoint(tmp_path / "low.ckpt")
            assert state["momentum_buffer"] is live and live.shape == (8, 3, 3, 3)  # training's state untouched

    cb = KernelRescaling(scale=0.5, epochs=1)
    trainer(tmp_path, [cb, Save()], max_epochs=2, limit_val_batches=0).fit(StemNet(), loader())
    ckpt = torch.load(tmp_path / "low.ckpt", weights_only=False)
    (entry,) = ckpt["callbacks"]["KernelRescaling"]["optimizer_state"]
    small, weight = entry["state"]["momentum_buffer"], ckpt["callbacks"]["KernelRescaling"]["weights"]["net.stem"]
    up = (cb.layers[0].grids(0.5), cb.layers[0].grids(1.0))
    full = ckpt["optimizer_states"][0]["state"][entry["param"]]["momentum_buffer"]
    torch.testing.assert_close(full, resample_kernel(small, *up))  # the map of the switch to full size
    # without the callback: a plain fit resumes at full size, from the resampled state
    probe = Probe()
    trainer(tmp_path, [probe], max_epochs=2, limit_val_batches=0).fit(StemNet(), loader(),
                                                                       ckpt_path=tmp_path / "low.ckpt")
    torch.testing.assert_close(probe.start[0]["state"]["momentum_buffer"], full, rtol=0, atol=0)
    torch.testing.assert_close(probe.start[0]["data"], resample_kernel(weight, *up), rtol=0, atol=0)
    # with it: the exact small weight and momentum are back
    probe = Probe()
    trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1), probe], max_epochs=2, limit_val_batches=0).fit(
        StemNet(), loader(), ckpt_path=tmp_path / "low.ckpt")
    torch.testing.assert_close(probe.start[0]["state"]["momentum_buffer"], small, rtol=0, atol=0)
    torch.testing.assert_close(probe.start[0]["data"], weight, rtol=0, atol=0)


def test_state_dict_is_full_size_and_loads_either_size(tmp_path):
    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx or trainer.current_epoch:
                return
            sd = pl_module.state_dict()
            assert sd["net.stem.weight"].shape == (8, 3, 7, 7)
            assert pl_module.net.stem.weight.shape == (8, 3, 3, 3)
            small = pl_module.net.stem.weight.detach().clone()
            pl_module.load_state_dict(sd)  # full size in, rescaled to the current size
            assert pl_module.net.stem.weight.shape == (8, 3, 3, 3)
            assert (pl_module.net.stem.weight - small).norm() < small.norm()
            sd["net.stem.weight"] = small
            pl_module.load_state_dict(sd)  # current size in: exact
            torch.testing.assert_close(pl_module.net.stem.weight.detach(), small)

    trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1), Check()], max_epochs=2,
            limit_val_batches=0).fit(StemNet(), loader())


def test_with_approx_backward_on_the_rescaled_layer(tmp_path):
    model = StemNet()
    cbs = [ApproxBackward("crs", sample_ratio=0.5, exclude=["net.fc"]), KernelRescaling(scale=0.5, epochs=1)]
    trainer(tmp_path, cbs, max_epochs=2, limit_val_batches=1).fit(model, loader(), loader())
    train = [s[1:] for s in model.seen if s[0]]
    assert train == [((16, 16), (3, 3))] * 4 + [((32, 32), (7, 7))] * 4
    assert type(model.net.stem) is nn.Conv2d and model.net.stem.padding == (3, 3)


def test_imagenet_resnet_stem_at_low_resolution(tmp_path):
    from lightning_approx.classifier import ImageClassifier

    model = ImageClassifier("resnet18", num_classes=4, lr_schedule="none")
    cb = KernelRescaling(scale=0.5, fraction=0.5)
    trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=1, limit_val_batches=1).fit(
        model, loader(n=2, batch=2, size=64), loader(n=2, batch=2, size=64))
    assert [layer.name for layer in cb.layers] == ["net.conv1"]
    assert model.net.conv1.weight.shape == (64, 3, 7, 7)


# --- failures: everything put back ------------------------------------------------------------------
class FlakyResample:
    """Stands in for the callback's ``resample_kernel`` and runs out of memory on the calls in ``fail_on``."""

    def __init__(self, monkeypatch, fail_on=()):
        self.calls, self.fail_on = 0, set(fail_on)
        monkeypatch.setattr(kernel_rescaling, "resample_kernel", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise torch.OutOfMemoryError(f"simulated: out of memory in resample call {self.calls}")
        return resample_kernel(*args, **kwargs)


def conv_geometry(model):
    return {name: (m.weight.shape, m.kernel_size, m.padding, m._reversed_padding_repeated_twice)
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_switch_failing_part_way_is_undone(tmp_path, monkeypatch):
    model = StemNet(conv_kernel=5)  # two rescaled layers: the stem and the 5x5 conv
    before, params = conv_geometry(model), dict(model.named_parameters())
    assert type(before["net.stem"][3]) is tuple  # torch's own type, which a restore keeps
    FlakyResample(monkeypatch, fail_on={2})  # the first switch moves the stem, then fails on the 5x5 conv
    with pytest.raises(torch.OutOfMemoryError):
        trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1)], max_epochs=2).fit(model, loader())
    assert conv_geometry(model) == before and dict(model.named_parameters()) == params
    assert all(p is params[name] for name, p in model.named_parameters())
    assert not model._forward_pre_hooks and not model.net.stem._state_dict_hooks

    # the switch itself: the next one moves exactly the layers that are not at its scale yet
    cb = KernelRescaling(scale=0.5, epochs=1)
    cb.layers = cb._select_layers(model)
    FlakyResample(monkeypatch, fail_on={2})
    with pytest.raises(torch.OutOfMemoryError):
        cb._switch(0.5)
    assert [layer.scale for layer in cb.layers] == [0.5, 1.0] and cb.scale == 1.0
    cb._switch(1.0)
    assert conv_geometry(model) == before and cb.scale == 1.0


def test_failing_restore_warns_and_lets_the_training_error_through(tmp_path, monkeypatch):
    flaky = FlakyResample(monkeypatch)
    seen = []

    class Boom(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                flaky.fail_on = {flaky.calls + 1}  # putting the stem back runs out of memory
                raise RuntimeError("training failed")

    class Later(Callback):
        def on_exception(self, trainer, pl_module, exception):
            seen.append(exception)

    model = StemNet(conv_kernel=5)
    with pytest.raises(RuntimeError, match="training failed"), \
            pytest.warns(UserWarning, match=r"could not put back.*net\.stem \(OutOfMemoryError") as warned:
        trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1), Boom(), Later()], max_epochs=2).fit(
            model, loader())
    assert [str(e) for e in seen] == ["training failed"]  # the later callbacks' on_exception still ran
    assert "net.conv" not in str(warned[0].message)  # restored after the stem failed
    assert model.net.conv.weight.shape == (8, 8, 5, 5) and model.net.conv.padding == (2, 2)
    assert model.net.stem.weight.shape == (8, 3, 3, 3)  # the one it could not restore, named above
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("where", ["setup", "configure_model"])
def test_layers_built_after_the_callbacks_setup_are_refused(tmp_path, where):
    class Late(StemNet):
        def __init__(self):
            super().__init__()
            del self.net  # built below, after the callbacks' setup

        def setup(self, stage):
            if where == "setup":
                self.net = StemNet().net

        def configure_model(self):
            if where == "configure_model" and not hasattr(self, "net"):
                self.net = StemNet().net

    model = Late()
    with pytest.raises(ConfigError, match=r"net\.stem.*configure_model") as err:
        trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1)], max_epochs=2).fit(model, loader())
    assert err.value.field == "model" and "__init__" in err.value.fix
    assert not model.seen


def test_model_without_kernels_to_rescale_resizes_the_input_only(tmp_path):
    model = StemNet()  # like ResNet-20 (3x3 convs only, the recommended recipe)
    cb = KernelRescaling(scale=0.5, epochs=1, min_kernel_size=9)
    trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=0).fit(model, loader())
    assert cb.layers == [] and [s[1] for s in model.seen if s[0]] == [(16, 16)] * 4 + [(32, 32)] * 4


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"scale": 0.0}, "scale"), ({"scale": 1.0}, "scale"), ({"scale": 1.5}, "scale"), ({"scale": -0.5}, "scale"),
     ({"scale": 0.5, "fraction": 1.0}, "fraction"), ({"scale": 0.5, "fraction": 1.5}, "fraction"),
     ({"scale": 0.5, "fraction": 0.0}, "fraction"), ({"scale": 0.5, "epochs": -1}, "epochs"),
     ({"scale": 0.5, "epochs": 2, "fraction": 0.5}, "fraction"),
     ({"scale": Step(values=[0.5, 0.75], milestones=[2])}, "scale.values[1]"),
     ({"scale": {"type": "step", "values": [0.0, 1.0], "milestones": [2]}}, "scale.values[0]"),
     ({"scale": {"type": "linear", "start": 0.5, "end": 1.0, "until": 2}}, "scale"),
     ({"scale": Step(values=[0.5, 1.0], milestones=[2]), "epochs": 2}, "epochs"),
     ({"min_kernel_size": 1}, "min_kernel_size"), ({"resize_mode": "nearest"}, "resize_mode"),
     ({"optimizer_state": "keep"}, "optimizer_state")],
)
def test_bad_settings_fail_at_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        KernelRescaling(**kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)


@pytest.mark.parametrize(("kwargs", "field"), [({"epochs": 2}, "epochs"), ({"epochs": 5}, "epochs"),
                                              ({"scale": Step(values=[0.5, 1.0], milestones=[3])},
                                               "scale.milestones[0]")])
def test_switch_at_or_after_the_end_fails_before_training(tmp_path, kwargs, field):
    model = StemNet()
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, [KernelRescaling(**{"scale": 0.5, **kwargs})], max_epochs=2).fit(model, loader())
    assert err.value.field == field and "Fix:" in str(err.value) and "max_epochs=2" in str(err.value)
    assert not model.seen


def test_fixed_input_size_network_is_refused(tmp_path):
    model = StemNet(flatten=True)
    with pytest.raises(ConfigError, match="AdaptiveAvgPool2d") as err:
        trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1)], max_epochs=2).fit(model, loader())
    assert err.value.field == "scale" and "16x16" in str(err.value)
    assert model.net.stem.weight.shape == (8, 3, 7, 7)  # put back at full size on the way out
    assert not [s for s in model.seen if s[0]]  # not a single training step ran


def test_input_module_is_found_or_named(tmp_path):
    model = StemNet(direct=True)  # training_step calls self.net(x): the hook on the module never fires
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1)], max_epochs=2).fit(model, loader())
    assert err.value.field == "input_module" and "Fix:" in str(err.value)
    model = StemNet(direct=True)
    trainer(tmp_path, [KernelRescaling(scale=0.5, epochs=1, input_module="net")], max_epochs=2,
            limit_val_batches=0).fit(model, loader())
    assert model.net.stem.weight.shape == (8, 3, 7, 7)
    with pytest.raises(ConfigError, match="input_module"):
        trainer(tmp_path, [KernelRescaling(input_module="nope")], max_epochs=2).fit(StemNet(), loader())


def test_yaml_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cb", type=pl.Callback)
    cfg = parser.parse_string("""
    cb:
      class_path: lightning_approx.KernelRescaling
      init_args:
        scale:
          class_path: lightning_approx.schedules.Step
          init_args: {values: [0.5, 1.0], milestones: [30]}
    """)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cb = instantiate(cfg).cb
    assert isinstance(cb, KernelRescaling) and cb.schedule == Step(values=[0.5, 1.0], milestones=[30])
    assert math.isclose(KernelRescaling(scale=0.25, epochs=3).schedule.milestones[0], 3.0)
