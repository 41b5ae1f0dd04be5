"""Paired image/label transforms with explicit randomness.

Every random transform takes a ``numpy.random.Generator``, so that a sample's augmentation is a
function of the seed the sampler hands out with its index: the same in any DataLoader worker,
process, and after ``--resume``. The image is ``Tensor[3, H, W]`` float32 RGB in 0..255 until
:class:`Normalize`; the label ``Tensor[H, W]`` int64, 255 for void, always resampled with nearest
neighbour and padded with 255 (images with the mean colour, as in DeepLab's Caffe data layer).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models import IMAGENET_MEAN, IMAGENET_STD

from .labels import VOID

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
_FILL = torch.tensor([255 * m for m in IMAGENET_MEAN]).view(3, 1, 1)      # the mean colour on 0..255


def to_tensors(image, label):
    """``(Tensor[3, H, W] float32 0..255, Tensor[H, W] int64)`` of an ``image`` (``uint8[H, W, 3]``,
    a PIL RGB image, or a ``Tensor[3, H, W]``) and a ``label`` (an integer array, tensor or PIL
    image ``[H, W]``); ``ValueError`` when they are not images of the same size."""
    if not torch.is_tensor(image):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be H x W x 3 RGB, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
    label = torch.as_tensor(np.asarray(label).astype(np.int64) if not torch.is_tensor(label) else label).long()
    if label.ndim != 2 or tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"image {tuple(image.shape[1:])} and label {tuple(label.shape)} differ in size")
    return image.float(), label


class Compose:
    """Apply transforms ``t(image, label, rng) -> (image, label)`` in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng: np.random.Generator):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label


class RandomScale:
    """Rescale both by a factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(self, min_scale: float, max_scale: float):
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
    """Pad at the bottom/right to ``size`` × ``size`` where smaller, then crop that size at random."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image, label, rng):
        (h, w), s = label.shape, self.size
        if h < s or w < s:
            padded_image = _FILL.to(image.dtype).expand(3, max(h, s), max(w, s)).clone()
            padded_image[:, :h, :w] = image
            padded_label = torch.full((max(h, s), max(w, s)), VOID, dtype=label.dtype)
            padded_label[:h, :w] = label
            image, label, h, w = padded_image, padded_label, max(h, s), max(w, s)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return image[:, y:y + s, x:x + s], label[y:y + s, x:x + s]


class RandomHorizontalFlip:
    """Flip both left-right with probability 1/2."""

    def __call__(self, image, label, rng):
        if rng.random() < 0.5:
            return image.flip(-1), label.flip(-1)
        return image, label


class Normalize:
    """Map the 0..255 RGB image to ImageNet's ``(rgb/255 - mean) / std``; the label is unchanged."""

    def __call__(self, image, label, rng=None):
        return (image / 255.0 - _MEAN) / _STD, label


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Invert :class:`Normalize`: ``Tensor[..., 3, H, W]`` normalised -> 0..255 float RGB."""
    mean, std = (torch.tensor(v, dtype=image.dtype, device=image.device).view(3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((image * std + mean) * 255.0).clamp(0, 255)


def train_transform(crop_size: int, min_scale: float, max_scale: float, flip: bool) -> Compose:
    """DeepLab's training augmentation: random scale, pad + random crop (255 fill), flip, normalise."""
    ts = []
    if (min_scale, max_scale) != (1.0, 1.0):
        ts.append(RandomScale(min_scale, max_scale))
    if crop_size:
        ts.append(RandomCrop(crop_size))
    if flip:
        ts.append(RandomHorizontalFlip())
    return Compose(ts + [Normalize()])


def eval_transform() -> Compose:
    """Evaluation: the full image, normalised."""
    return Compose([Normalize()])
