"""ImageNet-style image folders (``root/{train,val}/<class>/*.JPEG``), decoded with Pillow, and a
LightningDataModule for them, with a synthetic mode for throughput measurements.

Training images get torchvision's standard augmentation (random resized crop to 224, scale
0.08-1, and a horizontal flip), validation images a resize of the shorter side to 256 and a
central 224 crop. Workers decode and crop; they return uint8 tensors, which are 4x cheaper to
copy to the device than floats, and :meth:`ImageNetDataModule.on_after_batch_transfer`
normalises on the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, default_collate

from lightning_approx.data.transforms import (
    center_crop,
    horizontal_flip,
    normalize,
    pil_to_tensor,
    random_resized_crop,
    resize,
)
from lightning_approx.errors import ConfigError, check_seed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMG_EXTENSIONS", "ImageFolderDataset", "ImageNetDataModule",
           "SyntheticImageDataset", "find_classes"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SPLITS = ("train", "val")

LAYOUT = ("expected <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/*.JPEG: one sub-folder per "
          "class holding its images (.jpeg, .jpg, .png, .bmp, .webp), the same class folders in both splits "
          "(the official ILSVRC2012 validation images come in one flat folder and must first be sorted into "
          "class folders)")


def _layout_error(root: Path, problem: str) -> ConfigError:
    return ConfigError("data_dir", str(root), f"{problem}; {LAYOUT}",
                       "point data_dir at the folder that holds train/ and val/, or use synthetic=True to "
                       "measure throughput without data")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def find_classes(split_dir: str | os.PathLike[str]) -> list[str]:
    """The sorted names of the class sub-folders of ``split_dir`` (hidden folders skipped)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _scan(root: Path, split: str, classes: list[str] | None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image of ``root/split``, and the class names; checks the layout."""
    if not root.is_dir():
        raise _layout_error(root, "the folder does not exist")
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir())[:10]
        raise _layout_error(root, f"it has no {split}/ folder (it holds {present})")
    found = find_classes(split_dir)
    if not found:
        raise _layout_error(root, f"{split_dir} has no class sub-folders")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise _layout_error(root, f"{split_dir} has class folders the training split lacks: {unknown[:5]}")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a class may have no validation images in a subset
        with os.scandir(class_dir) as it:
            files = sorted(e.path for e in it if e.is_file() and _is_image(e.name))
        if not files:
            empty.append(name)
        samples += [(f, label) for f in files]
    if empty:
        raise _layout_error(root, f"class folders without images in {split_dir}: {empty[:5]}")
    return samples, classes


class ImageFolderDataset(Dataset):
    """Images of one split of an ImageNet-style folder, as uint8 ``(3, image_size, image_size)`` tensors.

    Randomness (the training crop and flip) comes from torch's global generator, which each
    DataLoader worker seeds from the loader's generator, so a seeded loader is reproducible.

    Args:
        root: Folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        image_size: Side of the output images.
        resize_size: Shorter side that evaluation images are resized to before the central crop.
        train: Use the training transforms; default: ``split == "train"``.
        classes: Class names, in label order; default: the sorted class folders of this split
            (pass the training split's to make sure the labels agree).
        scale: Area range of the random resized crop.

    Attributes:
        samples: ``(path, label)`` of every image.
        classes: Class names; label ``i`` is ``classes[i]``.

    Raises:
        ConfigError: The folder does not have the layout above (the message describes it).
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train", image_size: int = 224,
                 resize_size: int = 256, train: bool | None = None, classes: list[str] | None = None,
                 scale: tuple[float, float] = (0.08, 1.0)) -> None:
        if split not in SPLITS:
            raise ConfigError("split", split, "unknown split", f"use one of {list(SPLITS)}")
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = image_size
        self.resize_size = resize_size
        self.train = split == "train" if train is None else train
        self.scale = scale
        self.samples, self.classes = _scan(self.root, split, classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Image.Image:
        """Decodes one image file as RGB (ImageNet has a few CMYK and grayscale JPEGs)."""
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except OSError as e:
            raise OSError(f"cannot decode image {path}: {e}") from e

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = self.load(path)
        if self.train:
            img = random_resized_crop(img, self.image_size, scale=self.scale)
            if torch.rand(()) < 0.5:
                img = horizontal_flip(img)
        else:
            img = center_crop(resize(img, self.resize_size), self.image_size)
        return pil_to_tensor(img), label

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(split={self.split!r}, n={len(self)}, classes={len(self.classes)}, "
                f"root={str(self.root)!r})")


class SyntheticImageDataset(Dataset):
    """Random uint8 images and labels of the right shape, for measuring throughput without data.

    Image ``i`` is image ``i % pool_size`` of a small pool drawn once per process from ``seed``,
    so reading is a copy, not a random-number draw: the loader never limits the model.

    Args:
        length: Number of samples.
        image_size: Side of the images.
        num_classes: Labels lie in ``[0, num_classes)``.
        seed: Seed of the pool.
        pool_size: Distinct images.
    """

    def __init__(self, length: int, image_size: int = 224, num_classes: int = 1000, seed: int = 0,
                 pool_size: int = 64) -> None:
        self.length, self.image_size, self.num_classes = length, image_size, num_classes
        self.seed, self.pool_size = seed, pool_size
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None

    def _get_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pool is None:
            g = torch.Generator().manual_seed(self.seed)
            images = torch.randint(0, 256, (self.pool_size, 3, self.image_size, self.image_size),
                                   dtype=torch.uint8, generator=g)
            self._pool = images, torch.randint(0, self.num_classes, (self.pool_size,), generator=g)
        return self._pool

    def __getstate__(self) -> dict[str, Any]:
        # Workers rebuild the pool (deterministically) instead of receiving it pickled.
        return {**self.__dict__, "_pool": None}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self._get_pool()
        return images[index % self.pool_size], int(labels[index % self.pool_size])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._get_pool()
        idx = torch.as_tensor(indices, dtype=torch.int64) % self.pool_size
        return images[idx], labels[idx]


def _collate(batch: Any) -> Any:
    """Stacks per-sample tuples; passes through a batch that ``__getitems__`` already built."""
    if isinstance(batch, tuple):
        return batch
    return default_collate(batch)


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet (or any ImageNet-style folder) for Lightning; the ``val`` split serves validation and test.

    Loaders yield uint8 ``(B, 3, S, S)`` images and int64 labels; :meth:`on_after_batch_transfer`
    normalises them with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` on the device (call
    :meth:`transform_batch` outside a Trainer).

    Args:
        data_dir: Folder holding ``train/`` and ``val/`` (ignored with ``synthetic``).
        batch_size: Images per batch; training drops the last incomplete batch.
        num_workers: Decoding worker processes.
        image_size: Side of the model's input.
        resize_size: Shorter side of evaluation images before the central crop.
        synthetic: Serve random tensors instead of reading ``data_dir``.
        synthetic_train_size: Training samples in synthetic mode (ImageNet-1k's count by default).
        synthetic_val_size: Validation samples in synthetic mode.
        num_classes: Classes in synthetic mode (a folder's are counted).
        seed: Seed of the shuffling and, through the workers' seeds, of the augmentation.
        pin_memory: Pin loader memory; ``None`` pins when CUDA is available.

    Raises:
        ConfigError: A size or count is not a positive integer, ``resize_size < image_size``, or
            ``data_dir`` is missing without ``synthetic``.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, batch_size: int = 256,
                 num_workers: int = 8, image_size: int = 224, resize_size: int = 256, synthetic: bool = False,
                 synthetic_train_size: int = 1_281_167, synthetic_val_size: int = 50_000,
                 num_classes: int = 1000, seed: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__()
        if not synthetic and data_dir is None:
            raise ConfigError("data_dir", data_dir, "is required unless synthetic=True",
                              "give the folder holding train/ and val/")
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise ConfigError("data_dir", data_dir, "must be a folder path", "give the folder holding train/ and val/")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be a positive integer", "give e.g. 256")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError("num_workers", num_workers, "must be a non-negative integer", "give e.g. 8")
        for field, value, example in (("image_size", image_size, 224), ("resize_size", resize_size, 256),
                                      ("synthetic_train_size", synthetic_train_size, 1_281_167),
                                      ("synthetic_val_size", synthetic_val_size, 50_000),
                                      ("num_classes", num_classes, 1000)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(field, value, "must be a positive integer", f"give e.g. {example}")
        if resize_size < image_size:
            raise ConfigError("resize_size", resize_size, f"is smaller than image_size={image_size}, so the "
                              "validation crop would be padded with black borders",
                              f"give resize_size >= image_size, e.g. {round(image_size * 8 / 7)} (image_size * 8/7)")
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.resize_size = resize_size
        self.synthetic = synthetic
        self.synthetic_train_size = synthetic_train_size
        self.synthetic_val_size = synthetic_val_size
        self.num_classes = num_classes
        self.seed = check_seed("seed", seed)  # else torch.Generator fails with a bare RuntimeError
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.worker_generator = torch.Generator().manual_seed(seed + 1)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic:
            size, classes = self.image_size, self.num_classes
            self.train_set = SyntheticImageDataset(self.synthetic_train_size, size, classes, seed=self.seed)
            self.val_set = SyntheticImageDataset(self.synthetic_val_size, size, classes, seed=self.seed + 1)
            return
        assert self.data_dir is not None
        classes = None
        if stage in (None, "fit") and self.train_set is None:
            train = ImageFolderDataset(self.data_dir, "train", self.image_size, self.resize_size)
            self.train_set, classes = train, train.classes
        elif (self.data_dir / "train").is_dir():
            classes = find_classes(self.data_dir / "train")  # same labels as training, without a full scan
        if self.val_set is None:
            val = ImageFolderDataset(self.data_dir, "val", self.image_size, self.resize_size, classes=classes)
            self.val_set = val
            self.num_classes = len(val.classes)

    def _loader(self, data: Dataset | None, train: bool) -> DataLoader:
        if data is None:
            raise RuntimeError("ImageNetDataModule: call setup() before asking for a dataloader")
        if train:
            sampler: RandomSampler | SequentialSampler = RandomSampler(data, generator=self.shuffle_generator)
        else:
            sampler = SequentialSampler(data)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=train,
                          collate_fn=_collate, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, generator=self.worker_generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def transform_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalises a ``(uint8 images, labels)`` batch to float32 on its device."""
        x, y = batch
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD), y

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.transform_batch(batch)
