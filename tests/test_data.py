"""Data: the bundled CIFAR-10 subset, archives and downloads, md5 checks, transforms, image folders."""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_approx.data import transforms as T
from lightning_approx.data.cifar10 import (
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    FILE_MD5S,
    CIFAR10DataModule,
    _read_batch,
    file_md5,
    read_md5sums,
)
from lightning_approx.data.imagenet import ImageFolderDataset, ImageNetDataModule, SyntheticImageDataset
from lightning_approx.errors import ConfigError

SUBSET = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-subset"
BATCHES = SUBSET / "cifar-10-batches-py"


@pytest.fixture(scope="module")
def train_set() -> CIFAR10:
    return CIFAR10(SUBSET, train=True)


@pytest.fixture(scope="module")
def test_set() -> CIFAR10:
    return CIFAR10(SUBSET, train=False)


@pytest.fixture(scope="module")
def subset_archive(tmp_path_factory) -> tuple[Path, str]:
    """A cifar-10-python.tar.gz built from the subset (with its MD5SUMS), and its md5."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(BATCHES, arcname="cifar-10-batches-py")
    return path, file_md5(path)


# --- the bundled subset --------------------------------------------------------------------


def test_subset_sizes_shapes_and_labels(train_set, test_set):
    assert len(train_set) == 5085 and len(test_set) == 932
    for ds in (train_set, test_set):
        assert ds.images.shape == (len(ds), 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.labels.shape == (len(ds),) and ds.labels.dtype == torch.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert torch.bincount(ds.labels).min() > len(ds) / 10 * 0.8  # roughly balanced
    assert train_set.classes[0] == "airplane" and train_set.classes[-1] == "truck"
    image, label = train_set[3]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert abs(train_set.images.float().mean().item() - 121.3) < 0.5  # the README's pixel mean


def test_subset_manifest_describes_the_files():
    assert (SUBSET / "README.md").is_file()
    sums = read_md5sums(BATCHES / "MD5SUMS")
    assert set(sums) == set(FILE_MD5S)
    assert all(file_md5(BATCHES / name) == digest for name, digest in sums.items())


def test_root_may_be_the_batches_folder_itself(test_set):
    assert torch.equal(CIFAR10(BATCHES, train=False).images, test_set.images)


def test_reads_like_pickle_with_numpy(train_set):
    np = pytest.importorskip("numpy")
    with open(BATCHES / "data_batch_2", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    n = len(d["labels"])
    assert np.array_equal(train_set.images[n:2 * n].reshape(n, -1).numpy(), d["data"])
    assert train_set.labels[n:2 * n].tolist() == list(d["labels"])


def _py2_batch_pickle(rows: bytes, n: int, labels: list[int]) -> bytes:
    """A batch pickled the way the official files are (protocol 2, Python 2 str, numpy.core)."""

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01J" + struct.pack("<i", n) + b"M\x00\x0c\x86" + dtype + b"\x89" + s(rows) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    items = s(b"batch_label") + s(b"x") + s(b"data") + array + s(b"labels") + label_list
    return b"\x80\x02}(" + items + b"u."


def test_reads_python2_pickles(tmp_path):
    rows = bytes(range(256)) * 24  # 2 images, every byte value (latin1 round trip)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.parent.mkdir()
    path.write_bytes(_py2_batch_pickle(rows, 2, [3, 9]))
    images, labels = _read_batch(path)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 9]
    assert bytes(images.flatten().tolist()) == rows
    np = pytest.importorskip("numpy")
    d = pickle.loads(path.read_bytes(), encoding="latin1")
    assert np.array_equal(d["data"], images.reshape(2, -1).numpy())


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_refuses_pickles_with_other_objects(tmp_path, capsys):
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"data": _Evil(), "labels": []}))
    with pytest.raises(ConfigError, match="not a CIFAR-10 batch"):
        _read_batch(path)
    assert "must not run" not in capsys.readouterr().out


# --- archives and downloads ----------------------------------------------------------------


def test_loads_from_a_tar_gz(tmp_path, subset_archive, test_set):
    archive, md5 = subset_archive
    shutil.copy(archive, tmp_path)
    ds = CIFAR10(tmp_path, train=False, archive_md5=md5)
    assert torch.equal(ds.images, test_set.images)
    assert (tmp_path / "cifar-10-batches-py" / "MD5SUMS").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder removed
    assert len(CIFAR10(tmp_path, train=True)) == 5085  # now from the extracted folder


def test_archive_with_wrong_md5_is_refused(tmp_path, subset_archive):
    shutil.copy(subset_archive[0], tmp_path)
    with pytest.raises(ConfigError, match="c58f30108f718f92721af3b95e74349a") as e:
        CIFAR10(tmp_path, train=False)  # the official archive md5 is expected by default
    assert subset_archive[1] in str(e.value) and "archive_md5" in str(e.value)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_unsafe_archive_members_are_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match="unsafe"):
        CIFAR10(tmp_path, archive_md5=None)
    assert not (tmp_path.parent / "escaped").exists()


def test_download_through_a_file_url(tmp_path, subset_archive, test_set):
    archive, md5 = subset_archive
    dest = tmp_path / "data"
    ds = CIFAR10(dest, train=False, download=True, url=archive.as_uri(), archive_md5=md5)
    assert torch.equal(ds.images, test_set.images)
    assert file_md5(dest / "cifar-10-python.tar.gz") == md5
    # The data module downloads in prepare_data (or setup, without a Trainer) too.
    dm = CIFAR10DataModule(tmp_path / "dm", download=True, url=archive.as_uri(), archive_md5=md5)
    dm.setup("test")
    assert len(dm.test_set) == 932


def test_download_with_wrong_md5_leaves_nothing(tmp_path, subset_archive):
    with pytest.raises(ConfigError, match="md5 mismatch"):
        CIFAR10(tmp_path, download=True, url=subset_archive[0].as_uri(), archive_md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


# --- md5 checks and layout errors ----------------------------------------------------------


@pytest.fixture
def subset_copy(tmp_path) -> Path:
    shutil.copytree(BATCHES, tmp_path / "cifar-10-batches-py")
    return tmp_path


def test_md5_mismatch_names_file_expected_actual_and_fix(subset_copy):
    path = subset_copy / "cifar-10-batches-py" / "test_batch"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as e:
        CIFAR10(subset_copy, train=False)
    msg = str(e.value)
    expected = read_md5sums(subset_copy / "cifar-10-batches-py" / "MD5SUMS")["test_batch"]
    assert "test_batch" in msg and expected in msg and file_md5(path) in msg
    assert "MD5SUMS" in msg and "Fix:" in msg and "download=True" in msg
    assert len(CIFAR10(subset_copy, train=False, verify=False)) == 932


def test_without_manifest_the_official_md5s_apply(subset_copy):
    (subset_copy / "cifar-10-batches-py" / "MD5SUMS").unlink()
    with pytest.raises(ConfigError, match="official") as e:
        CIFAR10(subset_copy, train=False)
    assert FILE_MD5S["test_batch"] in str(e.value)


def test_missing_folder_error_describes_the_layout(tmp_path):
    with pytest.raises(ConfigError) as e:
        CIFAR10(tmp_path / "nowhere")
    msg = str(e.value)
    assert "does not exist" in msg and "cifar-10-batches-py" in msg and "data_batch_1" in msg
    assert "cifar-10-python.tar.gz" in msg and "download=True" in msg


def test_incomplete_folder_lists_missing_files(subset_copy):
    (subset_copy / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match="lacks data_batch_4"):
        CIFAR10(subset_copy, train=True)
    assert len(CIFAR10(subset_copy, train=False)) == 932


# --- batched tensor transforms -------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_shape_content_and_determinism():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = T.random_crop(x, 32, padding=4, generator=_gen(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, T.random_crop(x, 32, padding=4, generator=_gen(0)))
    assert not torch.equal(a, T.random_crop(x, 32, padding=4, generator=_gen(1)))
    # Each crop is a window of the zero-padded image at the offsets drawn from the generator.
    g = _gen(5)
    crops = T.random_crop(x.float(), (20, 24), padding=4, generator=g)
    g = _gen(5)
    top, left = torch.randint(0, 21, (6,), generator=g), torch.randint(0, 17, (6,), generator=g)
    padded = nn.functional.pad(x.float(), (4, 4, 4, 4))
    for i in range(6):
        assert torch.equal(crops[i], padded[i, :, top[i]:top[i] + 20, left[i]:left[i] + 24])
    assert torch.equal(T.random_crop(x, 32, padding=0, generator=_gen(0)), x)


def test_random_horizontal_flip():
    x = torch.randn(16, 3, 8, 8)
    once = T.random_horizontal_flip(x, generator=_gen(3))
    flipped = [not torch.equal(once[i], x[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    assert all(torch.equal(once[i], x[i].flip(-1)) for i in range(16) if flipped[i])
    assert torch.equal(T.random_horizontal_flip(once, generator=_gen(3)), x)  # flip twice: identity
    assert torch.equal(T.random_horizontal_flip(x, generator=_gen(0), p=1.0), x.flip(-1))


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = T.normalize(x, (0.5, 0.5, 0.0), (0.5, 0.25, 1.0))
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [-1.0, -2.0, 0.0] and out[0, :, 0, 1].tolist() == [1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="3 means"):
        T.normalize(torch.zeros(1, 1, 2, 2), CIFAR10_MEAN, CIFAR10_STD)


# --- per-image transforms ------------------------------------------------------------------


def _noise(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen(seed))


def test_pil_tensor_round_trip():
    x = _noise(30, 50)
    img = T.tensor_to_pil(x)
    assert img.size == (50, 30) and torch.equal(T.pil_to_tensor(img), x)


def test_resize_and_center_crop():
    x = _noise(200, 300)
    assert T.resize(x, 100).shape == (3, 100, 150)  # shorter side to 100
    assert T.resize(T.tensor_to_pil(x), 100).size == (150, 100)
    assert T.resize(x, (64, 32)).shape == (3, 64, 32)
    assert torch.equal(T.center_crop(x, 100), x[:, 50:150, 100:200])
    for size in (100, (250, 301), (33, 47)):  # PIL and tensor agree, padding included
        assert torch.equal(T.center_crop(x, size), T.pil_to_tensor(T.center_crop(T.tensor_to_pil(x), size)))


def test_random_resized_crop_deterministic_under_a_generator():
    x = _noise(60, 80)
    a = T.random_resized_crop(x, 32, generator=_gen(0))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, T.random_resized_crop(x, 32, generator=_gen(0)))
    assert torch.equal(a, T.pil_to_tensor(T.random_resized_crop(T.tensor_to_pil(x), 32, generator=_gen(0))))
    assert not torch.equal(a, T.random_resized_crop(x, 32, generator=_gen(1)))
    # With the full area and aspect ratio fixed, the crop is the whole image, resized.
    full = T.random_resized_crop(x, (60, 80), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), generator=_gen(0))
    assert torch.equal(full, x)


# --- image folders -------------------------------------------------------------------------


def _write_folder(root: Path, classes=("cat", "dog"), per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                x = _noise(40 + 8 * i, 52, seed=c * 10 + i)
                img = T.tensor_to_pil(x)
                if i == 1:
                    img = img.convert("L")  # ImageNet has a few grayscale JPEGs
                img.save(d / f"{name}_{i}.JPEG", quality=90)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_dataset(tmp_path):
    root = _write_folder(tmp_path)
    train = ImageFolderDataset(root, "train", image_size=32, resize_size=36)
    assert train.classes == ["cat", "dog"] and len(train) == 4
    assert [label for _, label in train.samples] == [0, 0, 1, 1]
    torch.manual_seed(0)
    x, y = train[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == 0
    torch.manual_seed(0)
    assert torch.equal(train[1][0], x)  # augmentation follows the (worker-seeded) global generator
    val = ImageFolderDataset(root, "val", image_size=32, resize_size=36)
    assert torch.equal(val[0][0], val[0][0]) and val[0][0].shape == (3, 32, 32)
    img = Image.open(val.samples[0][0]).convert("RGB")
    assert torch.equal(val[0][0], T.pil_to_tensor(T.center_crop(T.resize(img, 36), 32)))


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"train/<class>/\*\.JPEG") as e:
        ImageFolderDataset(tmp_path / "missing", "train")
    assert "does not exist" in str(e.value)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    T.tensor_to_pil(_noise(8, 8)).save(flat / "train" / "a.JPEG")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        ImageFolderDataset(flat, "train")
    root = _write_folder(tmp_path / "ok")
    with pytest.raises(ConfigError, match="unknown split"):
        ImageFolderDataset(root, "test")
    shutil.rmtree(root / "val")
    with pytest.raises(ConfigError, match="no val/ folder"):
        ImageFolderDataset(root, "val")
    (root / "val" / "cat").mkdir(parents=True)
    shutil.copy(root / "train" / "cat" / "cat_0.JPEG", root / "val" / "cat")
    (root / "train" / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"without images.*\['empty'\]"):
        ImageFolderDataset(root, "train")
    (root / "val" / "zebra").mkdir()
    with pytest.raises(ConfigError, match="lacks"):
        ImageFolderDataset(root, "val", classes=["cat", "dog"])


def test_imagenet_datamodule_on_a_folder(tmp_path):
    root = _write_folder(tmp_path)
    dm = ImageNetDataModule(root, batch_size=2, num_workers=0, image_size=32, resize_size=36)
    dm.setup("fit")
    assert dm.num_classes == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    xn, _ = dm.transform_batch((x, y))
    assert xn.dtype == torch.float32 and xn.shape == x.shape
    assert len(dm.val_dataloader().dataset) == 4


def test_imagenet_datamodule_workers_are_seeded(tmp_path):
    root = _write_folder(tmp_path)

    def epoch(seed: int) -> torch.Tensor:
        dm = ImageNetDataModule(root, batch_size=2, num_workers=2, image_size=16, resize_size=20, seed=seed)
        dm.setup("fit")
        return torch.cat([x for x, _ in dm.train_dataloader()])

    first = epoch(0)
    assert torch.equal(first, epoch(0)) and not torch.equal(first, epoch(1))


def test_imagenet_synthetic_mode():
    dm = ImageNetDataModule(synthetic=True, batch_size=4, num_workers=0, synthetic_train_size=10,
                            synthetic_val_size=6)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 2  # drop_last
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.uint8
    assert y.shape == (4,) and y.dtype == torch.int64 and int(y.max()) < 1000
    ds = SyntheticImageDataset(8, image_size=16, num_classes=3, seed=1, pool_size=4)
    assert torch.equal(ds[1][0], ds[5][0]) and ds[1][1] == ds[5][1]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2][0], ds[2][0])  # workers rebuild the same pool
    with pytest.raises(ConfigError, match="data_dir"):
        ImageNetDataModule()


# --- the CIFAR-10 data module --------------------------------------------------------------


def _first_train_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    dm = CIFAR10DataModule(SUBSET, batch_size=64, seed=seed)
    dm.setup("fit")
    return dm.transform_batch(next(iter(dm.train_dataloader())), train=True)


def test_cifar10_datamodule_batches(test_set):
    dm = CIFAR10DataModule(SUBSET, batch_size=100)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 5085 // 100  # drop_last
    x, y = next(iter(loader))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    xa, ya = dm.transform_batch((x, y), train=True)
    assert xa.shape == (100, 3, 32, 32) and xa.dtype == torch.float32 and torch.equal(ya, y)
    # Augmentation only moves pixels (and pads zeros): every value is a normalised uint8 value.
    mean = torch.tensor(CIFAR10_MEAN)[:, None, None]
    std = torch.tensor(CIFAR10_STD)[:, None, None]
    raw = xa * std + mean
    assert torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)
    # Validation: in order, not augmented, exactly normalised, per-channel mean ~0 and std ~1.
    val = dm.val_dataloader()
    assert len(val) == 10
    xv, yv = dm.transform_batch(next(iter(val)), train=False)
    assert torch.equal(yv, test_set.labels[:100])
    assert torch.allclose(xv, (test_set.images[:100].float() / 255 - mean) / std)
    all_val = dm.transform_batch((test_set.images, test_set.labels), train=False)[0]
    assert all_val.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (all_val.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1


def test_cifar10_datamodule_is_seedable():
    a, b, c = _first_train_batch(0), _first_train_batch(0), _first_train_batch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_cifar10_datamodule_state_dict_restores_the_streams():
    dm = CIFAR10DataModule(SUBSET, batch_size=64, seed=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    state = dm.state_dict()
    expected = dm.transform_batch(batch, train=True)[0]
    other = CIFAR10DataModule(SUBSET, batch_size=64, seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.transform_batch(batch, train=True)[0], expected)


def test_cifar10_datamodule_hook_follows_the_trainer_stage():
    dm = CIFAR10DataModule(SUBSET, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    plain = dm.on_after_batch_transfer(batch, 0)[0]
    assert torch.equal(plain, dm.transform_batch(batch, train=False)[0])
    dm.trainer = SimpleNamespace(training=True)
    assert not torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)


class _Recorder(pl.LightningModule):
    """Records what the Trainer hands to each step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 32 * 32, 10)
        self.seen: dict[str, torch.Tensor] = {}

    def _step(self, batch, stage):
        x, y = batch
        self.seen[stage] = x
        return nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_cifar10_datamodule_with_a_trainer(test_set):
    dm = CIFAR10DataModule(SUBSET, batch_size=32)
    model = _Recorder()
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.seen["train"].shape == (32, 3, 32, 32) and model.seen["train"].dtype == torch.float32
    expected_val = dm.transform_batch((test_set.images[:32], test_set.labels[:32]), train=False)[0]
    assert torch.equal(model.seen["val"], expected_val)
