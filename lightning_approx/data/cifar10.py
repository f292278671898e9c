"""CIFAR-10 from its original Python files, and a LightningDataModule with batched augmentation.

The dataset is read from ``<root>/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
``test_batch``, ``batches.meta``: pickled dicts with ``data``, a uint8 ``(N, 3072)`` array, and
``labels``), or extracted from the official ``cifar-10-python.tar.gz`` found in, or downloaded
to, ``<root>``. Every file is md5-checked: against the official table, or against the folder's
own ``MD5SUMS`` manifest (``md5sum`` format) when it has one, as a documented subset does.

The pickles are read with a restricted unpickler that rebuilds numpy arrays as torch tensors
itself: a downloaded or copied batch file cannot run code, and numpy is not required.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from lightning_approx.data.transforms import normalize, random_crop, random_horizontal_flip
from lightning_approx.errors import ConfigError, check_seed

__all__ = ["ARCHIVE_MD5", "CIFAR10", "CIFAR10_MEAN", "CIFAR10_STD", "FILE_MD5S", "URL", "CIFAR10DataModule",
           "download_archive", "file_md5", "prepare_cifar10", "read_md5sums"]

log = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
MANIFEST = "MD5SUMS"
_REGENERATE = f"run `md5sum batches.meta data_batch_* test_batch > {MANIFEST}` in the folder"
# The md5 of each file of the official archive (the same table torchvision checks).
FILE_MD5S = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
# Per-channel statistics of the 50k training images on the [0, 1] scale (the std is the
# per-pixel one, not the often-copied 0.2023/0.1994/0.2010).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

LAYOUT = (f"expected <data_dir>/{FOLDER}/ holding {', '.join(TRAIN_FILES[:1])} .. {TRAIN_FILES[-1]}, "
          f"{TEST_FILES[0]} and {META_FILE} (the extracted official archive, optionally with an {MANIFEST} "
          f"manifest), or the archive <data_dir>/{ARCHIVE_NAME} itself")


def _layout_error(root: Path, problem: str, url: str = URL) -> ConfigError:
    return ConfigError("data_dir", str(root), f"{problem}; {LAYOUT}",
                       f"point data_dir at the folder that holds {FOLDER}/, or pass download=True to fetch "
                       f"the official archive (163 MB) from {url}")


# --- integrity -----------------------------------------------------------------------------


def file_md5(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """The hex md5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def read_md5sums(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parses an ``md5sum`` manifest (``<hex>  <name>`` or ``<hex> *<name>`` per line).

    Raises:
        ConfigError: A line is not in ``md5sum`` format.
    """
    sums: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.lstrip(" *").strip()
        if len(digest) != 32 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ConfigError(f"{path}:{n}", line, "is not an md5sum line", f"regenerate it: {_REGENERATE}")
        sums[PurePosixPath(name).name] = digest.lower()
    return sums


def _verify(folder: Path, names: Sequence[str]) -> None:
    """Checks ``names`` in ``folder`` against its MD5SUMS manifest, else the official table."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        expected, source = read_md5sums(manifest), str(manifest)
    else:
        expected, source = FILE_MD5S, "official"
    for name in names:
        if name not in expected:
            raise ConfigError("data_dir", str(folder), f"{source} lists no md5 for {name}",
                              f"add it: run `md5sum {name} >> {MANIFEST}` in {folder}")
        actual = file_md5(folder / name)
        if actual != expected[name]:
            raise ConfigError(
                "data_dir", str(folder / name),
                f"md5 mismatch for {name}: expected {expected[name]} ({source} checksum), got {actual}",
                f"the file is corrupt or not the one the checksums describe: delete {folder} and extract or "
                f"download it again (download=True); if you changed the data on purpose, regenerate the "
                f"manifest: {_REGENERATE}")


# --- download and extraction ---------------------------------------------------------------


def download_archive(url: str, dest: str | os.PathLike[str], md5: str | None = ARCHIVE_MD5,
                     chunk_size: int = 1 << 20) -> Path:
    """Streams ``url`` to ``dest`` through a temporary file, checking its md5 before renaming.

    Args:
        url: Any URL ``urllib`` opens (``https://``, ``file://``).
        dest: Final path of the file.
        md5: Expected hex md5, or ``None`` to skip the check.
        chunk_size: Bytes per read.

    Returns:
        ``dest``, which exists only if the download completed (and matched ``md5``).

    Raises:
        ConfigError: The downloaded file has the wrong md5.
        OSError: The download failed (``urllib.error.URLError`` is an ``OSError``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.md5(usedforsecurity=False)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        log.info("downloading %s to %s", url, dest)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(chunk_size):
                h.update(chunk)
                out.write(chunk)
        if md5 is not None and h.hexdigest() != md5.lower():
            got = h.hexdigest()
            raise ConfigError("url", url, f"md5 mismatch for the download: expected {md5}, got {got}",
                              "retry (the transfer may have been truncated), or check that the URL serves "
                              "the official archive")
        os.replace(tmp, dest)  # atomic: a half-written archive never has the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The archive's members under ``FOLDER``; refuses links, devices and escaping paths."""
    members = []
    for m in tar.getmembers():
        parts = PurePosixPath(m.name).parts
        parts = parts[1:] if parts[:1] == (".",) else parts
        if not parts or m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise ConfigError("data_dir", str(archive), f"the archive member {m.name!r} is unsafe to extract "
                              "(absolute path, '..', link or device)", "use the official archive")
        if parts[0] == FOLDER:
            members.append(m)
    if not any(PurePosixPath(m.name).name == META_FILE for m in members):
        raise _layout_error(archive.parent, f"the archive {archive.name} has no {FOLDER}/{META_FILE}")
    return members


def _extract(archive: Path, root: Path) -> Path:
    """Extracts ``FOLDER`` from ``archive`` into ``root`` through a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(tar, archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: also let tarfile refuse oddities
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)  # members checked above
        extracted = next(p for p in tmp.rglob(FOLDER) if p.is_dir())
        os.replace(extracted, root / FOLDER)
    except tarfile.TarError as e:
        raise ConfigError("data_dir", str(archive), f"cannot read the archive: {e}",
                          "delete it and download again (download=True)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / FOLDER


def prepare_cifar10(root: str | os.PathLike[str], download: bool = False, url: str = URL,
                    archive_md5: str | None = ARCHIVE_MD5) -> Path:
    """Finds, extracts or downloads CIFAR-10 under ``root``; returns the ``cifar-10-batches-py`` folder.

    In order: ``root/cifar-10-batches-py/`` (or ``root`` itself if it holds ``batches.meta``);
    else ``root/cifar-10-python.tar.gz`` if its md5 matches ``archive_md5``; else, with
    ``download``, the archive from ``url``. The archive is extracted safely (members outside
    ``cifar-10-batches-py/``, links and devices are refused) and atomically.

    Args:
        root: The data directory.
        download: Download the archive when neither the folder nor a valid archive is there.
        url: Where to download from (a ``file://`` URL works too).
        archive_md5: Expected md5 of the archive, ``None`` to accept any.

    Returns:
        The folder holding the batch files (not yet checked: :class:`CIFAR10` does that).

    Raises:
        ConfigError: Nothing usable is found, or the archive has the wrong md5.
    """
    root = Path(root).expanduser()
    if (root / META_FILE).is_file():
        return root
    if (root / FOLDER).is_dir():
        return root / FOLDER
    archive = root / ARCHIVE_NAME
    if archive.is_file():
        actual = file_md5(archive) if archive_md5 is not None else None
        if actual is None or actual == archive_md5:
            return _extract(archive, root)
        if not download:
            raise ConfigError("data_dir", str(archive),
                              f"md5 mismatch for {ARCHIVE_NAME}: expected {archive_md5}, got {actual}",
                              "delete it and pass download=True, or pass the archive's md5 as archive_md5 "
                              "(None: unchecked) for a custom archive")
        log.warning("%s has md5 %s, not %s: downloading it again", archive, actual, archive_md5)
    elif not download:
        missing = "does not exist" if not root.exists() else f"has neither {FOLDER}/ nor {ARCHIVE_NAME}"
        raise _layout_error(root, f"the folder {missing}", url)
    download_archive(url, archive, archive_md5)
    return _extract(archive, root)


# --- reading the pickles without numpy -----------------------------------------------------

_TORCH_DTYPES = {"u1": torch.uint8, "i1": torch.int8, "i2": torch.int16, "i4": torch.int32, "i8": torch.int64,
                 "f4": torch.float32, "f8": torch.float64, "b1": torch.bool}


class _Dtype:
    """Stands in for ``numpy.dtype`` while unpickling (records the type code and byte order)."""

    def __init__(self, code: str, align: bool = False, copy: bool = False) -> None:
        self.code = code
        self.byteorder = "|"

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.byteorder = state[1]


class _Array:
    """Stands in for ``numpy.ndarray`` while unpickling; :meth:`tensor` converts it."""

    def __init__(self, *args: Any) -> None:
        self.shape: tuple[int, ...] = (0,)
        self.dtype: _Dtype | None = None
        self.fortran = False
        self.raw: bytes = b""

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        if len(state) == 5:  # (version, shape, dtype, is_fortran, data); older pickles omit version
            state = state[1:]
        self.shape, self.dtype, self.fortran, raw = state
        # Python 2 pickles hold the bytes as str, decoded as latin1 by pickle.load(encoding="latin1").
        self.raw = raw.encode("latin1") if isinstance(raw, str) else bytes(raw)

    def tensor(self) -> torch.Tensor:
        code = self.dtype.code if self.dtype else "?"
        if code not in _TORCH_DTYPES or (self.dtype and self.dtype.byteorder == ">"):
            raise ValueError(f"unsupported array dtype {code!r}")
        t = torch.frombuffer(bytearray(self.raw), dtype=_TORCH_DTYPES[code]) if self.raw else torch.empty(0)
        if self.fortran:
            return t.view(self.shape[::-1]).permute(*reversed(range(len(self.shape)))).contiguous()
        return t.view(self.shape)


def _reconstruct(cls: type, shape: Any, typecode: Any) -> _Array:
    return _Array()


def _scalar(dtype: _Dtype, raw: bytes | str) -> int | float | bool:
    a = _Array()
    a.__setstate__(((), dtype, False, raw))
    return a.tensor().item()


_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only; any other class is refused."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy", "ndarray"): _Array,
        ("numpy", "dtype"): _Dtype,
        # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1"): harmless.
        ("_codecs", "encode"): codecs.encode,
        # numpy 1 pickles name numpy.core, numpy 2 numpy._core.
        **{(mod, "_reconstruct"): _reconstruct for mod in _MULTIARRAY},
        **{(mod, "scalar"): _scalar for mod in _MULTIARRAY},
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, encoding="latin1").load()


def _to_tensor(value: Any) -> torch.Tensor:
    return value.tensor() if isinstance(value, _Array) else torch.as_tensor(value)


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one batch file."""
    try:
        d = _load_pickle(path)
        data, labels = _to_tensor(d["data"]), _to_tensor(d["labels"]).to(torch.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, RuntimeError) as e:
        problem = f"{path} is not a CIFAR-10 batch ({type(e).__name__}: {e})"
        raise _layout_error(path.parent.parent, problem) from e
    n = data.shape[0] if data.ndim else 0
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, 3072) or labels.shape != (n,):
        raise _layout_error(path.parent.parent, f"{path} holds data {data.dtype} {tuple(data.shape)} and "
                            f"{tuple(labels.shape)} labels, not uint8 (N, 3072) and (N,)")
    if n and not (int(labels.min()) >= 0 and int(labels.max()) < len(CLASSES)):
        raise _layout_error(path.parent.parent, f"{path} has labels outside 0..9")
    return data.view(n, 3, 32, 32), labels


# --- dataset -------------------------------------------------------------------------------


class CIFAR10(Dataset):
    """CIFAR-10 held in memory as tensors.

    Args:
        root: Data directory: holds ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``
            (see :func:`prepare_cifar10`), or is the ``cifar-10-batches-py`` folder itself.
        train: The 5 training batches if True, else the test batch.
        download: Download the official archive into ``root`` if the data is not there.
        url: Download URL (tests pass a ``file://`` URL).
        archive_md5: Expected md5 of the archive; ``None`` accepts any.
        verify: md5-check the batch files read (against ``MD5SUMS`` if the folder has one).

    Attributes:
        images: uint8 tensor ``(N, 3, 32, 32)``, RGB.
        labels: int64 tensor ``(N,)`` with values in 0..9.
        classes: The ten class names.
        folder: The ``cifar-10-batches-py`` folder read.

    Raises:
        ConfigError: The data is missing, malformed or fails its md5 check (the message says
            which file, what was expected and how to fix it).
    """

    def __init__(self, root: str | os.PathLike[str], train: bool = True, download: bool = False, *,
                 url: str = URL, archive_md5: str | None = ARCHIVE_MD5, verify: bool = True) -> None:
        self.train = train
        self.folder = prepare_cifar10(root, download=download, url=url, archive_md5=archive_md5)
        names = TRAIN_FILES if train else TEST_FILES
        missing = [n for n in (*names, META_FILE) if not (self.folder / n).is_file()]
        if missing:
            raise _layout_error(self.folder.parent, f"{self.folder} lacks {', '.join(missing)}", url)
        if verify:
            _verify(self.folder, (*names, META_FILE))
        parts = [_read_batch(self.folder / n) for n in names]
        self.images = torch.cat([p[0] for p in parts])
        self.labels = torch.cat([p[1] for p in parts])
        self.classes = self._read_classes()

    def _read_classes(self) -> list[str]:
        try:
            names = _load_pickle(self.folder / META_FILE)["label_names"]
            return [str(n) for n in names] if len(names) == len(CLASSES) else list(CLASSES)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
            problem = f"{self.folder / META_FILE} is not CIFAR-10 metadata ({e})"
            raise _layout_error(self.folder.parent, problem) from e

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"CIFAR10(split={split}, n={len(self)}, folder={str(self.folder)!r})"


class _TensorBatches(Dataset):
    """Serves whole batches by fancy indexing (``__getitems__``) instead of stacking N samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], self.labels[idx]


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for :class:`_TensorBatches`: the batch is already stacked."""
    return batch


# --- data module ---------------------------------------------------------------------------


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 for Lightning: the training batches for fit, the test batch for validation and test.

    Loaders yield uint8 ``(B, 3, 32, 32)`` images and int64 labels, which are 4x cheaper to copy
    to the device than floats. Augmentation (random 32x32 crop of the zero-padded image, padding 4,
    and a horizontal flip, training only) and normalisation with :data:`CIFAR10_MEAN` /
    :data:`CIFAR10_STD` run batched on the device in :meth:`on_after_batch_transfer`. Its random
    choices, and the shuffling, come from two generators seeded with ``seed`` that live in the
    main process, so they do not depend on ``num_workers``, and are saved in checkpoints.

    Outside a Trainer, call :meth:`transform_batch` on a loader's batch.

    Args:
        data_dir: Data directory (see :class:`CIFAR10`).
        batch_size: Images per batch; training drops the last incomplete batch.
        num_workers: DataLoader worker processes (0 is fastest: the data is in memory).
        download: Download the official archive if ``data_dir`` lacks the data.
        seed: Seed of the shuffling and augmentation generators.
        augment: Crop and flip training batches.
        pin_memory: Pin loader memory; ``None`` pins when CUDA is available.
        url: Download URL.
        archive_md5: Expected md5 of the archive (``None`` accepts any).
    """

    num_classes = 10

    def __init__(self, data_dir: str | os.PathLike[str], batch_size: int = 128, num_workers: int = 0,
                 download: bool = False, seed: int = 0, augment: bool = True, pin_memory: bool | None = None,
                 url: str = URL, archive_md5: str | None = ARCHIVE_MD5) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ConfigError("data_dir", data_dir, "must be a folder path",
                              "give the folder holding (or to download) cifar-10-batches-py, e.g. data/cifar10")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be a positive integer", "give e.g. 128")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError("num_workers", num_workers, "must be a non-negative integer", "give e.g. 0")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.seed = check_seed("seed", seed)  # else torch.Generator fails with a bare RuntimeError
        self.augment = augment
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.url = url
        self.archive_md5 = archive_md5
        # Created here, not in setup(), so a checkpoint's state (load_state_dict) survives setup().
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator().manual_seed(seed + 1)
        self.train_set: CIFAR10 | None = None
        self.test_set: CIFAR10 | None = None

    def _dataset(self, train: bool) -> CIFAR10:
        return CIFAR10(self.data_dir, train=train, download=False, url=self.url, archive_md5=self.archive_md5)

    def prepare_data(self) -> None:
        """Downloads and extracts the archive if asked to (runs on one process only)."""
        prepare_cifar10(self.data_dir, download=self.download, url=self.url, archive_md5=self.archive_md5)

    def setup(self, stage: str | None = None) -> None:
        if self.download:  # prepare_data is skipped when the module is used without a Trainer
            self.prepare_data()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(train=True)
        if self.test_set is None:
            self.test_set = self._dataset(train=False)

    def _loader(self, data: CIFAR10 | None, train: bool) -> DataLoader:
        if data is None:
            raise RuntimeError("CIFAR10DataModule: call setup() before asking for a dataloader")
        batches = _TensorBatches(data.images, data.labels)
        sampler: RandomSampler | SequentialSampler = SequentialSampler(batches)
        if train:
            sampler = RandomSampler(batches, generator=self.shuffle_generator)
        return DataLoader(batches, batch_size=self.batch_size, sampler=sampler, drop_last=train,
                          collate_fn=_keep_batch, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def transform_batch(self, batch: tuple[torch.Tensor, torch.Tensor],
                        train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments (if ``train`` and ``augment``) and normalises a ``(uint8 images, labels)`` batch.

        Returns:
            float32 images ``(B, 3, 32, 32)`` on the input's device, and the labels.
        """
        x, y = batch
        if train and self.augment:
            x = random_crop(x, 32, padding=4, generator=self.augment_generator)
            x = random_horizontal_flip(x, generator=self.augment_generator)
        return normalize(x, CIFAR10_MEAN, CIFAR10_STD), y

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(batch, train=training)

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_rng": self.shuffle_generator.get_state(),
                "augment_rng": self.augment_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "shuffle_rng" in state_dict:
            self.shuffle_generator.set_state(state_dict["shuffle_rng"])
        if "augment_rng" in state_dict:
            self.augment_generator.set_state(state_dict["augment_rng"])
