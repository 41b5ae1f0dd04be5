"""Paired image/label transforms with explicit randomness.

Every random transform takes a ``numpy.random.Generator`` so that a sample's augmentation is a
pure function of the seed the sampler hands out with its index: identical in any DataLoader
worker, across processes, and after ``--resume``.

Conventions: the image is ``Tensor[3, H, W]`` float32 in 0..255 RGB until :class:`Normalize`,
which maps it to ``(rgb/255 - mean) / std`` (ImageNet statistics by default); the label is
``Tensor[H, W]`` int64 with 255 for void. Labels are always resampled with nearest neighbour
and padded with 255; images are padded with the mean colour (0 after normalisation), as in
DeepLab's Caffe data layer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models import IMAGENET_MEAN, IMAGENET_STD

from .labels import VOID


def to_tensors(image, label):
    """Convert ``(image, label)`` to ``(Tensor[3, H, W] float32 0..255, Tensor[H, W] int64)``.

    ``image``: ``np.uint8[H, W, 3]``, a PIL RGB image, or a ``Tensor[3, H, W]``.
    ``label``: integer array/tensor ``[H, W]`` or a PIL image in mode ``P``/``L``.
    Raises ``ValueError`` when the shapes disagree or are not images.
    """
    if not torch.is_tensor(image):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be H x W x 3 RGB, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
    image = image.float()
    if not torch.is_tensor(label):
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"label must be a 2-D index map [H, W], got shape {label.shape}")
        label = torch.from_numpy(label.astype(np.int64))
    label = label.long()
    if label.ndim != 2 or tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"image {tuple(image.shape[1:])} and label {tuple(label.shape)} differ in size")
    return image, label


class Compose:
    """Apply transforms in order: ``t(image, label, rng) -> (image, label)``."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng: np.random.Generator):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label


class RandomScale:
    """Rescale both by a factor drawn uniformly from ``[min_scale, max_scale]``
    (bilinear for the image, nearest for the label)."""

    def __init__(self, min_scale: float, max_scale: float):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, image, label, rng):
        s = rng.uniform(self.min_scale, self.max_scale)
        h, w = label.shape
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        if size == (h, w):
            return image, label
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return image, label


class RandomCrop:
    """Pad at the bottom/right to ``size`` × ``size`` where smaller (the image with the mean colour,
    0 after normalisation; the label with 255), then crop that size at random."""

    def __init__(self, size: int):
        self.size = int(size)
        self.fill = torch.tensor([255 * m for m in IMAGENET_MEAN]).view(3, 1, 1)

    def __call__(self, image, label, rng):
        (h, w), s = label.shape, self.size
        if h < s or w < s:
            padded_image = self.fill.to(image.dtype).expand(3, max(h, s), max(w, s)).clone()
            padded_image[:, :h, :w] = image
            padded_label = torch.full((max(h, s), max(w, s)), VOID, dtype=label.dtype)
            padded_label[:h, :w] = label
            image, label, h, w = padded_image, padded_label, max(h, s), max(w, s)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return image[:, y:y + s, x:x + s], label[y:y + s, x:x + s]


class RandomHorizontalFlip:
    """Flip both left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            return image.flip(-1), label.flip(-1)
        return image, label


class Normalize:
    """Map the 0..255 RGB image to ``(rgb/255 - mean) / std``; the label is unchanged."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, label, rng=None):
        return (image / 255.0 - self.mean) / self.std, label


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Invert :class:`Normalize`: ``Tensor[..., 3, H, W]`` normalised -> 0..255 float RGB."""
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return ((image * s + m) * 255.0).clamp(0, 255)


def train_transform(crop_size: int, min_scale: float, max_scale: float, flip: bool) -> Compose:
    """DeepLab's training augmentation: random scale, pad+random crop (255 fill), flip, normalise."""
    ts = []
    if (min_scale, max_scale) != (1.0, 1.0):
        ts.append(RandomScale(min_scale, max_scale))
    if crop_size:
        ts.append(RandomCrop(crop_size))
    if flip:
        ts.append(RandomHorizontalFlip())
    ts.append(Normalize())
    return Compose(ts)


def eval_transform() -> Compose:
    """Evaluation: the full image, normalised."""
    return Compose([Normalize()])
