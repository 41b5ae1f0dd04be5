"""A procedurally generated segmentation dataset: coloured shapes with sharp outlines.

Every sample is a pure function of ``(seed, split, index)``: no files, no global random state,
identical on every machine and in every DataLoader worker. Each image holds one to
``max_objects`` objects on a smooth, low-saturation, slightly noisy background. An object's class
fixes its shape family and its hue (with jitter), so a small DCNN learns *what* is where quickly;
its outline is a hard colour edge, which a stride-8 network blurs when its scores are upsampled
and which the fully connected CRF's bilateral kernel recovers from the image. Class 0 is the
background.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

from .labels import VOID

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring")
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
                a: float, b: float, theta: float) -> np.ndarray:
    """Boolean mask (H, W) of one shape centred at (cy, cx), half-sizes a, b, rotated by theta."""
    c, s = math.cos(theta), math.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    if shape == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if shape == "triangle":
        # Isosceles triangle: apex at v = -b, base at v = +b, half-width a at the base.
        t = (v + b) / (2 * b)
        return (v >= -b) & (v <= b) & (np.abs(u) <= a * t)
    if shape == "cross":
        return ((np.abs(u) <= a) & (np.abs(v) <= b / 3)) | ((np.abs(u) <= a / 3) & (np.abs(v) <= b))
    if shape == "ring":
        r = (u / a) ** 2 + (v / b) ** 2
        return (r <= 1.0) & (r >= 0.3)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


class SyntheticShapes:
    """Deterministic dataset of (image, label) pairs with sharp-edged coloured objects.

    Args:
        num_samples: length of the dataset.
        size: image size, ``int`` (square) or ``(H, W)``.
        num_classes: classes including background (>= 2).
        split: ``"train"``, ``"val"`` or ``"test"``; each split is a different stream.
        seed: the dataset seed; sample ``i`` depends only on ``(seed, split, i)``.
        max_objects: objects per image are drawn from ``1..max_objects``.
        noise: standard deviation of the per-pixel Gaussian noise, in 0..255 units.
        void_width: width in pixels of the void (255) band along label boundaries; 0 for none.

    ``dataset[i]`` is ``(image np.uint8[H, W, 3] RGB, label np.int64[H, W])``. Samples are kept
    in memory once drawn (a 64-px one takes about 2 ms to draw).
    """

    def __init__(self, num_samples: int, *, size, num_classes: int, seed: int, split: str = "train",
                 max_objects: int = 3, noise: float = 6.0, void_width: int = 0):
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"size must be an int or (H, W) with both >= 16, got {size}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background + objects), got {num_classes}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if int(num_samples) < 1 or int(max_objects) < 1:
            raise ValueError(f"num_samples and max_objects must be >= 1, got {num_samples}, {max_objects}")
        if void_width < 0:
            raise ValueError(f"void_width must be >= 0, got {void_width}")
        self.num_samples, self.size, self.num_classes = int(num_samples), size, int(num_classes)
        self.split, self.seed, self.max_objects = split, int(seed), int(max_objects)
        self.noise, self.void_width = float(noise), int(void_width)
        self._cache = {}
        self.class_names = ["background"] + [
            f"{SHAPES[(c - 1) % len(SHAPES)]}{'' if c <= len(SHAPES) else (c - 1) // len(SHAPES)}"
            for c in range(1, self.num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        index = range(self.num_samples)[index]          # negative indices count from the end; IndexError
        if index not in self._cache:
            image, label = self._draw(index)
            self._cache[index] = (image, label.astype(np.uint8))
        image, label = self._cache[index]
        return image.copy(), label.astype(np.int64)

    def _draw(self, index: int):
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5

        # Background: a linear gradient between two greyish colours plus low-frequency waves.
        c0 = rng.uniform(70, 190, 3) + rng.uniform(-20, 20)
        c1 = rng.uniform(70, 190, 3)
        ang = rng.uniform(0, 2 * math.pi)
        t = ((xx - w / 2) * math.cos(ang) + (yy - h / 2) * math.sin(ang)) / max(h, w) + 0.5
        image = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        for _ in range(2):
            fy, fx = rng.uniform(0.5, 3, 2) * 2 * math.pi / np.array([h, w])
            phase = rng.uniform(0, 2 * math.pi)
            image = image + rng.uniform(5, 15) * np.sin(fy * yy + fx * xx + phase)[None]
        label = np.zeros((h, w), np.int64)

        side = min(h, w)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            c = int(rng.integers(1, self.num_classes))
            shape = SHAPES[(c - 1) % len(SHAPES)]
            a, b = rng.uniform(0.12, 0.28, 2) * side
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            mask = _shape_mask(shape, yy, xx, cy, cx, a, b, rng.uniform(0, math.pi))
            if mask.sum() < 16:
                continue
            # Hues evenly spread around the colour wheel by class, with a little jitter.
            hue = ((c - 1) / (self.num_classes - 1) + rng.uniform(-0.03, 0.03)) % 1.0
            rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))) * 255
            # Gentle shading across the object keeps the colour edge sharp but the interior non-flat.
            g = rng.uniform(-0.15, 0.15) * ((xx - cx) / side) + rng.uniform(-0.15, 0.15) * ((yy - cy) / side)
            obj = rgb[:, None, None] * (1 + g)[None]
            image = np.where(mask[None], obj, image)
            label[mask] = c

        image = image + rng.normal(0, self.noise, image.shape) if self.noise > 0 else image
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        if self.void_width > 0:
            label = add_void_band(label, self.void_width)
        return np.ascontiguousarray(image), label


def add_void_band(label: np.ndarray, width: int) -> np.ndarray:
    """Return a copy of ``label`` (int[H, W]) with a ``width``-pixel band of 255 along boundaries.

    A pixel becomes void when some pixel of another label lies within the band around it; the band
    is split evenly between the two sides (a 1-pixel band lies on one side of the edge).
    """
    from scipy import ndimage

    edge = np.zeros(label.shape, bool)
    dv = label[:-1] != label[1:]
    dh = label[:, :-1] != label[:, 1:]
    edge[1:] |= dv
    edge[:, 1:] |= dh
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width // 2)
    out = label.copy()
    out[edge] = VOID
    return out
