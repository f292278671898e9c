"""Every registered method through the same checks: shapes and dtypes, exactness at its exact
setting, unbiasedness where it claims it (a measured bias where it does not), a Trainer fit,
checkpoint resume, and a YAML round trip."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_approx import METHODS, ApproxBackward, approximate, build_method, restore
from lightning_approx.methods import Method, Pipeline
from tests.statistics import assert_unbiased, looks_biased

NAMES = sorted(METHODS)


def exact_setting(cls: type[Method]) -> dict | None:
    """The constructor arguments at which the method must compute exact gradients."""
    if getattr(cls, "always_exact", False):
        return {}
    settings = {f: h.exact_at for f, h in cls.hyperparameters.items() if h.exact_at is not None}
    return settings or None


class Net(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> linear, so every method has a layer to act on."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class _ThroughMethod(Pipeline):
    is_exact = False  # run the method's own code even at its exact setting


def grads(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    model(x).backward(dy)
    return [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(name, dtype):
    model = Net().to(dtype)
    approximate(model, name, exclude=None)
    x = torch.randn(6, 4, 4, 4, dtype=dtype)
    out = model(x)
    assert out.shape == (6, 5) and out.dtype == dtype
    gs = grads(model, x, torch.randn_like(out))
    for g, ref in zip(gs, [x, *model.parameters()], strict=True):
        assert g is not None and g.shape == ref.shape and g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize("name", NAMES)
def test_exact_at_exact_setting(name):
    settings = exact_setting(METHODS[name])
    if settings is None:
        pytest.skip(f"{name} has no exact setting")
    model = Net().double()
    x = torch.randn(6, 4, 4, 4, dtype=torch.float64)
    dy = torch.randn(6, 5, dtype=torch.float64)
    exact = grads(model, x, dy)
    approximate(model, _ThroughMethod([build_method(name, **settings)]), exclude=None)
    for g, e in zip(grads(model, x, dy), exact, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    restore(model)


@pytest.mark.parametrize("name", NAMES)
def test_unbiased_or_measured_bias(name):
    """Unbiased methods pass a CLT check on the parameter gradients; the others must show a
    bias the same check detects (so the claim in their card is measured, not assumed)."""
    torch.manual_seed(1)
    model = Net().double()
    x = torch.randn(6, 4, 4, 4, dtype=torch.float64)
    x[0] *= 4  # uneven sample norms, so importance weights matter
    dy = torch.randn(6, 5, dtype=torch.float64)
    exact = torch.cat([g.flatten() for g in grads(model, x, dy)[1:]])
    method = build_method(name)
    approximate(model, method, exclude=None, seed=0)

    def draw():
        return torch.cat([g.flatten() for g in grads(model, x, dy)[1:]])

    if method.unbiased:
        assert_unbiased(draw, exact, samples=1500)
    elif exact_setting(type(method)) == {}:
        torch.testing.assert_close(draw(), exact, rtol=1e-10, atol=1e-12)
    else:
        assert looks_biased(draw, exact, samples=300), f"{name} claims a bias the check cannot see"


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)),
                      batch_size=8)


def _trainer(root, callbacks, epochs):
    return pl.Trainer(default_root_dir=root, accelerator="cpu", max_epochs=epochs, logger=False,
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("name", NAMES)
def test_trainer_fit_and_resume(name, tmp_path):
    model = TinyModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, [ApproxBackward(name), ckpt], 1).fit(model, _loader())
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    resumed = TinyModule()
    cb = ApproxBackward(name)
    _trainer(tmp_path, [cb], 2).fit(resumed, _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert cb.totals.exact > 0  # the second epoch ran patched


@pytest.mark.parametrize("name", NAMES)
def test_yaml_round_trip(name):
    method = build_method(name)
    yaml = OmegaConf.to_yaml(OmegaConf.create(method.to_config()))
    again = build_method(OmegaConf.create(yaml))
    assert again == method and again.to_config() == method.to_config()
