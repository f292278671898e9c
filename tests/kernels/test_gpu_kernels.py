"""The compiled kernels on a CUDA device against the PyTorch references (skipped without one).

    pip install -e '.[dev,cuda]' && pytest -m gpu tests/kernels

Every check runs on fresh random inputs in float32, float16 and bfloat16, contiguous and
channels-last, with the results poisoned (NaN / a sentinel) before each kernel runs; the
random op is checked through its statistics. A short Lightning fit per registered method runs
with the backend forced to ``"cuda"``, so an op that cannot run its kernel fails loudly.
"""

from __future__ import annotations

import pytest
import torch

from lightning_approx.kernels import cuda, dispatch, loader, ops
from tests.kernels import cases

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison")]

DEVICE = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _cupy():
    if torch.cuda.is_available() and not loader.cupy_available():
        pytest.fail(f"CuPy does not import ({loader.cupy_import_error()}): pip install 'lightning-approx[cuda]'")


NORM_SHAPES = [(5, 8, 9, 7), (3, 5, 7, 5), (256, 16, 32, 32), (8, 64, 56, 56), (128, 512, 7, 7), (64, 1000),
               (2, 3, 1, 1)]


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_norms(shape, dtype, fmt):
    cases.check_norms(shape, dtype, fmt, DEVICE)


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("shape", [(5, 8, 9, 7), (4, 6, 3, 5), (7, 33), (128, 64, 16, 16)], ids=str)
def test_gather_scale(shape, dtype, fmt):
    cases.check_gather_scale(shape, dtype, fmt, DEVICE)


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("n", [64 * 97, 64 * 40_000])
def test_stochastic_prune(n, dtype, fmt):
    cases.check_stochastic_prune(n, dtype, fmt, DEVICE)


def test_stochastic_prune_cuda_generator_needs_no_sync():
    cases.check_prune_generator(DEVICE)


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("geometry", cases.PATCH_GEOMETRIES, ids=lambda g: f"k{g[2][0]}x{g[2][1]}s{g[3][0]}g{g[6]}")
def test_patch_grad(geometry, dtype, fmt):
    cases.check_patch_grad(geometry, dtype, fmt, DEVICE, n=32, hw=(28, 28))


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
def test_argmax_ties(dtype):
    cases.check_argmax_ties(DEVICE, dtype)


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("shape", [(5, 8, 9, 7), (4, 6, 3, 5), (6, 40), (3, 300, 2, 2), (128, 256, 14, 14)],
                         ids=str)
def test_live(shape, dtype, fmt):
    cases.check_live(shape, dtype, fmt, DEVICE)


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
def test_live_all_dead(dtype):
    cases.check_live_all_dead(DEVICE, dtype)


# --- dispatch, streams, devices ----------------------------------------------------------------
def test_auto_picks_the_kernels_for_cuda_tensors():
    x = cases.make((4, 8, 6, 6), torch.bfloat16, "channels_last", DEVICE)
    with dispatch.use_backend("auto"):
        assert dispatch.select("sample_norms", x) == "cuda"
        assert dispatch.select("sample_norms", x.double()) == "torch"  # float64: no kernel
    with dispatch.use_backend("cuda"):
        got = ops.sample_norms(x)
        with pytest.raises(dispatch.BackendUnavailableError, match="float64"):
            ops.sample_norms(x.double())
    with dispatch.use_backend("torch"):
        ref = ops.sample_norms(x)
    assert cases.rel_err(got, ref) <= 2e-5


def test_kernels_run_on_the_current_stream():
    # The input is produced on a side stream and consumed there without a synchronisation:
    # a kernel launched on another stream would race with the producer.
    side = torch.cuda.Stream()
    base = cases.make((64, 64, 56, 56), torch.float32, "contiguous", DEVICE)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for _ in range(3):
            x = torch.nn.functional.conv2d(base, torch.ones(64, 1, 3, 3, device=DEVICE), padding=1, groups=64)
        got = cuda.sample_norms(x)
    side.synchronize()
    assert cases.rel_err(got, x.flatten(1).float().norm(dim=1)) <= 2e-5


def test_modules_are_compiled_once_per_device():
    x = cases.make((4, 8), torch.float32, "contiguous", DEVICE)
    cuda.sample_norms(x)
    first = loader.get_kernel("norms.cu", "la_sumsq_rows_f32", x.device.index or 0)
    assert loader.get_kernel("norms.cu", "la_sumsq_rows_f32", x.device.index or 0) is first


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    x = cases.make((4, 8, 5, 5), torch.float16, "contiguous", "cuda:1")
    assert cases.rel_err(cuda.sample_norms(x), x.flatten(1).float().norm(dim=1)) <= 2e-5


# --- training through Lightning ----------------------------------------------------------------
def _tiny_model():
    import lightning.pytorch as pl
    from torch import nn

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.conv1 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
            self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)
            self.losses: list[float] = []

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean((2, 3)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x.contiguous(memory_format=torch.channels_last)), y)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Tiny().to(memory_format=torch.channels_last)


def _method_names() -> list[str]:
    from lightning_approx import METHODS

    return sorted(METHODS)


@pytest.mark.parametrize("method", _method_names())
def test_lightning_fit_on_the_gpu(method, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_approx import ApproxBackward

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="gpu", devices=1, precision="bf16-mixed",
                         max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ApproxBackward(method=method, exclude=None)])
    with dispatch.use_backend("cuda"):
        trainer.fit(model, DataLoader(data, batch_size=16))
    assert len(model.losses) == 4 and all(torch.isfinite(torch.tensor(model.losses)))
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a.cpu(), b.detach().cpu()) for a, b in zip(before, after, strict=True))
