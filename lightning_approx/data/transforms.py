"""Image transforms written by hand (there is no torchvision here).

Two kinds:

* Batched tensor transforms for data already in memory (CIFAR): :func:`random_crop`,
  :func:`random_horizontal_flip`, :func:`normalize`. They take ``(N, C, H, W)`` tensors of any
  dtype on any device, draw one random choice per image from ``generator`` (on the CPU, so a
  seeded generator gives the same crops on every device), and touch the batch with a few
  vectorised ops rather than a Python loop over images.
* Per-image transforms for decoded files (ImageNet): :func:`resize`, :func:`center_crop`,
  :func:`random_resized_crop`, :func:`horizontal_flip`. They take a PIL image or a uint8
  ``(C, H, W)`` tensor, return the same kind, and resample with Pillow (bilinear, as
  torchvision's defaults). :func:`pil_to_tensor` / :func:`tensor_to_pil` convert.

All randomness comes from an optional ``torch.Generator``; ``None`` means torch's global
generator (which DataLoader workers seed from the loader's own generator).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ImageLike", "center_crop", "horizontal_flip", "normalize", "pil_to_tensor", "random_crop",
           "random_horizontal_flip", "random_resized_crop", "resize", "tensor_to_pil"]

ImageLike = TypeVar("ImageLike", Image.Image, torch.Tensor)


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} expects a batch of images shaped (N, C, H, W), got {shape}")


# --- batched tensor transforms -------------------------------------------------------------


def random_crop(x: torch.Tensor, size: int | tuple[int, int], padding: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pads each image by ``padding`` pixels, then crops a random ``size`` window from it.

    Args:
        x: Images ``(N, C, H, W)``, any dtype and device.
        size: Output size, ``s`` or ``(h, w)``.
        padding: Zeros added on every side before cropping.
        generator: CPU generator for the crop offsets (one per image).

    Returns:
        The crops ``(N, C, h, w)``, same dtype and device as ``x``.
    """
    _check_batch(x, "random_crop")
    h, w = (size, size) if isinstance(size, int) else size
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    n, _, hp, wp = x.shape
    if h > hp or w > wp:
        raise ValueError(f"random_crop: crop {h}x{w} is larger than the padded image {hp}x{wp}")
    # Offsets drawn on the CPU so results don't depend on the device the batch lives on.
    top = torch.randint(0, hp - h + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, wp - w + 1, (n,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, h, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # One gather for the whole batch: index (N, h, w) positions of the channels-last view.
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_horizontal_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                           p: float = 0.5) -> torch.Tensor:
    """Mirrors each image left-right with probability ``p``.

    Args:
        x: Images ``(N, C, H, W)``, any dtype and device.
        generator: CPU generator for the per-image coin flips.
        p: Probability of flipping an image.

    Returns:
        A new tensor shaped like ``x``.
    """
    _check_batch(x, "random_horizontal_flip")
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``; uint8 images are first scaled to [0, 1].

    Args:
        x: Images ``(..., C, H, W)``; uint8 (0..255) or floating point (0..1).
        mean: Per-channel means, on the [0, 1] scale.
        std: Per-channel standard deviations, on the [0, 1] scale.

    Returns:
        A float tensor (float32 for uint8 input, else ``x``'s dtype).
    """
    if x.ndim < 3 or x.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize: {len(mean)} means / {len(std)} stds for images shaped {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float().div_(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


# --- per-image transforms (PIL or uint8 CHW tensors) ---------------------------------------


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 ``(C, H, W)`` tensor (RGB images give C=3; no scaling)."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    c = 3 if img.mode == "RGB" else 1
    w, h = img.size
    # bytearray: frombuffer wants a writable buffer; numpy is not needed.
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(h, w, c).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """A uint8 ``(C, H, W)`` tensor (C = 1 or 3) as a PIL image."""
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"tensor_to_pil expects a uint8 (C, H, W) tensor with C in (1, 3), got "
                         f"{x.dtype} {tuple(x.shape)}")
    c, h, w = x.shape
    data = x.detach().cpu().permute(1, 2, 0).contiguous()
    # Copy the raw HWC bytes straight out of the tensor (no numpy needed).
    raw = ctypes.string_at(data.data_ptr(), data.numel())
    return Image.frombytes("RGB" if c == 3 else "L", (w, h), raw)


def _as_pil(img: Image.Image | torch.Tensor) -> tuple[Image.Image, bool]:
    if isinstance(img, Image.Image):
        return img, False
    if isinstance(img, torch.Tensor):
        return tensor_to_pil(img), True
    raise TypeError(f"expected a PIL image or a uint8 (C, H, W) tensor, got {type(img).__name__}")


def _like(img: Image.Image, as_tensor: bool) -> Image.Image | torch.Tensor:
    return pil_to_tensor(img) if as_tensor else img


def _size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or a (C, H, W) tensor."""
    if isinstance(img, Image.Image):
        return img.size
    return int(img.shape[-1]), int(img.shape[-2])


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """``s`` or ``(h, w)`` as ``(h, w)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize(img: ImageLike, size: int | tuple[int, int]) -> ImageLike:
    """Bilinear resize: an int scales the shorter side to ``size`` keeping the aspect ratio
    (as torchvision's ``Resize(256)``); ``(h, w)`` resizes to exactly that.

    Args:
        img: A PIL image or a uint8 ``(C, H, W)`` tensor.
        size: Target shorter side, or ``(h, w)``.

    Returns:
        The resized image, of the same kind as ``img``.
    """
    w, h = _size(img)
    if isinstance(size, int):
        # Integer arithmetic exactly as torchvision, so the two agree on odd aspect ratios.
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nh, nw = size, int(size * w / h)
    else:
        nh, nw = _pair(size)
    if (nw, nh) == (w, h):
        return img
    pil, as_tensor = _as_pil(img)
    return _like(pil.resize((nw, nh), Image.Resampling.BILINEAR), as_tensor)  # type: ignore[return-value]


def center_crop(img: ImageLike, size: int | tuple[int, int]) -> ImageLike:
    """Crops the central ``size`` window (zero-padding first if the image is smaller).

    Args:
        img: A PIL image or a uint8 ``(C, H, W)`` tensor.
        size: Output size, ``s`` or ``(h, w)``.

    Returns:
        The crop, of the same kind as ``img``.
    """
    th, tw = _pair(size)
    w, h = _size(img)
    top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
    if isinstance(img, torch.Tensor):
        # Zero-fill outside the image, as PIL's crop does, so both kinds give the same pixels.
        pad = (max(-left, 0), max(left + tw - w, 0), max(-top, 0), max(top + th - h, 0))
        if any(pad):
            img = F.pad(img, pad)
            top, left = top + pad[2], left + pad[0]
        return img[..., top:top + th, left:left + tw].contiguous()
    return img.crop((left, top, left + tw, top + th))


def horizontal_flip(img: ImageLike) -> ImageLike:
    """Mirrors one image left-right (a PIL image or a ``(..., H, W)`` tensor)."""
    if isinstance(img, torch.Tensor):
        return img.flip(-1)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def random_resized_crop(img: ImageLike, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> ImageLike:
    """Inception-style crop: a random area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), resized bilinearly to ``size``; the sampling follows torchvision's
    ``RandomResizedCrop`` (10 tries, then a central crop clamped to ``ratio``).

    Args:
        img: A PIL image or a uint8 ``(C, H, W)`` tensor.
        size: Output size, ``s`` or ``(h, w)``.
        scale: Range of the crop area relative to the image.
        ratio: Range of the crop's width / height.
        generator: Generator for the crop; ``None`` uses torch's global one.

    Returns:
        The crop, of the same kind as ``img``.
    """
    th, tw = _pair(size)
    top, left, h, w = _sample_crop(*_size(img), scale, ratio, generator)
    pil, as_tensor = _as_pil(img)
    out = pil.resize((tw, th), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return _like(out, as_tensor)  # type: ignore[return-value]


def _sample_crop(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized-crop window, as torchvision samples it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback: the largest central crop whose aspect ratio lies in ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
